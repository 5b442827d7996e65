//! # ipaflux-tests
//!
//! Golden parity of ipaflux against the upstream PyTorch code on the tiny
//! fixtures in `tests/fixtures/` (made by `tests/reference/make_fixtures.py`).
//! This library holds the shared helpers: fixture paths and error metrics,
//! and what the diffusers-pipeline goldens share (the tiny Flux and VAE
//! encoder loaded in f32, a golden run's steps, guidance and size).

use std::path::PathBuf;

use ipaflux_core::candle_core::{DType, Device, Tensor};

/// f32 tolerance: relative max error (see [`rel_max_err`]).
pub const F32_TOL: f32 = 1e-4;
/// bf16 tolerance: relative max error.
pub const BF16_TOL: f32 = 2e-2;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// All tensors of `golden.safetensors`.
pub fn golden() -> std::collections::HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("golden.safetensors"), &Device::Cpu).expect("golden fixtures")
}

/// `max |ours − reference| / max |reference|`: the metric all tolerances refer to.
pub fn rel_max_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let a = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = reference.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    diff / scale
}

/// Asserts `rel_max_err ≤ tol` with a readable message.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let e = rel_max_err(ours, reference);
    assert!(e <= tol, "{what}: relative max error {e:.3e} > tolerance {tol:.0e}");
    eprintln!("{what}: relative max error {e:.3e} (tolerance {tol:.0e})");
}

/// Tensors of a fixture safetensors file.
pub fn tensors(rel: &str) -> std::collections::HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture tensors")
}

/// A fixture's JSON (a golden's `reference.json`).
pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("fixture JSON")).expect("valid JSON")
}

/// A decoded fixture image.
pub fn fixture_image(rel: &str) -> ipaflux_core::preprocess::RgbImage {
    let bytes = std::fs::read(fixture(rel)).expect("fixture image");
    ipaflux_core::preprocess::decode_rgb(&bytes, rel).expect("decodable image")
}

/// A tiny Flux fixture (a BFL file or a diffusers folder) in f32 on the CPU;
/// RoPE axes from its config, else the tiny Flux's (4, 6, 6).
pub fn tiny_flux(rel: &str) -> ipaflux_core::flux::FluxModel {
    tiny_flux_with(rel, &[])
}

/// [`tiny_flux`] with `loras` applied as it loads.
pub fn tiny_flux_with(rel: &str, loras: &[ipaflux_core::flux::FluxLora]) -> ipaflux_core::flux::FluxModel {
    use ipaflux_core::flux::{FluxLoad, FluxModel, GgufWeights};
    let files = ipaflux::load::load_flux(&fixture(rel)).expect("tiny Flux");
    let load = FluxLoad { dtype: DType::F32, device: &Device::Cpu, streamed: &[], gguf: GgufWeights::Quantized, loras };
    let axes = files.axes_dim.or(Some(vec![4, 6, 6]));
    FluxModel::from_store_with(files.weights, axes, &load).expect("tiny Flux loads").0
}

/// The whole tiny VAE's encoder (`img2img/ae.safetensors`), f32.
pub fn tiny_vae_encoder() -> ipaflux::vae::VaeEncoder {
    let store = ipaflux::load::load_store(&fixture("img2img/ae.safetensors")).expect("tiny VAE");
    ipaflux::vae::VaeEncoder::new(&store, DType::F32, &Device::Cpu).expect("tiny VAE encoder")
}

/// XLabs' fixture CLIP image encoder (`xlabs/image_encoder`), f32 on the CPU.
pub fn xlabs_clip() -> ipaflux::clip_vision::ClipImageEncoder {
    let files = ipaflux::clip_vision::load_clip_vision_dir(&fixture("xlabs/image_encoder")).expect("tiny CLIP");
    ipaflux::clip_vision::ClipImageEncoder::new(&files, DType::F32, &Device::Cpu).expect("tiny CLIP builds")
}

/// XLabs' fixture IP-Adapter (`xlabs/ip_adapter.safetensors`), f32 on the CPU.
pub fn xlabs_adapter() -> ipaflux_core::flux::XlabsIpAdapter {
    let store = ipaflux::load::load_store(&fixture("xlabs/ip_adapter.safetensors")).expect("tiny XLabs adapter");
    ipaflux_core::flux::XlabsIpAdapter::from_store(&store, DType::F32, &Device::Cpu).expect("XLabs adapter builds")
}

/// XLabs' fixture adapter reading images/photo.jpg with its CLIP, as a hook
/// at `scale` for the tiny Flux of `cfg` (the pipelines' `ip_adapter_image`).
pub fn xlabs_photo_hook(cfg: &ipaflux_core::flux::FluxConfig, scale: f64) -> ipaflux_core::flux::XlabsHook {
    use ipaflux_core::flux::ip::{IpHookConfig, IpImage, IpWeight};
    let (clip, adapter) = (xlabs_clip(), xlabs_adapter());
    let photo = std::fs::read(fixture("images/photo.jpg")).expect("photo.jpg");
    let embeds = clip.image_embeds(&clip.pixels(&photo, "photo.jpg").expect("pixels")).expect("image_embeds");
    let kv = adapter.kv_all(&adapter.project(&embeds).expect("projection"), cfg.head_dim()).expect("K/V");
    let hook_cfg = IpHookConfig { weight: IpWeight::Constant(scale), ..IpHookConfig::default() };
    ipaflux_core::flux::XlabsHook::new(vec![IpImage { kv, weight: 1.0 }], hook_cfg, cfg).expect("XLabs hook")
}

/// What a diffusers-pipeline golden ran: its `reference.json`'s `steps`,
/// `guidance` and output `image` size, with FLUX.1-dev's shifted schedule.
pub struct PipelineRun {
    pub steps: usize,
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
}

impl PipelineRun {
    pub fn of(reference: &serde_json::Value) -> Self {
        let n = |v: &serde_json::Value| v.as_u64().expect("a count") as usize;
        Self {
            steps: n(&reference["steps"]),
            guidance: reference["guidance"].as_f64().expect("guidance") as f32,
            width: n(&reference["image"][0]),
            height: n(&reference["image"][1]),
        }
    }

    /// Token rows and columns of the output.
    pub fn grid(&self) -> (usize, usize) {
        ipaflux_core::flux::sampler::token_grid(self.width, self.height)
    }

    /// The output's token positions.
    pub fn ids(&self) -> Vec<[f32; 3]> {
        let (rows, cols) = self.grid();
        ipaflux_core::flux::sampler::img_ids(rows, cols)
    }

    /// All `steps + 1` sigmas, FLUX.1-dev's shift at the output's size.
    pub fn sigmas(&self) -> Vec<f32> {
        let (rows, cols) = self.grid();
        ipaflux_core::schedule::flux_schedule(self.steps, rows * cols, ipaflux_core::schedule::Shift::DEV)
    }

    /// The sigmas image-to-image runs at `strength`.
    pub fn sigmas_at(&self, strength: f64) -> Vec<f32> {
        let mut sigmas = self.sigmas();
        sigmas.drain(..ipaflux_core::flux::sampler::img2img_start(self.steps, strength).expect("a strength in (0, 1]"));
        sigmas
    }

    /// A prompt's conditioning at this run's guidance.
    pub fn cond(&self, txt: &Tensor, y: &Tensor) -> ipaflux_core::flux::Conditioning {
        ipaflux_core::flux::Conditioning { txt: txt.clone(), y: y.clone(), guidance: Some(self.guidance) }
    }
}
