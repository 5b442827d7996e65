//! Depth maps for FLUX.1 Depth: a Depth Anything folder (transformers'
//! layout: depth-anything/Depth-Anything-V2-Small-hf, LiheYoung/depth-anything-large-hf)
//! or an original V2 checkpoint file (`depth_anything_v2_vitl.pth`, as
//! ComfyUI's preprocessor loads it, or a safetensors conversion) read from
//! disk and run by [`ipaflux_core::depth_anything`], each with its own
//! pipeline. `ipaflux depth` and `generate --control-depth` use it.
//!
//! In `generate` the depth model is a registry entry of its own ("depth"),
//! loaded in a stage of its own before the VAE encodes the map, and released
//! after it.

use std::path::{Path, PathBuf};

use ipaflux_core::candle_core::{DType, Device};
use ipaflux_core::depth_anything::{depth_map_u8, original, DepthAnything, DepthAnythingConfig, DepthPreprocessConfig};
use ipaflux_core::preprocess::{decode_rgb, RgbImage};
use ipaflux_core::TensorStore;

use crate::load::{io_err, load_safetensors_in, load_store, read_hf_folder, HfFolder};
use crate::Result;

/// A Depth Anything model's configs and weights (in transformers' names).
pub struct DepthFiles {
    /// The folder or checkpoint file.
    pub path: PathBuf,
    pub config: DepthAnythingConfig,
    pub preprocess: DepthPreprocessConfig,
    pub weights: TensorStore,
}

/// The input size ComfyUI's DepthAnythingV2 preprocessor reads images at.
pub const ORIGINAL_INPUT_SIZE: usize = 518;

/// A folder (or Hugging Face cache entry) in transformers' layout
/// ([`load_depth_dir`]), or an original V2 checkpoint file, `.pth` or
/// safetensors, read with that repository's pipeline at 518 pixels
/// ([`original::convert`]: the file's name says relative or metric).
pub fn load_depth(path: &Path) -> Result<DepthFiles> {
    if !path.is_file() {
        return load_depth_dir(path);
    }
    let store = load_store(path)?;
    if !original::is_original(&store) {
        return Err(io_err(
            path,
            "not an original Depth Anything V2 checkpoint (no `pretrained.*` and `depth_head.*` tensors); for \
             transformers' layout give its folder",
        ));
    }
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (config, weights) = original::convert(store, &file_name)?;
    let preprocess = DepthPreprocessConfig::original(ORIGINAL_INPUT_SIZE);
    Ok(DepthFiles { path: path.to_path_buf(), config, preprocess, weights })
}

/// Reads `config.json`, `preprocessor_config.json` (else Depth Anything's
/// 518-pixel defaults) and `model.safetensors` (or shards) of a folder or
/// Hugging Face cache entry.
pub fn load_depth_dir(dir: &Path) -> Result<DepthFiles> {
    let HfFolder { dir, config, preprocessor } = read_hf_folder(dir)?;
    let config = DepthAnythingConfig::from_hf_json(&config.text, &config.name)?;
    let preprocess = match preprocessor {
        Some(p) => DepthPreprocessConfig::from_hf_json(&p.text, &p.name)?,
        None => DepthPreprocessConfig::depth_anything(),
    };
    let weights = load_safetensors_in(&dir, "model")?;
    Ok(DepthFiles { path: dir, config, preprocess, weights })
}

/// Every tensor against the config, from the headers (all problems at once;
/// DINOv2's unused `mask_token` may be there or not).
pub fn check_tensors(files: &DepthFiles) -> Result<()> {
    let mut expected = files.config.expected_tensors();
    let mask = "backbone.embeddings.mask_token";
    if files.weights.contains(mask) {
        expected.push((mask.to_string(), vec![1, files.config.backbone.hidden_size]));
    }
    Ok(files.weights.validate(&expected)?)
}

/// The bytes the model takes built by [`DepthEstimator::new`] with `dtype`
/// on `device` (f32 for bf16 on the CPU), its registry figure.
pub fn loaded_bytes(files: &DepthFiles, dtype: DType, device: &Device) -> u64 {
    ipaflux_core::weights::loaded_bytes(&files.config.expected_tensors(), crate::model_dtype(dtype, device))
}

/// A depth model ready to read images.
#[derive(Debug)]
pub struct DepthEstimator {
    pub preprocess: DepthPreprocessConfig,
    model: DepthAnything,
}

impl DepthEstimator {
    /// Checks every tensor ([`check_tensors`]), then builds the model (bf16
    /// on the CPU in f32: [`crate::model_dtype`]).
    pub fn new(files: &DepthFiles, dtype: DType, device: &Device) -> Result<Self> {
        check_tensors(files)?;
        let dtype = crate::model_dtype(dtype, device);
        let model = DepthAnything::new(&files.config, files.weights.var_builder(dtype, device))?;
        Ok(Self { preprocess: files.preprocess.clone(), model })
    }

    /// Image bytes → depth at the image's size (`height × width`, f32) and that size.
    pub fn depth(&self, bytes: &[u8], name: &str) -> Result<(Vec<f32>, usize, usize)> {
        let img = decode_rgb(bytes, name)?;
        Ok((self.depth_of(&img, name)?, img.width, img.height))
    }

    /// A decoded image → its depth at its size (`height × width`, f32).
    pub fn depth_of(&self, img: &RgbImage, name: &str) -> Result<Vec<f32>> {
        let (w, h) = self.preprocess.input_size(img.width, img.height);
        tracing::info!(
            image = name,
            width = img.width,
            height = img.height,
            input_width = w,
            input_height = h,
            "estimating depth"
        );
        Ok(self.model.depth(img, &self.preprocess)?)
    }

    /// Pixel values → the model's depth `[B, H, W]` at their size (before resizing back).
    pub fn model_output(
        &self,
        pixels: &ipaflux_core::candle_core::Tensor,
    ) -> Result<ipaflux_core::candle_core::Tensor> {
        Ok(self.model.forward(pixels)?)
    }

    /// Image bytes → the 8-bit depth map (near is bright), at the image's size.
    pub fn depth_map(&self, bytes: &[u8], name: &str) -> Result<(Vec<u8>, usize, usize)> {
        let img = decode_rgb(bytes, name)?;
        Ok((self.map_of(&img, name)?, img.width, img.height))
    }

    /// A decoded image → its 8-bit depth map (near is bright; [`depth_map_u8`]).
    pub fn map_of(&self, img: &RgbImage, name: &str) -> Result<Vec<u8>> {
        Ok(depth_map_u8(&self.depth_of(img, name)?, self.model.kind()))
    }
}
