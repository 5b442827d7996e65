//! The one error type of `ipaflux-core`.
//!
//! Every variant says what was wrong and, where it helps, what to do about it.
//! Errors about an input carry the *name* of that input (a file name given by
//! the caller: core itself never touches files), so a message reads
//! `model.safetensors: truncated ...` rather than a bare `unexpected EOF`.

use std::fmt;

/// A tensor the model expected but the checkpoint lacks, has extra, or has with another shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    Missing { name: String, expected: Vec<usize> },
    Unexpected { name: String, shape: Vec<usize> },
    WrongShape { name: String, expected: Vec<usize>, found: Vec<usize> },
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { name, expected } if expected.is_empty() => write!(f, "missing tensor `{name}`"),
            Self::Missing { name, expected } => write!(f, "missing tensor `{name}` (expected shape {expected:?})"),
            Self::Unexpected { name, shape } => write!(f, "unexpected tensor `{name}` with shape {shape:?}"),
            Self::WrongShape { name, expected, found } => {
                write!(f, "tensor `{name}` has shape {found:?}, expected {expected:?}")
            }
        }
    }
}

/// Lists problems one per line, indented, for [`Error::Checkpoint`].
pub struct ProblemList<'a>(pub &'a [TensorProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config.json that cannot be read as a SigLIP config.
    #[error("{source_name}: not a usable SigLIP config: {reason}")]
    Config { source_name: String, reason: String },

    /// Bytes that do not parse as the checkpoint format they claim to be.
    #[error("{source_name}: not a valid {format} file: {reason}")]
    Format { source_name: String, format: &'static str, reason: String },

    /// A pickle asked for something other than the tensor-rebuild functions.
    #[error(
        "{source_name}: refused to load: the pickle references `{global}`, which is not a tensor-rebuild \
         function. Only plain state dicts of tensors are accepted; nothing from the file was executed"
    )]
    UnsafePickle { source_name: String, global: String },

    /// A tensor whose header was fine but whose bytes could not be read.
    #[error(
        "{source_name}: the bytes of tensor `{name}` could not be read ({reason}); the file may be truncated \
         or changed since it was opened"
    )]
    TensorData { source_name: String, name: String, reason: String },

    /// Checkpoint tensors that do not match the model; all problems at once.
    #[error("{source_name}: {} problem(s) with the checkpoint's tensors:{}", problems.len(), ProblemList(problems))]
    Checkpoint { source_name: String, problems: Vec<TensorProblem> },

    /// Image bytes that cannot be decoded, or an image we refuse to decode.
    #[error("{source_name}: {reason}")]
    Image { source_name: String, reason: String },

    /// A device or dtype name we do not know or were not built with.
    #[error("{0}")]
    Unsupported(String),

    /// A caller passed a tensor of the wrong shape to an API.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A job that does not fit on its device even with every splittable model streamed.
    #[error(
        "stage `{stage}`: {device} cannot run it: it needs at least {} (working memory, stream buffers and \
         unsplittable models) but only {} is usable after the reserve and safety margin. {hint}",
        crate::registry::Bytes(*needed), crate::registry::Bytes(*usable)
    )]
    OutOfMemory { stage: String, device: String, needed: u64, usable: u64, hint: String },

    /// A memory registry call that cannot be honoured (unknown device or model, a cycle, ...).
    #[error("memory registry: {0}")]
    Registry(String),

    /// A LoRA file that cannot be applied to the model it was given for.
    #[error("{source_name}: not a usable Flux LoRA: {reason}")]
    Lora { source_name: String, reason: String },

    /// A plan scenario (built-in name or JSON) that cannot be used.
    #[error("{source_name}: not a usable scenario: {reason}")]
    Scenario { source_name: String, reason: String },

    /// An error from the tensor library during computation.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
