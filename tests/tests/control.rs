//! FLUX.1 Canny/Depth ("Control") against diffusers' `FluxControlPipeline`,
//! `FluxControlImg2ImgPipeline` and `FluxControlInpaintPipeline`
//! (tests/reference/make_control_fixtures.py) on a tiny Control transformer:
//! the control image's packed latents as generate makes them (a 40×24 edge
//! map resized to the 96×64 output with Lanczos), and the final latents from
//! noise, from the img2img fixtures' init image, and inpainting with the
//! inpaint fixtures' mask. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux::generate::{control_latents, ImageFile};
use ipaflux::load::flux_config;
use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::{Device, Tensor};
use ipaflux_core::flux::sampler::{self, FluxVariant, Guide, Start};
use ipaflux_core::flux::Hooks;
use ipaflux_core::preprocess::to_luma;
use ipaflux_tests::*;

#[test]
fn control_matches_diffusers_pipelines() {
    let (g, i2i, r) =
        (tensors("control/golden.safetensors"), tensors("img2img/golden.safetensors"), json("control/reference.json"));
    let run = PipelineRun::of(&r);
    let cfg = flux_config(&fixture("control/transformer")).unwrap();
    assert_eq!(FluxVariant::from_in_channels(cfg.in_channels).unwrap(), FluxVariant::Control);
    let model = tiny_flux("control/transformer");
    let vae = tiny_vae_encoder();
    let dev = Device::Cpu;
    let control =
        ImageFile { bytes: std::fs::read(fixture("control/control.png")).unwrap(), name: "control.png".into() };
    let cond = control_latents(&vae, &control, (run.width, run.height), &dev).unwrap();
    assert_close("control latents", &cond, &g["cond"], F32_TOL);

    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let ids = run.ids();
    let sample = |start: Start<'_>, channels: Option<&Tensor>, sigmas: &[f32]| {
        let guide = Guide { channels, ..Guide::prompt(&prompt) };
        sampler::euler(&model, start, &ids, guide, sigmas, Hooks::none(), &mut |_| {}).unwrap()
    };
    let out = sample(Start::Noise(&noise), Some(&cond), &run.sigmas());
    assert_close("Control from noise", &out, &g["out.t2i"], F32_TOL);
    // Without the control latents (zeros in their place) the result is far off.
    let zeros = cond.zeros_like().unwrap();
    assert!(rel_max_err(&sample(Start::Noise(&noise), Some(&zeros), &run.sigmas()), &g["out.t2i"]) > 100.0 * F32_TOL);

    let pixels = from_rgb8(&fixture_image("img2img/init.png"), &dev).unwrap();
    let image = sampler::pack(&vae.encode(&pixels).unwrap()).unwrap();
    let strength = r["strength"].as_f64().unwrap();
    let start = Start::Image { image: &image, noise: &noise, mask: None };
    let out = sample(start, Some(&cond), &run.sigmas_at(strength));
    assert_close(&format!("Control image-to-image at {strength}"), &out, &g["out.img2img"], F32_TOL);

    let strength = r["inpaint_strength"].as_f64().unwrap();
    let mask = sampler::latent_mask(&to_luma(&fixture_image("inpaint/mask.png")), run.width, run.height, &dev).unwrap();
    let start = Start::Image { image: &image, noise: &noise, mask: Some(&mask) };
    let out = sample(start, Some(&cond), &run.sigmas_at(strength));
    assert_close(&format!("Control inpainting at {strength}"), &out, &g["out.inpaint"], F32_TOL);
}
