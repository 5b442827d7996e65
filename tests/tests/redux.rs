//! FLUX.1 Redux against diffusers (tests/reference/make_redux_fixtures.py):
//! SigLIP's token sequence of a photo as `FluxPriorReduxPipeline.encode_image`
//! computes it, the Redux embedder's tokens in both checkpoint layouts, and
//! `FluxPipeline`'s final latents with those tokens after the prompt's.
//! Tolerance: f32 relative max error ≤ 1e-4.

use std::collections::HashMap;

use ipaflux::encode::ImageEncoder;
use ipaflux::load::{load_siglip_dir, load_store, redux_file};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{append_image_tokens, Hooks, ReduxImageEncoder};
use ipaflux_core::Precision;
use ipaflux_tests::*;

fn gold() -> HashMap<String, Tensor> {
    tensors("redux/golden.safetensors")
}

fn redux(rel: &str) -> ReduxImageEncoder {
    let store = load_store(&redux_file(&fixture(rel)).unwrap()).unwrap();
    ReduxImageEncoder::from_store(&store, DType::F32, &Device::Cpu).unwrap()
}

/// SigLIP's tokens of images/photo.jpg, read as generate reads a Redux image.
fn siglip_tokens() -> Tensor {
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let enc = ImageEncoder::new(&files.config, files.preprocess, files.weights, Precision::F32, Device::Cpu).unwrap();
    let bytes = std::fs::read(fixture("images/photo.jpg")).unwrap();
    enc.siglip.last_hidden_state(&enc.pixels(&bytes, "photo.jpg").unwrap()).unwrap()
}

#[test]
fn redux_tokens_match_diffusers_in_both_layouts() {
    let g = gold();
    let tokens = siglip_tokens();
    assert_close("SigLIP last_hidden_state", &tokens, &g["siglip_tokens"], F32_TOL);
    let file = redux("redux/flux1-redux-tiny.safetensors");
    assert_eq!((file.dims.siglip_dim, file.dims.hidden, file.dims.context_dim), (32, 192, 64));
    let ours = file.forward(&g["siglip_tokens"]).unwrap();
    assert_close("Redux tokens", &ours, &g["tokens"], F32_TOL);
    // The FLUX.1-Redux-dev repo layout (image_embedder/) holds the same names.
    assert!(redux_file(&fixture("redux")).unwrap().ends_with("image_embedder/diffusion_pytorch_model.safetensors"));
    let folder = redux("redux").forward(&g["siglip_tokens"]).unwrap();
    assert_eq!(rel_max_err(&folder, &ours), 0.0);
    // Another checkpoint is refused with what it lacks.
    let store = load_store(&fixture("ip-adapter.safetensors")).unwrap();
    let e = ReduxImageEncoder::from_store(&store, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("redux_up.weight"), "{e}");
}

#[test]
fn sampling_with_redux_tokens_matches_diffusers_pipeline() {
    let (g, r) = (gold(), json("redux/reference.json"));
    let run = PipelineRun::of(&r);
    let model = tiny_flux("flux/flux-tiny-bfl.safetensors");
    let tokens = redux("redux/flux1-redux-tiny.safetensors").forward(&siglip_tokens()).unwrap();
    let txt = append_image_tokens(&g["prompt_embeds"], &[(tokens, r["strength"].as_f64().unwrap())]).unwrap();
    assert_eq!(txt.dims(), &[1, 7 + 729, 64]);
    let (ids, sigmas) = (run.ids(), run.sigmas());
    let sample = |txt: &Tensor| {
        let prompt = run.cond(txt, &g["pooled"]);
        sampler::euler(
            &model,
            Start::Noise(&g["latents"]),
            &ids,
            Guide::prompt(&prompt),
            &sigmas,
            Hooks::none(),
            &mut |_| {},
        )
        .unwrap()
    };
    let out = sample(&txt);
    assert_close("Flux with Redux tokens", &out, &g["out"], F32_TOL);
    // The tokens move the result well past the tolerance.
    assert!(rel_max_err(&sample(&g["prompt_embeds"]), &g["out"]) > 100.0 * F32_TOL);
}
