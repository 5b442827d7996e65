//! XLabs' Flux IP-Adapter against diffusers' `FluxPipeline` with
//! `load_ip_adapter` (tests/reference/make_xlabs_fixtures.py): the CLIP
//! image processor's pixels and the CLIP vision model's `image_embeds` for a
//! 160×96 JPEG (transformers' `CLIPImageProcessor`, PIL backend;
//! `CLIPVisionModelWithProjection`), then the tiny Flux sampled with the
//! adapter at scale 0.8 and at 0. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux::clip_vision::{load_clip_vision_dir, ClipImageEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::ip::{IpHookConfig, IpImage, IpWeight};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{AttentionHook, Hooks, XlabsHook};
use ipaflux_core::preprocess::{clip_pixel_values, RgbImage};
use ipaflux_tests::*;

#[test]
fn xlabs_ip_adapter_matches_diffusers_pipeline() {
    let (g, i2i, r) =
        (tensors("xlabs/golden.safetensors"), tensors("img2img/golden.safetensors"), json("xlabs/reference.json"));
    let clip = xlabs_clip();
    let photo = std::fs::read(fixture("images/photo.jpg")).unwrap();
    let pixels = clip.pixels(&photo, "photo.jpg").unwrap();
    assert_close("CLIP pixel values", &pixels, &g["pixel_values"], 1e-6);
    let embeds = clip.image_embeds(&pixels).unwrap();
    assert_close("CLIP image_embeds", &embeds, &g["image_embeds"], F32_TOL);

    let adapter = xlabs_adapter();
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    adapter.dims.check_compatible(&model.cfg).unwrap();
    assert_eq!((adapter.dims.tokens, adapter.dims.blocks), (4, model.cfg.depth));
    let kv = adapter.kv_all(&adapter.project(&embeds).unwrap(), model.cfg.head_dim()).unwrap();
    let scale = r["scale"].as_f64().unwrap();
    let cfg = IpHookConfig { weight: IpWeight::Constant(scale), ..IpHookConfig::default() };
    let hook = XlabsHook::new(vec![IpImage { kv, weight: 1.0 }], cfg, &model.cfg).unwrap();
    let run = PipelineRun::of(&r);
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let (ids, sigmas) = (run.ids(), run.sigmas());
    let sample = |hooks: Hooks<'_>| {
        sampler::euler(&model, Start::Noise(&g["latents"]), &ids, Guide::prompt(&prompt), &sigmas, hooks, &mut |_| {})
            .unwrap()
    };
    let list: [&dyn AttentionHook; 1] = [&hook];
    let out = sample(Hooks::new(&list));
    assert_close(&format!("XLabs IP-Adapter at {scale}"), &out, &g["out"], F32_TOL);
    let plain = sample(Hooks::none());
    assert_close("XLabs IP-Adapter at 0", &plain, &g["out.scale0"], F32_TOL);
    assert!(rel_max_err(&out, &plain) > 100.0 * F32_TOL, "the adapter changed too little to be tested");
}

/// A CLIP vision model as one file without its config (as ComfyUI keeps
/// `clip_vision_l.safetensors`): sizes from its shapes, CLIP's preprocessing.
#[test]
fn a_single_file_clip_vision_reads_its_sizes_from_its_shapes() {
    let files = load_clip_vision_dir(&fixture("xlabs/clip-vision-single.safetensors")).unwrap();
    let c = &files.config;
    assert_eq!(
        (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.image_size, c.patch_size),
        (128, 2, 1, 32, 8)
    );
    assert_eq!((c.intermediate_size, c.projection_dim), (256, 24));
    let clip = ClipImageEncoder::new(&files, DType::F32, &Device::Cpu).unwrap();
    let photo = std::fs::read(fixture("images/photo.jpg")).unwrap();
    let embeds = clip.image_embeds(&clip.pixels(&photo, "photo.jpg").unwrap()).unwrap();
    let g = tensors("xlabs/clip-vision-single-golden.safetensors");
    assert_close("single-file CLIP image_embeds", &embeds, &g["image_embeds"], F32_TOL);
}

/// XLabs' IP-Adapter under true CFG (make_ip_cfg_fixtures.py): diffusers gives
/// the negative pass a black image (`IpNegative::Black` in `generate`); with the
/// reference passed as `negative_ip_adapter_image` both passes see it, as in
/// ComfyUI (`IpNegative::Same`, the negative pass running the positive
/// pass's hooks); another picture there is `IpNegative::Image`. Tolerance:
/// f32 relative max error ≤ 1e-4.
#[test]
fn xlabs_ip_adapter_under_true_cfg_matches_diffusers() {
    let (g, cfg, r) =
        (tensors("xlabs/cfg-golden.safetensors"), tensors("cfg/golden.safetensors"), json("xlabs/cfg-reference.json"));
    let clip = xlabs_clip();
    let adapter = xlabs_adapter();
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let run = PipelineRun::of(&r);
    // diffusers' black image is `np.zeros((width, height, 3))`: `width` rows.
    let black = RgbImage { width: run.height, height: run.width, data: vec![0; run.width * run.height * 3] };
    let black_embeds = clip.image_embeds(&clip_pixel_values(&black, &clip.preprocess).unwrap()).unwrap();
    assert_close("black image_embeds", &black_embeds, &g["black_image_embeds"], F32_TOL);
    let photo = std::fs::read(fixture("images/photo.jpg")).unwrap();
    let photo_embeds = clip.image_embeds(&clip.pixels(&photo, "photo.jpg").unwrap()).unwrap();
    let head_dim = model.cfg.head_dim();
    let kv = |embeds: &Tensor| adapter.kv_all(&adapter.project(embeds).unwrap(), head_dim).unwrap();
    let scale = r["scale"].as_f64().unwrap();
    let hook_cfg = IpHookConfig { weight: IpWeight::Constant(scale), ..IpHookConfig::default() };
    let hook = |embeds: &Tensor| {
        XlabsHook::new(vec![IpImage { kv: kv(embeds), weight: 1.0 }], hook_cfg.clone(), &model.cfg).unwrap()
    };
    let other = std::fs::read(fixture("images/alpha.png")).unwrap();
    let other_embeds = clip.image_embeds(&clip.pixels(&other, "alpha.png").unwrap()).unwrap();
    let (positive_hook, black_hook, other_hook) = (hook(&photo_embeds), hook(&black_embeds), hook(&other_embeds));
    let positive: [&dyn AttentionHook; 1] = [&positive_hook];
    let negative: [&dyn AttentionHook; 1] = [&black_hook];
    let other: [&dyn AttentionHook; 1] = [&other_hook];
    let (pos, neg) = (
        run.cond(&cfg["prompt_embeds"], &cfg["pooled"]),
        run.cond(&cfg["negative_prompt_embeds"], &cfg["negative_pooled"]),
    );
    let true_cfg = r["true_cfg"].as_f64().unwrap() as f32;
    let sample = |negative_hooks: Option<Hooks<'_>>| {
        let guide = Guide { negative: Some((&neg, true_cfg)), negative_hooks, ..Guide::prompt(&pos) };
        let (ids, sigmas) = (run.ids(), run.sigmas());
        sampler::euler(&model, Start::Noise(&cfg["latents"]), &ids, guide, &sigmas, Hooks::new(&positive), &mut |_| {})
            .unwrap()
    };
    let black_out = sample(Some(Hooks::new(&negative)));
    assert_close("XLabs IP-Adapter, true CFG, black negative image", &black_out, &g["out.black"], F32_TOL);
    let same_out = sample(None);
    assert_close("XLabs IP-Adapter, true CFG, the reference in both passes", &same_out, &g["out.same"], F32_TOL);
    assert!(rel_max_err(&black_out, &same_out) > 100.0 * F32_TOL, "the negative image changed too little to be tested");
    let other_out = sample(Some(Hooks::new(&other)));
    assert_close("XLabs IP-Adapter, true CFG, another picture as the negative", &other_out, &g["out.image"], F32_TOL);
    assert!(rel_max_err(&other_out, &black_out) > 100.0 * F32_TOL, "the picture is not the black image");
}
