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

/// The attention the models use on `device`: the fused CUDA kernel on a CUDA
/// device when built with `cuda` (it takes bf16/f16 and declines the rest),
/// core's reference path everywhere else.
pub fn attention_for(device: &ipaflux_core::candle_core::Device) -> ipaflux_core::nn::Attention {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::fused_attention();
    }
    let _ = device;
    ipaflux_core::nn::Attention::reference()
}

/// The fused LayerNorm + modulation and gated-residual kernels Flux uses on
/// `device`: CUDA's with `cuda` on a CUDA device (bf16/f16; they decline the
/// rest), none elsewhere (the reference ops).
pub fn modulation_for(
    device: &ipaflux_core::candle_core::Device,
) -> Option<std::sync::Arc<dyn ipaflux_core::nn::FusedModulation>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Some(cuda::fused_modulation());
    }
    let _ = device;
    None
}
