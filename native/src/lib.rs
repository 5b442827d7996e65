//! # ipaflux (native)
//!
//! The file-system side of ipaflux: finds and memory-maps checkpoints
//! ([`load`]), runs the encoder pipeline with per-stage timings ([`encode`]),
//! the full text + image-prompt pipeline through the memory registry
//! ([`generate`], with the text encoders in [`text`], the VAE in [`vae`] and
//! PNG output in [`png_out`]), the bundled tiny demo ([`demo`]), the CPU
//! benchmarks ([`bench`], [`bench_flux`]) and the memory plan report ([`plan`]).
//! Our own numerics live in `ipaflux-core`; T5, CLIP and the VAE decoder are
//! candle-transformers'; this crate adds IO, timing and the CLI.

pub mod bench;
pub mod bench_flux;
pub mod bench_webgpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod encode;
pub mod generate;
pub mod gpu_check;
pub mod ip_term_plan;
pub mod linear_lt_plan;
pub mod load;
pub mod plan;
pub mod png_out;
pub mod quantize;
pub mod text;
pub mod vae;

use std::path::PathBuf;

/// Errors of the native library: IO with the path that failed, or a core error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    Core(#[from] ipaflux_core::Error),
}

impl From<ipaflux_core::candle_core::Error> for Error {
    fn from(e: ipaflux_core::candle_core::Error) -> Self {
        Self::Core(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which fused CUDA kernels the models run (`--cuda-kernels`); other
/// devices run core's reference path whatever the set. Both sets are checked
/// against the reference path on a GPU by `gpu-check` (`native/src/cuda/NOTES.md`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelSet {
    /// Attention version 6 (32 query rows a warp) writing merged heads (the
    /// IP-Adapter's term added by a second launch's epilogue); Q/K/V with bias, QK norm,
    /// concatenation and RoPE in one pass; the linear layers' biases inside
    /// the gated residuals; LayerNorm + modulation, bias + GELU-tanh. First
    /// run on a GPU in session 11 (H200: the Flux-dev step at 1024² in
    /// 0.54× the baseline's time).
    #[default]
    #[value(alias = "candidate")]
    Fast,
    /// The set measured first (session 7): attention version 3 (`mma`),
    /// LayerNorm + modulation, gated residuals, bias + GELU-tanh; candle's
    /// ops for the rest. Kept to compare against and to fall back on.
    #[value(alias = "checked")]
    Baseline,
}

/// Readies `device` for ipaflux's work; call once, before loading models.
/// CUDA (feature `cuda`): [`cuda::prepare_device`]; other devices: nothing.
pub fn prepare_device(device: &ipaflux_core::candle_core::Device) {
    #[cfg(feature = "cuda")]
    cuda::prepare_device(device);
    let _ = device;
}

/// The attention the models use on `device`: the fused CUDA kernel on a CUDA
/// device when built with `cuda` (it takes bf16/f16 and declines the rest),
/// core's reference path everywhere else.
pub fn attention_for(device: &ipaflux_core::candle_core::Device, set: KernelSet) -> ipaflux_core::nn::Attention {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::fused_attention(set);
    }
    let _ = (device, set);
    ipaflux_core::nn::Attention::reference()
}

/// Attention kernels that could replace the fast set's own on `device`
/// (CUDA: version 7, and versions 7, 6, 4 and 5 with the IP term in their
/// launch; none elsewhere), for `gpu-check` to check and to time the fast
/// step with each.
pub fn fast_attention_variants(
    device: &ipaflux_core::candle_core::Device,
    wgmma: gpu_check::Wgmma,
) -> Vec<ipaflux_core::nn::Attention> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::fast_attention_variants(wgmma);
    }
    let _ = (device, wgmma);
    Vec::new()
}

/// Fused Flux kernels that could replace the fast set's own on `device`
/// (CUDA: the fast set with the MLP products' GELU in their cuBLASLt
/// epilogue; none elsewhere), for `gpu-check` to check through the Flux
/// fixture and to time the fast step with each.
pub fn fast_modulation_variants(
    device: &ipaflux_core::candle_core::Device,
) -> Vec<std::sync::Arc<dyn ipaflux_core::nn::FusedModulation>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return vec![cuda::fused_modulation_linear_lt(KernelSet::Fast)];
    }
    let _ = device;
    Vec::new()
}

/// Linear layers with their bias, GELU or residual in the product that
/// SigLIP could take on `device` (CUDA: cuBLASLt's epilogues; none
/// elsewhere), for `gpu-check` to check through the SigLIP fixture and time.
pub fn fused_linear_variant(
    device: &ipaflux_core::candle_core::Device,
) -> Option<std::sync::Arc<dyn ipaflux_core::nn::FusedLinear>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Some(std::sync::Arc::new(cuda::linear_lt::LinearLt::default()));
    }
    let _ = device;
    None
}

/// The fused LayerNorm + modulation and gated-residual kernels Flux uses on
/// `device`: CUDA's with `cuda` on a CUDA device (bf16/f16; they decline the
/// rest), none elsewhere (the reference ops).
pub fn modulation_for(
    device: &ipaflux_core::candle_core::Device,
    set: KernelSet,
) -> Option<std::sync::Arc<dyn ipaflux_core::nn::FusedModulation>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Some(cuda::fused_modulation(set));
    }
    let _ = (device, set);
    None
}
