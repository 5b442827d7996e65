//! What the native binary adds on CUDA (feature `cuda`): the fused attention
//! kernels ([`attention`]), fused LayerNorm + modulation and gated residuals
//! ([`modulation`]), the IP-Adapter's term by cuBLAS ([`ip_term`]), the MLP
//! products with GELU in their cuBLASLt epilogue ([`linear_lt`]),
//! pinned-memory offload ([`pinned`]), the memory pool's
//! cache and the registry device that accounts for it ([`pool`]), Flux block
//! streaming from pinned memory with prefetch on a second stream
//! ([`stream`]) and the CUDA-only sections of the GPU check ([`check`]). All
//! are exercised on a GPU by `ipaflux gpu-check` (`scripts/gpu-check.sh`);
//! this module compiles without a GPU (`cargo xtask cuda-check`).

pub mod attention;
pub mod check;
pub mod graph;
pub mod ip_term;
pub mod linear_lt;
pub mod modulation;
pub mod pinned;
pub mod pool;
pub mod stream;

use std::sync::Arc;

use ipaflux_core::candle_core::Device;
use ipaflux_core::nn::Attention;

/// Switches off cudarc's automatic cross-stream event tracking for the
/// device's context. With it on, every allocation creates two CUDA events
/// and, once a second stream exists, every launch waits on and records them;
/// ipaflux orders its only second stream ([`stream`]) with explicit events,
/// so the tracking is pure overhead. Affects allocations made from now on.
pub fn explicit_stream_ordering(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: candle runs all work on the device's one stream; the block
        // stream's copies are ordered by its own events (see `stream`).
        unsafe { d.disable_event_tracking() };
    }
}

/// Readies a CUDA device before any model is loaded: cross-stream event
/// tracking off ([`explicit_stream_ordering`]) and the memory pool keeping
/// freed memory between synchronisations
/// ([`pool::keep_freed_memory`]: a sampler's steps reuse
/// their activations' memory instead of mapping it afresh each step; the
/// registry's [`release_cached`](ipaflux_core::registry::Registry::release_cached)
/// hands it back between stages). Other devices: nothing.
/// A driver whose pool cannot be set keeps CUDA's default (a warning: only
/// speed is lost).
pub fn prepare_device(device: &Device) {
    explicit_stream_ordering(device);
    if let Device::Cuda(d) = device {
        match pool::keep_freed_memory(d.cuda_stream().context()) {
            Ok(()) => {
                tracing::debug!(target: "ipaflux::registry", "CUDA memory pool keeps freed memory until released")
            }
            Err(e) => tracing::warn!(target: "ipaflux::registry", "CUDA memory pool left at its default: {e}"),
        }
    }
}

/// The fused CUDA attention wherever it applies (bf16/f16, head size ≤ 128):
/// with the fast set version 6 (32 rows a warp, `cp.async` double-buffered)
/// with its merged-heads epilogue, the IP-Adapter's term in a second launch
/// (faster than its `_ip` entry; `attention` module docs); with the
/// baseline set version 3 (`mma`).
pub fn fused_attention(set: crate::KernelSet) -> Attention {
    use attention::{Kernel, Output};
    match set {
        crate::KernelSet::Fast => fused_attention_with(Kernel::MmaTwoTiles, Output::Merged),
        crate::KernelSet::Baseline => fused_attention_with(Kernel::Mma, Output::Heads),
    }
}

/// The fused CUDA attention with a given kernel version and output.
pub fn fused_attention_with(kernel: attention::Kernel, output: attention::Output) -> Attention {
    Attention::fused(Arc::new(attention::CudaFusedAttention { kernel, output }))
}

/// Fused LayerNorm + modulation and gated residuals (bf16/f16) for Flux's
/// blocks, and with the fast set the QKV and bias kernels.
pub fn fused_modulation(set: crate::KernelSet) -> Arc<dyn ipaflux_core::nn::FusedModulation> {
    Arc::new(modulation::CudaModulation { set, linear: None })
}

/// [`fused_modulation`] with the MLP products' bias and GELU in their
/// epilogue by cuBLASLt ([`linear_lt`]): a `gpu-check` variant until a GPU
/// run has timed it. `linear` may be shared with other layers (one handle
/// and workspace).
pub fn fused_modulation_linear_lt(
    set: crate::KernelSet,
    linear: Arc<linear_lt::LinearLt>,
) -> Arc<dyn ipaflux_core::nn::FusedModulation> {
    Arc::new(modulation::CudaModulation { set, linear: Some(linear) })
}

/// What the fast set's attention could be instead, for `gpu-check`:
/// versions 8 and 7 as the fast set takes version 6 (the IP-Adapter's term
/// in a second launch), then versions 8, 7 and 6 with the term in the same
/// launch, then version 6 with the term by cuBLAS ([`ip_term`]). (Versions 4 and 5 with the term in the launch were timed in
/// session 11 and lost to version 6; each variant costs a full Flux-dev
/// setup and step in the GPU run's time.) `wgmma`: which of version 8's.
pub fn fast_attention_variants(wgmma: crate::gpu_check::Wgmma) -> Vec<Attention> {
    use attention::{Kernel, Output};
    let separate = [Kernel::Wgmma, Kernel::MmaTwoTilesStaged].map(|kernel| (kernel, Output::Merged));
    let fused_extra = [Kernel::Wgmma, Kernel::MmaTwoTilesStaged, Kernel::MmaTwoTiles]
        .map(|kernel| (kernel, Output::MergedFusedExtra));
    // The fast set's own kernel with the IP-Adapter's term by cuBLAS (`ip_term`).
    let gemm_ip = (!matches!(wgmma, crate::gpu_check::Wgmma::Only)).then(|| {
        let inner = Arc::new(attention::CudaFusedAttention { kernel: Kernel::MmaTwoTiles, output: Output::Merged });
        let name = "cuda-fused (version 6; merged-heads epilogue; IP term by cuBLAS + softmax kernel)";
        Attention::fused(Arc::new(ip_term::GemmSmallKeys::new(inner, name)))
    });
    separate
        .into_iter()
        .chain(fused_extra)
        .filter(|&(kernel, _)| wgmma_wanted(kernel, wgmma))
        .map(|(kernel, output)| fused_attention_with(kernel, output))
        .chain(gemm_ip)
        .collect()
}

/// Whether `kernel` runs under `wgmma` ([`crate::gpu_check::Wgmma`]).
pub fn wgmma_wanted(kernel: attention::Kernel, wgmma: crate::gpu_check::Wgmma) -> bool {
    use crate::gpu_check::Wgmma;
    match wgmma {
        Wgmma::Include => true,
        Wgmma::Exclude => kernel != attention::Kernel::Wgmma,
        Wgmma::Only => kernel == attention::Kernel::Wgmma,
    }
}
