//! FLUX.1 Canny/Depth ("Control") against diffusers' `FluxControlPipeline`,
//! `FluxControlImg2ImgPipeline` and `FluxControlInpaintPipeline`
//! (tests/reference/make_control_fixtures.py) on a tiny Control transformer:
//! the control image's packed latents as generate makes them (a 40×24 edge
//! map resized to the 96×64 output with Lanczos), and the final latents from
//! noise, from the img2img fixtures' init image, and inpainting with the
//! inpaint fixtures' mask; and a FLUX.1 Canny/Depth LoRA (BFL's layout and
//! diffusers' names) on the plain tiny Flux against the same pipeline with
//! diffusers' `load_lora_weights`. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux::generate::control_latents;
use ipaflux::load::{flux_config, load_flux, load_lora};
use ipaflux::vae::from_rgb8;
use ipaflux_core::candle_core::{Device, Tensor};
use ipaflux_core::flux::lora::input_channels;
use ipaflux_core::flux::sampler::{self, FluxVariant, Guide, Start};
use ipaflux_core::flux::{BlockId, FluxLoad, FluxModel, GgufWeights, Hooks, HostBlocks};
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
    let control = fixture_image("control/control.png");
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

/// The control fixture's latents and a sampler over them: the golden's noise,
/// prompt and schedule, from noise.
fn control_t2i(model: &FluxModel) -> Tensor {
    let (i2i, r) = (tensors("img2img/golden.safetensors"), json("control/reference.json"));
    let run = PipelineRun::of(&r);
    let control = fixture_image("control/control.png");
    let cond = control_latents(&tiny_vae_encoder(), &control, (run.width, run.height), &Device::Cpu).unwrap();
    let noise = sampler::pack(&i2i["pipe.noise"]).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    let guide = Guide { channels: Some(&cond), ..Guide::prompt(&prompt) };
    sampler::euler(model, Start::Noise(&noise), &run.ids(), guide, &run.sigmas(), Hooks::none(), &mut |_| {}).unwrap()
}

#[test]
fn control_loras_match_diffusers_in_both_namings() {
    let (g, r) = (tensors("control/lora-golden.safetensors"), json("control/reference.json"));
    let strength = r["lora_strength"].as_f64().unwrap();
    let base = "flux/flux-tiny-bfl.safetensors";
    let cfg = flux_config(&fixture(base)).unwrap();
    assert_eq!(FluxVariant::from_in_channels(cfg.in_channels).unwrap(), FluxVariant::Base);
    for (file, biased) in [("control/lora-bfl.safetensors", 9), ("control/lora-peft.safetensors", 14)] {
        let lora = load_lora(&fixture(file), &cfg, strength).unwrap();
        assert_eq!((lora.input_channels(), lora.replaced(), lora.with_bias()), (Some(128), 14, biased), "{file}");
        let loras = [lora];
        let widened = input_channels(&loras, cfg.in_channels);
        assert_eq!(FluxVariant::from_in_channels(widened).unwrap(), FluxVariant::Control);
        let out = control_t2i(&tiny_flux_with(base, &loras));
        assert_close(&format!("Control LoRA {file}"), &out, &g["out.t2i"], F32_TOL);
        // Blocks streamed get the same changes (merged when the model loads).
        let streamed = [BlockId::Double(0), BlockId::Single(0), BlockId::Single(2)];
        let load = FluxLoad {
            dtype: ipaflux_core::candle_core::DType::F32,
            device: &Device::Cpu,
            streamed: &streamed,
            gguf: GgufWeights::Quantized,
            loras: &loras,
        };
        let files = load_flux(&fixture(base)).unwrap();
        let (mut model, kept) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &load).unwrap();
        model.set_block_source(std::sync::Arc::new(
            HostBlocks::new(kept, &streamed, &Device::Cpu, &Device::Cpu).unwrap(),
        ));
        assert_close(&format!("Control LoRA {file}, blocks streamed"), &control_t2i(&model), &g["out.t2i"], F32_TOL);
    }
}

#[test]
fn a_control_lora_on_a_gguf_flux_widens_its_quantized_input() {
    // The GGUF file's weights differ from the golden's (quantized), so the
    // check is between its two ways of holding them, with the LoRA applied.
    let base = "flux/flux-tiny-bfl.gguf";
    let cfg = flux_config(&fixture(base)).unwrap();
    let loras = [load_lora(&fixture("control/lora-bfl.safetensors"), &cfg, 1.0).unwrap()];
    let run = |gguf| {
        let load = FluxLoad {
            dtype: ipaflux_core::candle_core::DType::F32,
            device: &Device::Cpu,
            streamed: &[],
            gguf,
            loras: &loras,
        };
        let files = load_flux(&fixture(base)).unwrap();
        control_t2i(&FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &load).unwrap().0)
    };
    let (kept, dense) = (run(GgufWeights::Quantized), run(GgufWeights::Dequantized));
    assert_close("GGUF kept vs dequantized, with a Control LoRA", &kept, &dense, 1e-5);
}
