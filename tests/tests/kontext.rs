//! FLUX.1 Kontext against diffusers' `FluxKontextPipeline`
//! (tests/reference/make_kontext_fixtures.py): the reference image's tokens
//! after the latents' on the tiny Flux give the pipeline's final latents, and
//! the preferred-resolution choice is the pipeline's. Tolerance: f32 relative
//! max error ≤ 1e-4.

use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::Device;
use ipaflux_core::flux::kontext::{preferred_size, reference_ids};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::Hooks;
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
