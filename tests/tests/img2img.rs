//! Image-to-image against diffusers (tests/reference/make_img2img_fixtures.py):
//! Pillow's Lanczos resize byte for byte, the whole VAE's encoder in both
//! layouts, and `FluxImg2ImgPipeline`'s final latents and decoded image from
//! the same init image, noise and text embeddings on the tiny Flux; with
//! XLabs' IP-Adapter (`load_ip_adapter`, make_img2img_ip_fixtures.py).
//! Tolerance: f32 relative max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::load::{load_store, load_vae, vae_file};
use ipaflux::vae::{from_rgb8, VaeDecoder, VaeEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{AttentionHook, Hooks};
use ipaflux_core::preprocess::{resize, Resample, RgbImage};
use ipaflux_tests::*;

fn gold() -> HashMap<String, Tensor> {
    tensors("img2img/golden.safetensors")
}

fn reference() -> serde_json::Value {
    json("img2img/reference.json")
}

fn init_image() -> RgbImage {
    fixture_image("img2img/init.png")
}

fn encoder(rel: &str) -> VaeEncoder {
    let store = load_vae(&vae_file(&fixture(rel)).unwrap()).unwrap();
    VaeEncoder::new(&store, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn lanczos_resize_equals_pillows() {
    let (g, img) = (gold(), init_image());
    for (w, h) in [(80, 48), (128, 96), (96, 64)] {
        let want = g[&format!("lanczos.{w}x{h}")].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let ours = resize(&img, w, h, Resample::Lanczos);
        let differing = ours.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{w}×{h}: {differing} of {} samples differ from Pillow", want.len());
    }
    // Bicubic is another filter: it must not give the same bytes when resampling.
    assert_ne!(resize(&img, 80, 48, Resample::Bicubic).data, resize(&img, 80, 48, Resample::Lanczos).data);
}

#[test]
fn the_vae_encoder_matches_diffusers_in_both_layouts() {
    let (g, img) = (gold(), init_image());
    let pixels = from_rgb8(&img, &Device::Cpu).unwrap();
    let bfl = encoder("img2img/ae.safetensors");
    let r = &reference()["vae"];
    let mult: Vec<usize> = r["ch_mult"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(
        (bfl.cfg.ch, bfl.cfg.ch_mult.clone(), bfl.cfg.num_res_blocks, bfl.cfg.z_channels),
        (r["ch"].as_u64().unwrap() as usize, mult, r["num_res_blocks"].as_u64().unwrap() as usize, 16)
    );
    let ours = bfl.encode(&pixels).unwrap();
    assert_close("VAE encode (ae.safetensors)", &ours, &g["encode.latents"], F32_TOL);
    // The diffusers folder renamed to BFL's names holds exactly ae.safetensors' tensors.
    let renamed = load_vae(&vae_file(&fixture("img2img/vae")).unwrap()).unwrap();
    let ae = load_store(&fixture("img2img/ae.safetensors")).unwrap();
    let mut names: Vec<&str> = renamed.names().collect();
    let mut want: Vec<&str> = ae.names().collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want);
    let folder = encoder("img2img/vae").encode(&pixels).unwrap();
    assert_eq!(rel_max_err(&folder, &ours), 0.0, "the two layouts must encode identically");
    // Not the identity and not constant: the golden can tell a wrong network.
    let spread = (ours.max_all().unwrap().to_scalar::<f32>().unwrap()
        - ours.min_all().unwrap().to_scalar::<f32>().unwrap())
    .abs();
    assert!(spread > 0.1, "latents spread {spread}");
}

/// diffusers' `FluxImg2ImgPipeline` at each strength the script ran, from the
/// same init image, noise and embeddings: the final packed latents, and their decoding.
#[test]
fn img2img_matches_diffusers_pipeline() {
    let (g, r) = (gold(), reference());
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let pixels = from_rgb8(&init_image(), &Device::Cpu).unwrap();
    let image = sampler::pack(&encoder("img2img/ae.safetensors").encode(&pixels).unwrap()).unwrap();
    let noise = sampler::pack(&g["pipe.noise"]).unwrap();
    let prompt = run.cond(&g["pipe.prompt_embeds"], &g["pipe.pooled"]);
    let decoder =
        VaeDecoder::new(&load_store(&fixture("img2img/ae.safetensors")).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let mut finals = Vec::new();
    for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
        let sigmas = run.sigmas_at(strength);
        let start = Start::Image { image: &image, noise: &noise, mask: None };
        let mut ran = 0;
        let out =
            sampler::euler(&model, start, &run.ids(), Guide::prompt(&prompt), &sigmas, Hooks::none(), &mut |_| {
                ran += 1
            })
            .unwrap();
        assert_eq!(ran, run.steps - sampler::img2img_start(run.steps, strength).unwrap());
        let want = &g[&format!("pipe.latents.{strength}")];
        assert_close(&format!("img2img latents at strength {strength}"), &out, want, F32_TOL);
        let decoded = decoder.decode(&sampler::unpack(&out, run.height / 8, run.width / 8).unwrap()).unwrap();
        let want = &g[&format!("pipe.decoded.{strength}")];
        assert_close(&format!("img2img decoded at strength {strength}"), &decoded, want, F32_TOL);
        finals.push(out);
    }
    // The two strengths differ by more than the tolerance: the start point is tested.
    assert!(rel_max_err(&finals[0], &finals[1]) > 100.0 * F32_TOL);
}

/// `FluxImg2ImgPipeline` with XLabs' IP-Adapter: an init image and an IP
/// reference together, as `generate --init-image X --image P`.
#[test]
fn img2img_with_xlabs_ip_adapter_matches_diffusers_pipeline() {
    let (g, ip_gold, r) = (gold(), tensors("img2img/ip-golden.safetensors"), json("img2img/ip-reference.json"));
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let pixels = from_rgb8(&init_image(), &Device::Cpu).unwrap();
    let image = sampler::pack(&encoder("img2img/ae.safetensors").encode(&pixels).unwrap()).unwrap();
    let noise = sampler::pack(&g["pipe.noise"]).unwrap();
    let hook = xlabs_photo_hook(&model.cfg, r["scale"].as_f64().unwrap());
    let hooks: [&dyn AttentionHook; 1] = [&hook];
    let prompt = run.cond(&g["pipe.prompt_embeds"], &g["pipe.pooled"]);
    let strength = r["strength"].as_f64().unwrap();
    let start = Start::Image { image: &image, noise: &noise, mask: None };
    let sigmas = run.sigmas_at(strength);
    let out =
        sampler::euler(&model, start, &run.ids(), Guide::prompt(&prompt), &sigmas, Hooks::new(&hooks), &mut |_| {})
            .unwrap();
    assert_close("img2img with XLabs' IP-Adapter", &out, &ip_gold["out"], F32_TOL);
    let plain = &g[&format!("pipe.latents.{strength}")];
    assert!(rel_max_err(&out, plain) > 100.0 * F32_TOL, "the adapter changed too little to be tested");
}

#[test]
fn a_decoder_only_vae_cannot_encode() {
    let store = load_store(&fixture("pipeline/ae.safetensors")).unwrap();
    assert!(!ipaflux::vae::has_encoder(&store));
    let e = VaeEncoder::new(&store, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("has no encoder") && e.contains("image-to-image"), "{e}");
}
