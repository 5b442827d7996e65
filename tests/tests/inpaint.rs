//! Inpainting against diffusers' `FluxInpaintPipeline`
//! (tests/reference/make_inpaint_fixtures.py): the packed latent mask from a
//! grayscale mask at the output size and from a smaller RGB one (resized with
//! Lanczos, then its luma), and the final latents at two strengths from the
//! img2img fixtures' init image, noise and embeddings. Tolerance: f32 relative
//! max error ≤ 1e-4; the masks exactly.

use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::{Device, Tensor};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::Hooks;
use ipaflux_core::preprocess::{resize, to_luma, Resample};
use ipaflux_tests::*;

/// The mask file as generate reads it, at `w × h`.
fn mask(name: &str, w: usize, h: usize) -> Tensor {
    let img = fixture_image(&format!("inpaint/{name}.png"));
    let img = if (img.width, img.height) == (w, h) { img } else { resize(&img, w, h, Resample::Lanczos) };
    sampler::latent_mask(&to_luma(&img), w, h, &Device::Cpu).unwrap()
}

#[test]
fn inpainting_matches_diffusers_pipeline() {
    let (g, i2i, r) =
        (tensors("inpaint/golden.safetensors"), tensors("img2img/golden.safetensors"), json("inpaint/reference.json"));
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let pixels = from_rgb8(&fixture_image("img2img/init.png"), &Device::Cpu).unwrap();
    let image = sampler::pack(&tiny_vae_encoder().encode(&pixels).unwrap()).unwrap();
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let ids = run.ids();
    for name in ["mask", "mask-small"] {
        let m = mask(name, run.width, run.height);
        assert_eq!(rel_max_err(&m, &g[&format!("mask.{name}")]), 0.0, "{name}: the latent mask differs");
        for strength in r["strengths"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()) {
            let sigmas = run.sigmas_at(strength);
            let sample = |mask: Option<&Tensor>| {
                let start = Start::Image { image: &image, noise: &noise, mask };
                sampler::euler(&model, start, &ids, Guide::prompt(&prompt), &sigmas, Hooks::none(), &mut |_| {})
                    .unwrap()
            };
            let out = sample(Some(&m));
            let want = &g[&format!("out.{name}.{strength:?}")];
            assert_close(&format!("inpaint {name} at {strength}"), &out, want, F32_TOL);
            // Where the mask keeps, the result is the init image's latents exactly (the last blend).
            let kept =
                (m.affine(-1.0, 1.0).unwrap() * (&out - &image).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(kept.to_scalar::<f32>().unwrap(), 0.0, "{name}: a kept latent moved");
            // Without the mask it is plain image-to-image: far from the inpainted result.
            assert!(rel_max_err(&sample(None), want) > 100.0 * F32_TOL);
        }
    }
}
