//! `ipaflux quantize`: a smaller copy of a SigLIP checkpoint, with the linear
//! layers' weights stored in f16, q8 or q4 (the formats the WebGPU kernels
//! read, [`ipaflux_core::quant`]), for the browser to download instead of the
//! f32/bf16 original.
//!
//! The output folder is a SigLIP folder like the input (`config.json`,
//! `preprocessor_config.json` if there was one, `model.safetensors`), loadable
//! by every ipaflux encoder: the WebGPU path uploads the packed weights as
//! they are; the CPU path dequantizes them as it loads. An f16 output is an
//! ordinary safetensors checkpoint (transformers loads it too).

use std::path::{Path, PathBuf};

use ipaflux_core::quant::{quantize_checkpoint, WeightFormat};
use ipaflux_core::siglip::{expected_tensors, linear_weights, siglip_tensor_name};

use crate::load::load_siglip_dir;
use crate::{Error, Result};

/// What [`quantize_siglip`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub out_dir: PathBuf,
    pub format: WeightFormat,
    /// Bytes of the input tensors, as stored.
    pub in_bytes: u64,
    /// Bytes of the written `model.safetensors`.
    pub out_bytes: u64,
    /// Linear weights stored in `format`.
    pub linear: usize,
    /// Tensors in the output.
    pub tensors: usize,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Reads the SigLIP folder `src`, writes the quantized folder `out`
/// (created if missing; an existing `model.safetensors` there is replaced
/// only once the new one is complete). `progress(done, total)` is called
/// per tensor.
pub fn quantize_siglip(
    src: &Path,
    out: &Path,
    format: WeightFormat,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    let files = load_siglip_dir(src)?;
    let (src_dir, cfg) = (files.dir.clone(), files.config.clone());
    if out.exists() && std::fs::canonicalize(out).ok() == std::fs::canonicalize(&src_dir).ok() {
        return Err(io_err(out, "is the input folder; choose another output folder so the original stays"));
    }
    let store = files.weights.filter_rename(siglip_tensor_name);
    if let Some(stored) = store.quantized_format() {
        return Err(io_err(
            &src_dir,
            format!("is already quantized ({stored}); quantize the original checkpoint instead"),
        ));
    }
    store.validate(&expected_tensors(&cfg))?;
    let in_bytes = store.nbytes() as u64;
    // Names as transformers' SiglipVisionModel has them, so an f16 output loads there too.
    let mut named: Vec<(String, &ipaflux_core::candle_core::Tensor)> = Vec::with_capacity(store.len());
    for n in store.names() {
        if let Some(t) = store.get(n)? {
            named.push((format!("vision_model.{n}"), t));
        }
    }
    let linear: Vec<String> = linear_weights(&cfg).into_iter().map(|n| format!("vision_model.{n}")).collect();
    let total = named.len();
    let bytes = quantize_checkpoint(named.iter().map(|(n, t)| (n.as_str(), *t)), &linear, format, |i, _| {
        progress(i + 1, total)
    })?;

    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let target = out.join("model.safetensors");
    let partial = out.join("model.safetensors.partial");
    std::fs::write(&partial, &bytes).map_err(|e| io_err(&partial, e))?;
    std::fs::rename(&partial, &target).map_err(|e| io_err(&target, e))?;
    for name in ["config.json", "preprocessor_config.json"] {
        let from = src_dir.join(name);
        if from.exists() {
            std::fs::copy(&from, out.join(name)).map_err(|e| io_err(&out.join(name), e))?;
        }
    }
    tracing::info!(format = %format, in_bytes, out_bytes = bytes.len(), out = %target.display(), "siglip quantized");
    let tensors = ipaflux_core::weights::TensorStore::from_safetensors(&bytes, &target.display().to_string())?.len();
    Ok(QuantizeReport {
        out_dir: out.to_path_buf(),
        format,
        in_bytes,
        out_bytes: bytes.len() as u64,
        linear: linear.len(),
        tensors,
    })
}
