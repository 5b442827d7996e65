//! The one error type of `ipaflux-gpu`.

/// Everything that can go wrong on the WebGPU path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No WebGPU/Vulkan/Metal/DX12 adapter: the caller should fall back to the CPU.
    #[error("no GPU adapter available ({0}); use the CPU path instead")]
    NoAdapter(String),
    /// The adapter refused a device with the limits we need.
    #[error("the GPU adapter refused a device: {0}")]
    Device(String),
    /// A buffer could not be allocated: the GPU (or the browser's share of it) is full.
    #[error("out of GPU memory while {what}; free other models or choose a smaller weight format (q8, q4)")]
    OutOfMemory { what: String },
    /// The memory registry refused weights past the page's GPU budget (nothing was uploaded).
    #[error(
        "the SigLIP weights need {needed} of GPU memory in {format}, more than the {budget} budget; \
         raise the GPU budget or choose a smaller format (q8, q4)"
    )]
    OverBudget {
        needed: ipaflux_core::registry::Bytes,
        budget: ipaflux_core::registry::Bytes,
        format: crate::WeightFormat,
    },
    /// A tensor larger than one buffer may be on this adapter, and not splittable.
    #[error("{what} needs a {bytes}-byte buffer, larger than this adapter allows ({limit} bytes)")]
    TooLarge { what: String, bytes: u64, limit: u64 },
    /// A WebGPU validation error: a bug in a kernel or its dispatch.
    #[error("WebGPU rejected {what}: {message}")]
    Validation { what: String, message: String },
    /// Reading results back from the GPU failed.
    #[error("reading results from the GPU failed: {0}")]
    Readback(String),
    /// Shapes that do not fit an operation.
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// A pre-quantized checkpoint asked to load in another format.
    #[error(
        "these weights are pre-quantized to {stored} (by `ipaflux quantize`); load them as {stored}, \
         or load the original checkpoint to use {requested}"
    )]
    FormatMismatch { stored: crate::WeightFormat, requested: crate::WeightFormat },
    /// An error from the model code or the checkpoint (same message as on the CPU).
    #[error(transparent)]
    Core(#[from] ipaflux_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Self::Core(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
