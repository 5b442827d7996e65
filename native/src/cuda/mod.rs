//! What the native binary adds on CUDA (feature `cuda`): the fused attention
//! kernel ([`attention`]), pinned-memory offload ([`pinned`]) and the
//! CUDA-only sections of the GPU check ([`check`]). Both are
//! exercised on a GPU by `ipaflux gpu-check` (`scripts/gpu-check.sh`); this
//! module compiles without a GPU (`cargo xtask cuda-check`).
//!
//! Not here yet: block streaming of Flux weights with prefetch on a second
//! stream (the registry plans it; no owner executes it on CUDA yet).

pub mod attention;
pub mod check;
pub mod pinned;

use std::sync::Arc;

use ipaflux_core::nn::Attention;

/// The fused CUDA attention wherever it applies (bf16/f16, head size ≤ 128).
pub fn fused_attention() -> Attention {
    Attention::fused(Arc::new(attention::CudaFusedAttention))
}
