//! FLUX.1 Kontext against diffusers' `FluxKontextPipeline`
//! (tests/reference/make_kontext_fixtures.py): the reference image's tokens
//! after the latents' on the tiny Flux give the pipeline's final latents, and
//! the preferred-resolution choice is the pipeline's; with inpainting
//! (`FluxKontextInpaintPipeline`) and with XLabs' IP-Adapter
//! (`load_ip_adapter`, make_kontext_ip_fixtures.py). Tolerance: f32 relative
//! max error ≤ 1e-4.

use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::{Device, Tensor};
use ipaflux_core::flux::kontext::{preferred_size, reference_ids};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{AttentionHook, Hooks};
use ipaflux_tests::*;

#[test]
fn kontext_matches_diffusers_pipeline() {
    let (g, i2i, r) =
        (tensors("kontext/golden.safetensors"), tensors("img2img/golden.safetensors"), json("kontext/reference.json"));
    for case in r["auto_resize"].as_array().unwrap() {
        let v: Vec<usize> = case.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(preferred_size(v[0], v[1]), (v[2], v[3]), "{}×{}", v[0], v[1]);
    }
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let image = fixture_image("img2img/init.png");
    let tokens = sampler::pack(&tiny_vae_encoder().encode(&from_rgb8(&image, &Device::Cpu).unwrap()).unwrap()).unwrap();
    let ref_ids = reference_ids(image.height / 16, image.width / 16);
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let (ids, sigmas) = (run.ids(), run.sigmas());
    let sample = |guide: Guide<'_>| {
        sampler::euler(&model, Start::Noise(&g["latents"]), &ids, guide, &sigmas, Hooks::none(), &mut |_| {}).unwrap()
    };
    let out = sample(Guide { reference: Some((&tokens, &ref_ids)), ..Guide::prompt(&prompt) });
    assert_eq!(out.dims(), &[1, ids.len(), 64], "the reference tokens' output is dropped");
    assert_close("Kontext", &out, &g["out"], F32_TOL);
    // The reference moves the result well past the tolerance, and its positions matter.
    assert!(rel_max_err(&sample(Guide::prompt(&prompt)), &g["out"]) > 100.0 * F32_TOL);
    let at_zero: Vec<[f32; 3]> = ref_ids.iter().map(|p| [0.0, p[1], p[2]]).collect();
    let moved = sample(Guide { reference: Some((&tokens, &at_zero)), ..Guide::prompt(&prompt) });
    assert!(rel_max_err(&moved, &g["out"]) > 100.0 * F32_TOL);
}

/// FLUX.1 Kontext inpainting against diffusers' `FluxKontextInpaintPipeline`
/// (tests/reference/make_kontext_inpaint_fixtures.py): an init image with a
/// mask (inpainting) and a Kontext reference (the image itself, or another
/// picture) together, as `generate --init-image X --mask M --kontext-image R`.
#[test]
fn kontext_inpainting_matches_diffusers_pipeline() {
    let (g, i2i, r) = (
        tensors("kontext/inpaint-golden.safetensors"),
        tensors("img2img/golden.safetensors"),
        json("kontext/inpaint-reference.json"),
    );
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let encoder = tiny_vae_encoder();
    let tokens_of = |rel: &str| {
        let image = fixture_image(rel);
        let tokens = sampler::pack(&encoder.encode(&from_rgb8(&image, &Device::Cpu).unwrap()).unwrap()).unwrap();
        (tokens, reference_ids(image.height / 16, image.width / 16))
    };
    let (image, image_ids) = tokens_of("img2img/init.png");
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let luma = ipaflux_core::preprocess::to_luma(&fixture_image("inpaint/mask.png"));
    let mask = sampler::latent_mask(&luma, run.width, run.height, &Device::Cpu).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let (ids, sigmas) = (run.ids(), run.sigmas_at(r["strength"].as_f64().unwrap()));
    let sample = |reference: (&Tensor, &[[f32; 3]])| {
        let start = Start::Image { image: &image, noise: &noise, mask: Some(&mask) };
        let guide = Guide { reference: Some(reference), ..Guide::prompt(&prompt) };
        sampler::euler(&model, start, &ids, guide, &sigmas, Hooks::none(), &mut |_| {}).unwrap()
    };
    let out = sample((&image, &image_ids));
    assert_close("Kontext inpainting, the image as its reference", &out, &g["out.self"], F32_TOL);
    let (photo, photo_ids) = tokens_of("images/photo.jpg");
    let other = sample((&photo, &photo_ids));
    assert_close("Kontext inpainting, another reference", &other, &g["out.photo"], F32_TOL);
    assert!(rel_max_err(&out, &other) > 100.0 * F32_TOL, "the reference changed too little to be tested");
}

/// FLUX.1 Kontext with XLabs' IP-Adapter against `FluxKontextPipeline` with
/// `load_ip_adapter`: the adapter's term reaches the image stream, the
/// reference's tokens included, as diffusers' processor does.
#[test]
fn kontext_with_xlabs_ip_adapter_matches_diffusers_pipeline() {
    let (g, kontext, i2i, r) = (
        tensors("kontext/ip-golden.safetensors"),
        tensors("kontext/golden.safetensors"),
        tensors("img2img/golden.safetensors"),
        json("kontext/ip-reference.json"),
    );
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let image = fixture_image("img2img/init.png");
    let tokens = sampler::pack(&tiny_vae_encoder().encode(&from_rgb8(&image, &Device::Cpu).unwrap()).unwrap()).unwrap();
    let ref_ids = reference_ids(image.height / 16, image.width / 16);
    let hook = xlabs_photo_hook(&model.cfg, r["scale"].as_f64().unwrap());
    let hooks: [&dyn AttentionHook; 1] = [&hook];
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let (ids, sigmas) = (run.ids(), run.sigmas());
    let guide = Guide { reference: Some((&tokens, &ref_ids)), ..Guide::prompt(&prompt) };
    let start = Start::Noise(&kontext["latents"]);
    let out = sampler::euler(&model, start, &ids, guide, &sigmas, Hooks::new(&hooks), &mut |_| {}).unwrap();
    assert_close("Kontext with XLabs' IP-Adapter", &out, &g["out"], F32_TOL);
    assert!(rel_max_err(&out, &kontext["out"]) > 100.0 * F32_TOL, "the adapter changed too little to be tested");
}
