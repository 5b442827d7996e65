//! The SigLIP encoder on WebGPU: WGSL compute kernels run through wgpu, in the
//! browser (WebGPU) and natively (Vulkan, Metal, DX12; Mesa lavapipe in CI).
//!
//! What it does:
//! - [`GpuContext`]: adapter and device setup, apart from any GPU work.
//! - [`kernels`]: one folder per kernel with its `.wgsl` — tiled matmul with
//!   bias over f32, f16 or block-quantized (q8, q4) weights dequantized in the
//!   shader; LayerNorm; GELU (tanh, erf); residual and broadcast adds;
//!   softmax attention; the patch embedding's unfold.
//! - [`WgpuOps`]: `ipaflux-core`'s [`VisionOps`](ipaflux_core::ops::VisionOps)
//!   on those kernels, so the SigLIP model code of core runs here unchanged
//!   ([`GpuEncoder`]).
//! - [`quant`] (re-exported from `ipaflux-core`, where pre-quantized files are
//!   read): the weight formats and their host-side (de)quantisation; weights
//!   stored pre-quantized by `ipaflux quantize` are uploaded as stored.
//! - [`WebGpuMemory`]: the registry's memory device for WebGPU, which keeps its
//!   own byte count (WebGPU cannot report free memory); [`webgpu_registry`]
//!   and [`reserve_encoder`] put the encoder's predicted bytes through the
//!   registry before uploading, so a page's budget is enforced up front.
//!
//! What it does not: file or network IO (callers pass bytes), the projection
//! and IP processors (they stay on candle), or anything without an adapter —
//! the CPU fallback is core's candle path.

pub mod bench;
mod context;
mod encoder;
mod error;
pub mod kernels;
mod memory;
mod ops;
pub mod parity;
pub use ipaflux_core::quant;
mod tensor;

pub use context::{AdapterSummary, GpuContext, GpuOptions};
pub use encoder::GpuEncoder;
pub use error::{Error, Result};
pub use memory::{reserve_encoder, webgpu_registry, WebGpuMemory, DEFAULT_WEBGPU_BUDGET};
pub use ops::{GpuLinear, GpuNorm, WgpuOps};
pub use quant::WeightFormat;
pub use tensor::GpuTensor;

/// The native adapter for tests, once per test. `None` (test skipped, said on
/// stderr) when the machine has none, unless `IPAFLUX_REQUIRE_GPU` is set — CI
/// sets it, so on CI a missing adapter (no Mesa lavapipe) fails the tests.
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
#[allow(clippy::panic)] // test support: a required adapter that is missing must fail the test run
pub fn test_context() -> Option<std::rc::Rc<GpuContext>> {
    match GpuContext::new_blocking(&GpuOptions::default()) {
        Ok(ctx) => Some(std::rc::Rc::new(ctx)),
        Err(e) if std::env::var_os("IPAFLUX_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED: no wgpu adapter ({e}); set IPAFLUX_REQUIRE_GPU=1 to make this an error");
            None
        }
        Err(e) => {
            panic!("IPAFLUX_REQUIRE_GPU is set but there is no wgpu adapter: {e}")
        }
    }
}
