//! CLIP's vision tower with its projection (transformers'
//! `CLIPVisionModelWithProjection`): image bytes → `CLIPImageProcessor`
//! pixels ([`ipaflux_core::preprocess::clip_pixel_values`]) → the CLS
//! token after `post_layernorm` → `visual_projection` → `image_embeds`.
//! XLabs' Flux IP-Adapter reads images with it (openai/clip-vit-large-patch14).
//! The transformer itself is candle-transformers' `ClipVisionTransformer`.
//!
//! Reads a Hugging Face folder holding a vision-only checkpoint
//! (`CLIPVisionModelWithProjection`, e.g. an `image_encoder/` folder) or a
//! whole CLIP (its text tower is left unread).

use std::path::{Path, PathBuf};

use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig as CandleConfig, ClipVisionTransformer};
use ipaflux_core::candle_core::{DType, Device, Module, Tensor};
use ipaflux_core::preprocess::{clip_pixel_values, decode_rgb};
use ipaflux_core::{ClipPreprocessConfig, ClipVisionConfig, TensorStore};

use crate::load::{load_safetensors_in, read_hf_folder, HfFolder};
use crate::{Error, Result};

/// A CLIP folder's configs and weights.
pub struct ClipVisionFiles {
    pub dir: PathBuf,
    pub config: ClipVisionConfig,
    pub preprocess: ClipPreprocessConfig,
    pub weights: TensorStore,
}

/// Reads `config.json`, `preprocessor_config.json` (else CLIP's defaults at
/// the model's image size, as diffusers) and `model.safetensors` (or shards)
/// of a folder; or a single file without them (ComfyUI's
/// `clip_vision_l.safetensors`: sizes from its shapes, CLIP's preprocessing).
pub fn load_clip_vision_dir(dir: &Path) -> Result<ClipVisionFiles> {
    if dir.is_file() {
        let weights = crate::load::load_store(dir)?;
        let config = ClipVisionConfig::from_store(&weights)?;
        let preprocess = ClipPreprocessConfig::clip(config.image_size);
        return Ok(ClipVisionFiles { dir: dir.to_path_buf(), config, preprocess, weights });
    }
    let HfFolder { dir, config, preprocessor } = read_hf_folder(dir)?;
    let config = ClipVisionConfig::from_hf_json(&config.text, &config.name)?;
    let preprocess = match preprocessor {
        Some(p) => ClipPreprocessConfig::from_hf_json(&p.text, &p.name)?,
        None => ClipPreprocessConfig::clip(config.image_size),
    };
    let weights = load_safetensors_in(&dir, "model")?;
    Ok(ClipVisionFiles { dir, config, preprocess, weights })
}

/// Every vision tensor a checkpoint must hold for `cfg`, with its shape.
fn expected_tensors(cfg: &ClipVisionConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
    let e = "vision_model.embeddings";
    let mut v = vec![
        (format!("{e}.class_embedding"), vec![h]),
        (format!("{e}.patch_embedding.weight"), vec![h, 3, cfg.patch_size, cfg.patch_size]),
        (format!("{e}.position_embedding.weight"), vec![positions, h]),
        ("visual_projection.weight".to_string(), vec![cfg.projection_dim, h]),
    ];
    for ln in ["vision_model.pre_layrnorm", "vision_model.post_layernorm"] {
        v.push((format!("{ln}.weight"), vec![h]));
        v.push((format!("{ln}.bias"), vec![h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("vision_model.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
            v.push((format!("{p}.self_attn.{proj}.bias"), vec![h]));
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            v.push((format!("{p}.{ln}.weight"), vec![h]));
            v.push((format!("{p}.{ln}.bias"), vec![h]));
        }
        v.push((format!("{p}.mlp.fc1.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.fc1.bias"), vec![i]));
        v.push((format!("{p}.mlp.fc2.weight"), vec![h, i]));
        v.push((format!("{p}.mlp.fc2.bias"), vec![h]));
    }
    v
}

/// Bytes the vision tower and projection take loaded in `dtype` (a whole CLIP's text tower not counted).
pub fn clip_vision_bytes(cfg: &ClipVisionConfig, dtype: DType) -> u64 {
    let params: usize = expected_tensors(cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    (params * dtype.size_in_bytes()) as u64
}

/// Refuses an XLabs adapter whose projection does not take this CLIP's `image_embeds`.
pub fn check_xlabs_fits(dims: &ipaflux_core::flux::XlabsDims, adapter: &str, clip: &ClipVisionConfig) -> Result<()> {
    if dims.embed_dim != clip.projection_dim {
        return Err(ipaflux_core::Error::Shape(format!(
            "{adapter}: the XLabs IP-Adapter takes {}-wide CLIP image_embeds but the CLIP model gives {} (XLabs' \
             adapters use openai/clip-vit-large-patch14)",
            dims.embed_dim, clip.projection_dim
        ))
        .into());
    }
    Ok(())
}

/// The CLIP image encoder, ready to read images.
pub struct ClipImageEncoder {
    pub config: ClipVisionConfig,
    pub preprocess: ClipPreprocessConfig,
    tower: ClipVisionTransformer,
    projection: ipaflux_core::candle_nn::Linear,
    dtype: DType,
    device: Device,
}

impl ClipImageEncoder {
    /// Checks every tensor against `files.config` (a missing class embedding
    /// would otherwise be made up at random), then builds the tower.
    pub fn new(files: &ClipVisionFiles, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = crate::model_dtype(dtype, device);
        let cfg = &files.config;
        files.weights.validate(&expected_tensors(cfg))?;
        if cfg.layer_norm_eps != 1e-5 {
            return Err(Error::from(ipaflux_core::Error::Unsupported(format!(
                "{}: layer_norm_eps {} (candle's CLIP uses 1e-5)",
                files.dir.display(),
                cfg.layer_norm_eps
            ))));
        }
        let candle_cfg = CandleConfig {
            embed_dim: cfg.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            projection_dim: cfg.projection_dim,
            num_channels: 3,
            image_size: cfg.image_size,
            patch_size: cfg.patch_size,
        };
        let vb = files.weights.var_builder(dtype, device);
        let tower = ClipVisionTransformer::new(vb.pp("vision_model"), &candle_cfg)?;
        let projection =
            ipaflux_core::candle_nn::linear_no_bias(cfg.hidden_size, cfg.projection_dim, vb.pp("visual_projection"))?;
        Ok(Self {
            config: cfg.clone(),
            preprocess: files.preprocess.clone(),
            tower,
            projection,
            dtype,
            device: device.clone(),
        })
    }

    /// Image bytes → pixel values `[1, 3, H, W]` on the encoder's device, in its dtype.
    pub fn pixels(&self, bytes: &[u8], name: &str) -> Result<Tensor> {
        let img = decode_rgb(bytes, name)?;
        tracing::info!(image = name, width = img.width, height = img.height, "CLIP encoding image");
        Ok(clip_pixel_values(&img, &self.preprocess)?.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Pixel values → `image_embeds` `[B, projection_dim]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.tower.forward(&pixels.to_dtype(self.dtype)?)?;
        Ok(self.projection.forward(&pooled)?)
    }
}
