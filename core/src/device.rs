//! Where computation runs and in which precision.
//!
//! [`DeviceSpec`] is the *name* of a compute device in one canonical form
//! (`cpu`, `cuda:0`, ...): parsing `cuda` and `cuda:0` gives the same value, so
//! two spellings can never become two memory pools. This crate can run on the
//! CPU; other backends are added by features (see ARCHITECTURE.md).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A compute device, by canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    Cpu,
    /// An NVIDIA GPU by ordinal. Only usable in builds with CUDA support.
    Cuda(usize),
    /// A WebGPU adapter by ordinal (the browser build; natively through wgpu).
    WebGpu(usize),
}

impl DeviceSpec {
    /// The candle device for this spec, or a clear error when this build cannot drive it.
    pub fn to_candle(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(i) => Device::new_cuda(i).map_err(|e| Error::Unsupported(format!("device cuda:{i}: {e}"))),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(i) => Err(Error::Unsupported(format!(
                "device cuda:{i} is not available: this build of ipaflux has no CUDA support (build with \
                 `--features cuda`); use --device cpu"
            ))),
            Self::WebGpu(i) => Err(Error::Unsupported(format!(
                "device webgpu:{i} has no candle backend; WebGPU runs through the web build's own kernels"
            ))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::WebGpu(i) => write!(f, "webgpu:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, index) = match lower.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (lower.as_str(), None),
        };
        let ordinal = |i: Option<&str>| -> Result<usize> {
            match i {
                None => Ok(0),
                Some(i) => {
                    i.parse().map_err(|_| Error::Unsupported(format!("device `{s}`: `{i}` is not a device number")))
                }
            }
        };
        match kind {
            "cpu" if ordinal(index)? == 0 => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(ordinal(index)?)),
            "webgpu" | "wgpu" => Ok(Self::WebGpu(ordinal(index)?)),
            _ => Err(Error::Unsupported(format!("unknown device `{s}`; expected `cpu`, `cuda[:N]` or `webgpu[:N]`"))),
        }
    }
}

/// Floating-point precision for weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(Error::Unsupported(format!("unknown dtype `{s}`; expected f32, f16 or bf16"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_canonical() {
        assert_eq!("cuda".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cuda(0)));
        assert_eq!("CUDA:0".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse::<DeviceSpec>().ok().map(|d| d.to_string()), Some("cuda:1".into()));
        assert_eq!("cpu".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Cpu));
        assert!("cpu:1".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!("webgpu".parse::<DeviceSpec>().ok().map(|d| d.to_string()), Some("webgpu:0".into()));
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_without_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).to_candle().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("no CUDA support"), "{err}");
    }

    /// With `cuda`: a device the machine lacks (no GPU, or no 100th one) is
    /// an error naming it, whatever the driver says.
    #[test]
    #[cfg(feature = "cuda")]
    fn a_missing_cuda_device_is_an_error_naming_it() {
        let err = DeviceSpec::Cuda(99).to_candle().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("device cuda:99"), "{err}");
    }

    #[test]
    fn precision_parses() {
        assert_eq!("bf16".parse::<Precision>().ok(), Some(Precision::Bf16));
        assert_eq!("F32".parse::<Precision>().ok(), Some(Precision::F32));
        assert!("f64".parse::<Precision>().is_err());
    }
}
