//! True classifier-free guidance against diffusers' `FluxPipeline`
//! (`true_cfg_scale` with negative prompt embeddings; tests/reference/make_cfg_fixtures.py)
//! on the tiny Flux: the same start latents, embeddings and schedule give the
//! pipeline's final latents. Tolerance: f32 relative max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::load::load_flux;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, img_ids, Guide, Start};
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights, Hooks};
use ipaflux_core::schedule::{flux_schedule, Shift};
use ipaflux_tests::*;

#[test]
fn true_cfg_matches_diffusers_pipeline() {
    let g: HashMap<String, Tensor> =
        ipaflux_core::candle_core::safetensors::load(fixture("cfg/golden.safetensors"), &Device::Cpu).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cfg/reference.json")).unwrap()).unwrap();
    let (steps, guidance) = (r["steps"].as_u64().unwrap() as usize, r["guidance"].as_f64().unwrap() as f32);
    let (w, h) = (r["image"][0].as_u64().unwrap() as usize, r["image"][1].as_u64().unwrap() as usize);
    let dev = Device::Cpu;
    let files = load_flux(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let load = FluxLoad { dtype: DType::F32, device: &dev, streamed: &[], gguf: GgufWeights::Quantized, loras: &[] };
    let (model, _) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &load).unwrap();
    let cond = |txt: &str, y: &str| Conditioning { txt: g[txt].clone(), y: g[y].clone(), guidance: Some(guidance) };
    let (positive, negative) = (cond("prompt_embeds", "pooled"), cond("negative_prompt_embeds", "negative_pooled"));
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
    let mut outs = Vec::new();
    for scale in r["scales"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32) {
        // diffusers runs the negative pass only above 1.
        let guide = if scale > 1.0 {
            Guide { negative: Some((&negative, scale)), ..Guide::prompt(&positive) }
        } else {
            Guide::prompt(&positive)
        };
        let out = run(guide);
        assert_close(&format!("true CFG {scale}"), &out, &g[&format!("out.{scale:?}")], F32_TOL);
        outs.push(out);
    }
    // The guidance moves the result well past the tolerance: the negative pass is tested.
    assert!(rel_max_err(&outs[0], &outs[1]) > 100.0 * F32_TOL);
    // Scale 1 with a negative prompt is the prompt alone, up to rounding.
    let one = run(Guide { negative: Some((&negative, 1.0)), ..Guide::prompt(&positive) });
    assert_close("true CFG 1 with a negative prompt", &one, &g["out.1.0"], F32_TOL);
}
