//! FLUX.1 Fill against diffusers' `FluxFillPipeline`
//! (tests/reference/make_fill_fixtures.py) on a tiny Fill transformer: the
//! per-token conditioning (masked image latents and 8×8 mask) from the
//! img2img fixtures' init image and the inpainting mask, and the final
//! latents at two strengths. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux::load::flux_config;
use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::{Device, Tensor};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::Hooks;
use ipaflux_core::preprocess::to_luma;
use ipaflux_tests::*;

#[test]
fn fill_matches_diffusers_pipeline() {
    let (g, i2i, r) =
        (tensors("fill/golden.safetensors"), tensors("img2img/golden.safetensors"), json("fill/reference.json"));
    let run = PipelineRun::of(&r);
    let cfg = flux_config(&fixture("fill/transformer")).unwrap();
    assert_eq!((cfg.in_channels, cfg.out_channels), (64 + sampler::FILL_CONDITION_CHANNELS, 64));
    let model = tiny_flux("fill/transformer");
    let vae = tiny_vae_encoder();
    // The conditioning as generate makes it.
    let dev = Device::Cpu;
    let pixels = from_rgb8(&fixture_image("img2img/init.png"), &dev).unwrap();
    let plane = sampler::mask_plane(&to_luma(&fixture_image("inpaint/mask.png")), run.width, run.height, &dev).unwrap();
    let masked = pixels.broadcast_mul(&plane.affine(-1.0, 1.0).unwrap()).unwrap();
    let masked = sampler::pack(&vae.encode(&masked).unwrap()).unwrap();
    let cond = Tensor::cat(&[&masked, &sampler::fill_mask(&plane).unwrap()], 2).unwrap();
    assert_close("Fill conditioning", &cond, &g["cond"], F32_TOL);
    let image = sampler::pack(&vae.encode(&pixels).unwrap()).unwrap();
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let ids = run.ids();
    for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
        let start = Start::Image { image: &image, noise: &noise, mask: None };
        let guide = Guide { channels: Some(&cond), ..Guide::prompt(&prompt) };
        let sigmas = run.sigmas_at(strength);
        let out = sampler::euler(&model, start, &ids, guide, &sigmas, Hooks::none(), &mut |_| {}).unwrap();
        assert_close(&format!("Fill at strength {strength}"), &out, &g[&format!("out.{strength:?}")], F32_TOL);
    }
}
