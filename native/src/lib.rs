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
pub mod demo;
pub mod encode;
pub mod generate;
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
