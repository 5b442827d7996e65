//! FLUX.1 Kontext against diffusers' `FluxKontextPipeline`
//! (tests/reference/make_kontext_fixtures.py): the reference image's tokens
//! after the latents' on the tiny Flux give the pipeline's final latents, and
//! the preferred-resolution choice is the pipeline's. Tolerance: f32 relative
//! max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::load::{load_flux, load_vae, vae_file};
use ipaflux::vae::{from_rgb8, VaeEncoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::kontext::{preferred_size, reference_ids};
use ipaflux_core::flux::sampler::{self, img_ids, Guide, Start};
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights, Hooks};
use ipaflux_core::preprocess::decode_rgb;
use ipaflux_core::schedule::{flux_schedule, Shift};
use ipaflux_tests::*;

fn load(rel: &str) -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

#[test]
fn kontext_matches_diffusers_pipeline() {
    let (g, i2i) = (load("kontext/golden.safetensors"), load("img2img/golden.safetensors"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("kontext/reference.json")).unwrap()).unwrap();
    for case in r["auto_resize"].as_array().unwrap() {
        let v: Vec<usize> = case.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(preferred_size(v[0], v[1]), (v[2], v[3]), "{}×{}", v[0], v[1]);
    }
    let (steps, guidance) = (r["steps"].as_u64().unwrap() as usize, r["guidance"].as_f64().unwrap() as f32);
    let (w, h) = (r["image"][0].as_u64().unwrap() as usize, r["image"][1].as_u64().unwrap() as usize);
    let dev = Device::Cpu;
    let files = load_flux(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let flux = FluxLoad { dtype: DType::F32, device: &dev, streamed: &[], gguf: GgufWeights::Quantized, loras: &[] };
    let (model, _) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &flux).unwrap();
    let vae =
        VaeEncoder::new(&load_vae(&vae_file(&fixture("img2img/ae.safetensors")).unwrap()).unwrap(), DType::F32, &dev)
            .unwrap();
    let image = decode_rgb(&std::fs::read(fixture("img2img/init.png")).unwrap(), "init.png").unwrap();
    let tokens = sampler::pack(&vae.encode(&from_rgb8(&image, &dev).unwrap()).unwrap()).unwrap();
    let ref_ids = reference_ids(image.height / 16, image.width / 16);
    let prompt = Conditioning {
        txt: i2i["pipe.prompt_embeds"].clone(),
        y: i2i["pipe.pooled"].clone(),
        guidance: Some(guidance),
    };
    let (rows, cols) = sampler::token_grid(w, h);
    let sigmas = flux_schedule(steps, rows * cols, Shift::DEV);
    let run = |guide: Guide<'_>| {
        sampler::euler(
            &model,
            Start::Noise(&g["latents"]),
            &img_ids(rows, cols),
            guide,
            &sigmas,
            Hooks::none(),
            &mut |_| {},
        )
        .unwrap()
    };
    let out = run(Guide { reference: Some((&tokens, &ref_ids)), ..Guide::prompt(&prompt) });
    assert_eq!(out.dims(), &[1, rows * cols, 64], "the reference tokens' output is dropped");
    assert_close("Kontext", &out, &g["out"], F32_TOL);
    // The reference moves the result well past the tolerance, and its positions matter.
    assert!(rel_max_err(&run(Guide::prompt(&prompt)), &g["out"]) > 100.0 * F32_TOL);
    let at_zero: Vec<[f32; 3]> = ref_ids.iter().map(|p| [0.0, p[1], p[2]]).collect();
    let moved = run(Guide { reference: Some((&tokens, &at_zero)), ..Guide::prompt(&prompt) });
    assert!(rel_max_err(&moved, &g["out"]) > 100.0 * F32_TOL);
}
