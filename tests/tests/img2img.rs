//! Image-to-image against diffusers (tests/reference/make_img2img_fixtures.py):
//! Pillow's Lanczos resize byte for byte, the whole VAE's encoder in both
//! layouts, and `FluxImg2ImgPipeline`'s final latents and decoded image from
//! the same init image, noise and text embeddings on the tiny Flux.
//! Tolerance: f32 relative max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::load::{load_flux, load_store, load_vae, vae_file};
use ipaflux::vae::{from_rgb8, VaeDecoder, VaeEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, img_ids, Guide, Start};
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights, Hooks};
use ipaflux_core::preprocess::{decode_rgb, resize, Resample, RgbImage};
use ipaflux_core::schedule::{flux_schedule, Shift};
use ipaflux_tests::*;

fn gold() -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("img2img/golden.safetensors"), &Device::Cpu).unwrap()
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("img2img/reference.json")).unwrap()).unwrap()
}

fn init_image() -> RgbImage {
    decode_rgb(&std::fs::read(fixture("img2img/init.png")).unwrap(), "init.png").unwrap()
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
    let (steps, guidance) = (r["steps"].as_u64().unwrap() as usize, r["guidance"].as_f64().unwrap() as f32);
    let (w, h) = (r["image"][0].as_u64().unwrap() as usize, r["image"][1].as_u64().unwrap() as usize);
    let dev = Device::Cpu;
    let files = load_flux(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let load = FluxLoad { dtype: DType::F32, device: &dev, streamed: &[], gguf: GgufWeights::Quantized, loras: &[] };
    let (model, _) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &load).unwrap();
    let image =
        sampler::pack(&encoder("img2img/ae.safetensors").encode(&from_rgb8(&init_image(), &dev).unwrap()).unwrap())
            .unwrap();
    let noise = sampler::pack(&g["pipe.noise"]).unwrap();
    let cond =
        Conditioning { txt: g["pipe.prompt_embeds"].clone(), y: g["pipe.pooled"].clone(), guidance: Some(guidance) };
    let (rows, cols) = sampler::token_grid(w, h);
    let decoder = VaeDecoder::new(&load_store(&fixture("img2img/ae.safetensors")).unwrap(), DType::F32, &dev).unwrap();
    let mut finals = Vec::new();
    for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
        let mut sigmas = flux_schedule(steps, rows * cols, Shift::DEV);
        sigmas.drain(..sampler::img2img_start(steps, strength).unwrap());
        let start = Start::Image { image: &image, noise: &noise, mask: None };
        let mut ran = 0;
        let out = sampler::euler(
            &model,
            start,
            &img_ids(rows, cols),
            Guide::prompt(&cond),
            &sigmas,
            Hooks::none(),
            &mut |_| ran += 1,
        )
        .unwrap();
        assert_eq!(ran, steps - sampler::img2img_start(steps, strength).unwrap());
        assert_close(
            &format!("img2img latents at strength {strength}"),
            &out,
            &g[&format!("pipe.latents.{strength}")],
            F32_TOL,
        );
        let decoded = decoder.decode(&sampler::unpack(&out, h / 8, w / 8).unwrap()).unwrap();
        assert_close(
            &format!("img2img decoded at strength {strength}"),
            &decoded,
            &g[&format!("pipe.decoded.{strength}")],
            F32_TOL,
        );
        finals.push(out);
    }
    // The two strengths differ by more than the tolerance: the start point is tested.
    assert!(rel_max_err(&finals[0], &finals[1]) > 100.0 * F32_TOL);
}

#[test]
fn a_decoder_only_vae_cannot_encode() {
    let store = load_store(&fixture("pipeline/ae.safetensors")).unwrap();
    assert!(!ipaflux::vae::has_encoder(&store));
    let e = VaeEncoder::new(&store, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("has no encoder") && e.contains("image-to-image"), "{e}");
}
