//! True classifier-free guidance against diffusers' `FluxPipeline`
//! (`true_cfg_scale` with negative prompt embeddings; tests/reference/make_cfg_fixtures.py)
//! on the tiny Flux: the same start latents, embeddings and schedule give the
//! pipeline's final latents. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::Hooks;
use ipaflux_tests::*;

#[test]
fn true_cfg_matches_diffusers_pipeline() {
    let (g, r) = (tensors("cfg/golden.safetensors"), json("cfg/reference.json"));
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let positive = run.cond(&g["prompt_embeds"], &g["pooled"]);
    let negative = run.cond(&g["negative_prompt_embeds"], &g["negative_pooled"]);
    let (ids, sigmas) = (run.ids(), run.sigmas());
    let sample = |guide: Guide<'_>| {
        sampler::euler(&model, Start::Noise(&g["latents"]), &ids, guide, &sigmas, Hooks::none(), &mut |_| {}).unwrap()
    };
    let mut outs = Vec::new();
    for scale in r["scales"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32) {
        // diffusers runs the negative pass only above 1.
        let guide = if scale > 1.0 {
            Guide { negative: Some((&negative, scale)), ..Guide::prompt(&positive) }
        } else {
            Guide::prompt(&positive)
        };
        let out = sample(guide);
        assert_close(&format!("true CFG {scale}"), &out, &g[&format!("out.{scale:?}")], F32_TOL);
        outs.push(out);
    }
    // The guidance moves the result well past the tolerance: the negative pass is tested.
    assert!(rel_max_err(&outs[0], &outs[1]) > 100.0 * F32_TOL);
    // Scale 1 with a negative prompt is the prompt alone, up to rounding.
    let one = sample(Guide { negative: Some((&negative, 1.0)), ..Guide::prompt(&positive) });
    assert_close("true CFG 1 with a negative prompt", &one, &g["out.1.0"], F32_TOL);
}
