//! Inpainting against diffusers' `FluxInpaintPipeline`
//! (tests/reference/make_inpaint_fixtures.py): the packed latent mask from a
//! grayscale mask at the output size and from a smaller RGB one (resized with
//! Lanczos, then its luma), and the final latents at two strengths from the
//! img2img fixtures' init image, noise and embeddings. Tolerance: f32 relative
//! max error ≤ 1e-4; the masks exactly.

use std::collections::HashMap;

use ipaflux::load::{load_flux, load_vae, vae_file};
use ipaflux::vae::{from_rgb8, VaeEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, img_ids, Guide, Start};
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights, Hooks};
use ipaflux_core::preprocess::{decode_rgb, resize, to_luma, Resample};
use ipaflux_core::schedule::{flux_schedule, Shift};
use ipaflux_tests::*;

fn load(rel: &str) -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

/// The mask file as generate reads it, at `w × h`.
fn mask(name: &str, w: usize, h: usize) -> Tensor {
    let img = decode_rgb(&std::fs::read(fixture(&format!("inpaint/{name}.png"))).unwrap(), name).unwrap();
    let img = if (img.width, img.height) == (w, h) { img } else { resize(&img, w, h, Resample::Lanczos) };
    sampler::latent_mask(&to_luma(&img), w, h, &Device::Cpu).unwrap()
}

#[test]
fn inpainting_matches_diffusers_pipeline() {
    let (g, i2i) = (load("inpaint/golden.safetensors"), load("img2img/golden.safetensors"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("inpaint/reference.json")).unwrap()).unwrap();
    let (steps, guidance) = (r["steps"].as_u64().unwrap() as usize, r["guidance"].as_f64().unwrap() as f32);
    let (w, h) = (r["image"][0].as_u64().unwrap() as usize, r["image"][1].as_u64().unwrap() as usize);
    let dev = Device::Cpu;
    let files = load_flux(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let flux = FluxLoad { dtype: DType::F32, device: &dev, streamed: &[], gguf: GgufWeights::Quantized, loras: &[] };
    let (model, _) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &flux).unwrap();
    let vae =
        VaeEncoder::new(&load_vae(&vae_file(&fixture("img2img/ae.safetensors")).unwrap()).unwrap(), DType::F32, &dev)
            .unwrap();
    let init = decode_rgb(&std::fs::read(fixture("img2img/init.png")).unwrap(), "init.png").unwrap();
    let image = sampler::pack(&vae.encode(&from_rgb8(&init, &dev).unwrap()).unwrap()).unwrap();
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let cond = Conditioning {
        txt: i2i["pipe.prompt_embeds"].clone(),
        y: i2i["pipe.pooled"].clone(),
        guidance: Some(guidance),
    };
    let (rows, cols) = sampler::token_grid(w, h);
    for name in ["mask", "mask-small"] {
        let m = mask(name, w, h);
        assert_eq!(rel_max_err(&m, &g[&format!("mask.{name}")]), 0.0, "{name}: the latent mask differs");
        for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
            let mut sigmas = flux_schedule(steps, rows * cols, Shift::DEV);
            sigmas.drain(..sampler::img2img_start(steps, strength).unwrap());
            let start = Start::Image { image: &image, noise: &noise, mask: Some(&m) };
            let ids = img_ids(rows, cols);
            let out =
                sampler::euler(&model, start, &ids, Guide::prompt(&cond), &sigmas, Hooks::none(), &mut |_| {}).unwrap();
            let want = &g[&format!("out.{name}.{strength:?}")];
            assert_close(&format!("inpaint {name} at {strength}"), &out, want, F32_TOL);
            // Where the mask keeps, the result is the init image's latents exactly (the last blend).
            let kept =
                (m.affine(-1.0, 1.0).unwrap() * (&out - &image).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(kept.to_scalar::<f32>().unwrap(), 0.0, "{name}: a kept latent moved");
            // Without the mask it is plain image-to-image: far from the inpainted result.
            let free = Start::Image { image: &image, noise: &noise, mask: None };
            let unmasked =
                sampler::euler(&model, free, &ids, Guide::prompt(&cond), &sigmas, Hooks::none(), &mut |_| {}).unwrap();
            assert!(rel_max_err(&unmasked, want) > 100.0 * F32_TOL);
        }
    }
}
