//! # ipaflux (native)
//!
//! The file-system side of ipaflux: finds and memory-maps checkpoints
//! ([`load`]), runs the encoder pipeline with per-stage timings ([`encode`]),
//! the full text + image-prompt pipeline through the memory registry
//! ([`generate`], with the text encoders in [`text`], the VAE in [`vae`] and
//! PNG output in [`png_out`]), the bundled tiny demo ([`demo`]), the CPU
//! benchmarks ([`bench`], [`bench_flux`]) and the memory plan report ([`plan`]).
//! Our own numerics live in `ipaflux-core`; T5, CLIP and the VAE's encoder
//! and decoder are candle-transformers'; this crate adds IO, timing and the CLI.

pub mod bench;
pub mod bench_flux;
pub mod bench_webgpu;
pub mod clip_vision;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod demo;
pub mod depth;
pub mod encode;
pub mod generate;
pub mod gpu_check;
pub mod inspect;
pub mod ip_term_plan;
pub mod linear_lt_plan;
pub mod load;
pub mod pipeline_check;
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

/// The dtype to build a model with convolutions in on `device`: `dtype`,
/// except bf16 on the CPU, which becomes f32 (candle's CPU convolutions
/// multiply with a gemm that has no bf16 path; its plain matmul widens bf16
/// itself, so the text encoders, Flux and SigLIP's linear layers need none of this).
pub fn model_dtype(
    dtype: ipaflux_core::candle_core::DType,
    device: &ipaflux_core::candle_core::Device,
) -> ipaflux_core::candle_core::DType {
    use ipaflux_core::candle_core::DType;
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
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

/// Kernels that could replace the default set's own, for `gpu-check` to
/// check through the fixtures and to time; both empty where this build has
/// none for the device. With CUDA both take their products from one
/// cuBLASLt handle and workspace ([`cuda::linear_lt::LinearLt`]).
#[derive(Default)]
pub struct LinearVariants {
    /// Flux: the fast set with the MLP products' bias and GELU in their
    /// cuBLASLt epilogue.
    pub modulation: Vec<std::sync::Arc<dyn ipaflux_core::nn::FusedModulation>>,
    /// SigLIP: linear layers with their bias, GELU or residual in the product.
    pub linear: Option<std::sync::Arc<dyn ipaflux_core::nn::FusedLinear>>,
}

/// [`LinearVariants`] on `device`.
pub fn linear_variants(device: &ipaflux_core::candle_core::Device) -> LinearVariants {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let lt = std::sync::Arc::new(cuda::linear_lt::LinearLt::default());
        return LinearVariants {
            modulation: vec![cuda::fused_modulation_linear_lt(KernelSet::Fast, lt.clone())],
            linear: Some(lt),
        };
    }
    let _ = device;
    LinearVariants::default()
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
