//! FLUX.1 Fill against diffusers' `FluxFillPipeline`
//! (tests/reference/make_fill_fixtures.py) on a tiny Fill transformer: the
//! per-token conditioning (masked image latents and 8×8 mask) from the
//! img2img fixtures' init image and the inpainting mask, and the final
//! latents at two strengths. Tolerance: f32 relative max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::load::{flux_config, load_flux, load_vae, vae_file};
use ipaflux::vae::{from_rgb8, VaeEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, img_ids, Guide, Start};
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights, Hooks};
use ipaflux_core::preprocess::{decode_rgb, to_luma};
use ipaflux_core::schedule::{flux_schedule, Shift};
use ipaflux_tests::*;

fn load(rel: &str) -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

#[test]
fn fill_matches_diffusers_pipeline() {
    let (g, i2i) = (load("fill/golden.safetensors"), load("img2img/golden.safetensors"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("fill/reference.json")).unwrap()).unwrap();
    let (steps, guidance) = (r["steps"].as_u64().unwrap() as usize, r["guidance"].as_f64().unwrap() as f32);
    let (w, h) = (r["image"][0].as_u64().unwrap() as usize, r["image"][1].as_u64().unwrap() as usize);
    let dev = Device::Cpu;
    let cfg = flux_config(&fixture("fill/transformer")).unwrap();
    assert_eq!((cfg.in_channels, cfg.out_channels), (64 + sampler::FILL_CONDITION_CHANNELS, 64));
    let files = load_flux(&fixture("fill/transformer")).unwrap();
    let flux = FluxLoad { dtype: DType::F32, device: &dev, streamed: &[], gguf: GgufWeights::Quantized, loras: &[] };
    let (model, _) = FluxModel::from_store_with(files.weights, files.axes_dim, &flux).unwrap();
    let vae =
        VaeEncoder::new(&load_vae(&vae_file(&fixture("img2img/ae.safetensors")).unwrap()).unwrap(), DType::F32, &dev)
            .unwrap();
    // The conditioning as generate makes it.
    let init = decode_rgb(&std::fs::read(fixture("img2img/init.png")).unwrap(), "init.png").unwrap();
    let mask = decode_rgb(&std::fs::read(fixture("inpaint/mask.png")).unwrap(), "mask.png").unwrap();
    let pixels = from_rgb8(&init, &dev).unwrap();
    let plane = sampler::mask_plane(&to_luma(&mask), w, h, &dev).unwrap();
    let masked = pixels.broadcast_mul(&plane.affine(-1.0, 1.0).unwrap()).unwrap();
    let masked = sampler::pack(&vae.encode(&masked).unwrap()).unwrap();
    let cond = Tensor::cat(&[&masked, &sampler::fill_mask(&plane).unwrap()], 2).unwrap();
    assert_close("Fill conditioning", &cond, &g["cond"], F32_TOL);
    let image = sampler::pack(&vae.encode(&pixels).unwrap()).unwrap();
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let prompt = Conditioning {
        txt: i2i["pipe.prompt_embeds"].clone(),
        y: i2i["pipe.pooled"].clone(),
        guidance: Some(guidance),
    };
    let (rows, cols) = sampler::token_grid(w, h);
    let ids = img_ids(rows, cols);
    for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
        let mut sigmas = flux_schedule(steps, rows * cols, Shift::DEV);
        sigmas.drain(..sampler::img2img_start(steps, strength).unwrap());
        let start = Start::Image { image: &image, noise: &noise, mask: None };
        let guide = Guide { channels: Some(&cond), ..Guide::prompt(&prompt) };
        let out = sampler::euler(&model, start, &ids, guide, &sigmas, Hooks::none(), &mut |_| {}).unwrap();
        assert_close(&format!("Fill at strength {strength}"), &out, &g[&format!("out.{strength:?}")], F32_TOL);
    }
}
