//! # ipaflux-core
//!
//! Image-prompt conditioning for FLUX.1 (the InstantX IP-Adapter), shared by
//! the native binary and the browser build.
//!
//! What it does: parses checkpoints from bytes ([`weights`]: safetensors,
//! sharded or not, and PyTorch zip pickles read without executing code),
//! reads Hugging Face configs ([`config`]), turns image bytes into SigLIP
//! pixel values exactly as transformers does ([`preprocess`]), runs the
//! SigLIP vision tower with its pooling head ([`siglip`]), the MLP projection
//! and the IP attention math ([`ip_adapter`]), the Flux transformer with its
//! typed attention hooks, the IP-Adapter hook and Euler sampling ([`flux`]),
//! and the Flux schedule ([`schedule`]); OpenCV's Canny edges for FLUX.1
//! Canny's control images ([`canny`]); Depth Anything's depth maps for
//! FLUX.1 Depth's ([`depth_anything`]); and the weight formats of the WebGPU
//! path with pre-quantized checkpoints ([`quant`]).
//!
//! What it does not do: no file or network IO (callers pass bytes), no global
//! state, nothing platform-specific — it builds for `wasm32-unknown-unknown`.
//! The memory [`registry`] decides where every model's weights live; it
//! accounts and plans, and callers move the tensors. Text encoders and the
//! VAE are used from candle-transformers by the native crate.

pub mod canny;
pub mod config;
pub mod depth_anything;
pub mod device;
pub mod error;
pub mod flux;
pub mod ip_adapter;
pub mod jpeg;
pub mod kernels;
pub mod nn;
pub mod ops;
pub mod preprocess;
pub mod quant;
pub mod registry;
pub mod schedule;
pub mod siglip;
pub mod weights;

pub use config::{ClipPreprocessConfig, ClipVisionConfig, PreprocessConfig, SiglipVisionConfig};
pub use device::{DeviceSpec, Precision};
pub use error::{Error, Result};
pub use ip_adapter::{IpAdapter, IpAdapterDims, IpAttentionConfig, IpKv, VNorm};
pub use siglip::SiglipVisionModel;
pub use weights::TensorStore;

/// Re-exported so callers build tensors with the same candle version.
pub use candle_core;
pub use candle_nn;
