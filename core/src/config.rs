//! Model configurations: SigLIP's vision tower and its image preprocessing.
//!
//! Read from the Hugging Face JSON files (`config.json`,
//! `preprocessor_config.json`) given as text; core never opens files. The
//! IP-Adapter's dimensions are *not* configured here: they are inferred from
//! the checkpoint's tensor shapes (see [`crate::ip_adapter::IpAdapterDims`]).

use serde::Deserialize;

use crate::error::{Error, Result};

/// Hyper-parameters of the SigLIP vision transformer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Whether the attention-pooling head exists (transformers' `vision_use_head`).
    #[serde(default = "defaults::vision_use_head")]
    pub vision_use_head: bool,
}

/// transformers' `SiglipVisionConfig` defaults, used for keys a config.json omits.
mod defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        16
    }
    pub fn hidden_act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-6
    }
    pub fn vision_use_head() -> bool {
        true
    }
}

impl SiglipVisionConfig {
    /// google/siglip-so400m-patch14-384, the encoder of the InstantX IP-Adapter.
    pub fn so400m_patch14_384() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 384,
            patch_size: 14,
            hidden_act: defaults::hidden_act(),
            layer_norm_eps: defaults::layer_norm_eps(),
            vision_use_head: true,
        }
    }

    /// Reads a Hugging Face `config.json`: either a full `SiglipModel`
    /// (`model_type: siglip`, vision settings under `vision_config`) or a
    /// vision-only `siglip_vision_model`. `source_name` names the file in errors.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let err = |reason: String| Error::Config { source_name: source_name.to_string(), reason };
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let vision = match model_type {
            "siglip" => value
                .get("vision_config")
                .cloned()
                .ok_or_else(|| err("model_type is `siglip` but there is no `vision_config`".into()))?,
            "siglip_vision_model" => value,
            "" if value.get("vision_config").is_some() => value.get("vision_config").cloned().unwrap_or_default(),
            other => {
                return Err(err(format!(
                    "model_type `{other}` is not SigLIP; expected `siglip` or `siglip_vision_model`"
                )))
            }
        };
        let cfg: Self = serde_json::from_value(vision).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        // 384 / 14 is not whole: like the stride-14 convolution, the last pixels are dropped.
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(format!("image_size {} is smaller than patch_size {}", self.image_size, self.patch_size));
        }
        if !matches!(self.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu_new" | "gelu" | "gelu_fast") {
            return Err(format!("hidden_act `{}` is not supported", self.hidden_act));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
}

/// How an image becomes pixel values: transformers' `SiglipImageProcessor` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub height: usize,
    pub width: usize,
    pub rescale_factor: f32,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl PreprocessConfig {
    /// The settings google/siglip-so400m-patch14-384 ships, at the given square size.
    pub fn siglip(image_size: usize) -> Self {
        Self {
            height: image_size,
            width: image_size,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }

    /// Reads a `preprocessor_config.json`. Only what SigLIP uses is supported:
    /// resize of the whole image with bicubic (resample 3), rescale, normalize.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Size {
            height: usize,
            width: usize,
        }
        #[derive(Deserialize)]
        struct Raw {
            size: Option<Size>,
            resample: Option<u32>,
            rescale_factor: Option<f32>,
            image_mean: Option<[f32; 3]>,
            image_std: Option<[f32; 3]>,
            do_resize: Option<bool>,
            do_rescale: Option<bool>,
            do_normalize: Option<bool>,
        }
        let err = |reason: String| Error::Config { source_name: source_name.to_string(), reason };
        let raw: Raw = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if raw.resample.is_some_and(|r| r != 3) {
            return Err(err(format!("resample {:?} is not supported; only bicubic (3) is", raw.resample)));
        }
        if raw.do_resize == Some(false) || raw.do_rescale == Some(false) || raw.do_normalize == Some(false) {
            return Err(err("do_resize, do_rescale and do_normalize must all be on for SigLIP".into()));
        }
        let size = raw.size.unwrap_or(Size { height: 384, width: 384 });
        let base = Self::siglip(384);
        Ok(Self {
            height: size.height,
            width: size.width,
            rescale_factor: raw.rescale_factor.unwrap_or(base.rescale_factor),
            image_mean: raw.image_mean.unwrap_or(base.image_mean),
            image_std: raw.image_std.unwrap_or(base.image_std),
        })
    }
}

/// CLIP's vision tower config (`CLIPVisionConfig`), from a
/// `clip_vision_model` `config.json` or a whole `clip` one (its
/// `vision_config`); transformers omits values equal to its defaults when it
/// saves, so those defaults (ViT-B/32's) fill the gaps.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    /// `visual_projection`'s width: the `image_embeds` size (768 for ViT-L/14).
    pub projection_dim: usize,
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Reads a Hugging Face `config.json`; only `quick_gelu` (every OpenAI CLIP) is supported.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let err = |reason: String| Error::Config { source_name: source_name.to_string(), reason };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        let (vision, top_projection) = match v["model_type"].as_str() {
            Some("clip") => (&v["vision_config"], v["projection_dim"].as_u64()),
            Some("clip_vision_model") => (&v, None),
            other => return Err(err(format!("model_type {other:?} is not CLIP (`clip` or `clip_vision_model`)"))),
        };
        let n = |key: &str, default: usize| vision[key].as_u64().map_or(default, |x| x as usize);
        if let Some(act) = vision["hidden_act"].as_str().filter(|a| *a != "quick_gelu") {
            return Err(err(format!("hidden_act `{act}` is not supported; OpenAI's CLIP uses quick_gelu")));
        }
        let cfg = Self {
            hidden_size: n("hidden_size", 768),
            intermediate_size: n("intermediate_size", 3072),
            num_hidden_layers: n("num_hidden_layers", 12),
            num_attention_heads: n("num_attention_heads", 12),
            image_size: n("image_size", 224),
            patch_size: n("patch_size", 32),
            projection_dim: vision["projection_dim"].as_u64().or(top_projection).map_or(512, |x| x as usize),
            layer_norm_eps: vision["layer_norm_eps"].as_f64().unwrap_or(1e-5),
        };
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 || cfg.num_attention_heads == 0 {
            return Err(err(format!("image size {} and patch size {} do not tile", cfg.image_size, cfg.patch_size)));
        }
        Ok(cfg)
    }
}

impl ClipVisionConfig {
    /// Sizes read from a checkpoint's shapes, for a file without its
    /// `config.json` (ComfyUI's `clip_vision_l.safetensors`): everything but the
    /// head count is in the shapes; that is taken as OpenAI's (64-wide heads),
    /// and wider towers (OpenCLIP's ViT-H and bigG, which also use GELU) are refused.
    pub fn from_store(store: &crate::weights::TensorStore) -> Result<Self> {
        let err = |reason: String| Error::Config { source_name: store.source_name.clone(), reason };
        let dim = |name: &str, axis: usize| {
            store
                .shape(name)
                .and_then(|s| s.get(axis).copied())
                .ok_or_else(|| err(format!("no `{name}`: not a CLIP vision checkpoint in transformers' names")))
        };
        let e = "vision_model.embeddings";
        let hidden = dim(&format!("{e}.class_embedding"), 0)?;
        if hidden % 64 != 0 || hidden > 1024 {
            return Err(err(format!(
                "a {hidden}-wide CLIP's head count is not in its weights: give its folder with config.json"
            )));
        }
        let patch = dim(&format!("{e}.patch_embedding.weight"), 2)?;
        let positions = dim(&format!("{e}.position_embedding.weight"), 0)?;
        let grid = (1..=positions).find(|g| g * g + 1 >= positions).unwrap_or(0);
        if grid * grid + 1 != positions {
            return Err(err(format!("{positions} positions are not a square grid plus the class token")));
        }
        let layers = (0..)
            .take_while(|i| store.contains(&format!("vision_model.encoder.layers.{i}.layer_norm1.weight")))
            .count();
        Ok(Self {
            hidden_size: hidden,
            intermediate_size: dim("vision_model.encoder.layers.0.mlp.fc1.weight", 0)?,
            num_hidden_layers: layers,
            num_attention_heads: hidden / 64,
            image_size: grid * patch,
            patch_size: patch,
            projection_dim: dim("visual_projection.weight", 0)?,
            layer_norm_eps: 1e-5,
        })
    }
}

/// transformers' `CLIPImageProcessor` (its PIL backend): resize the shortest
/// edge (bicubic), centre crop, rescale, normalize.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessConfig {
    pub shortest_edge: usize,
    pub crop_height: usize,
    pub crop_width: usize,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ClipPreprocessConfig {
    /// OpenAI CLIP's mean and std at `image_size` (what diffusers makes when a folder has no preprocessor file).
    pub fn clip(image_size: usize) -> Self {
        Self {
            shortest_edge: image_size,
            crop_height: image_size,
            crop_width: image_size,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }

    /// Reads a `preprocessor_config.json` of a `CLIPImageProcessor`.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let err = |reason: String| Error::Config { source_name: source_name.to_string(), reason };
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if v["resample"].as_u64().is_some_and(|r| r != 3) {
            return Err(err(format!("resample {} is not supported; only bicubic (3) is", v["resample"])));
        }
        for flag in ["do_resize", "do_center_crop", "do_rescale", "do_normalize"] {
            if v[flag].as_bool() == Some(false) {
                return Err(err(format!("{flag} false is not supported")));
            }
        }
        let size = |x: &serde_json::Value| x.as_u64().map(|x| x as usize);
        // `size` is {"shortest_edge": N} (or a bare N in old files); `crop_size` {"height", "width"} or N.
        let edge = size(&v["size"]["shortest_edge"]).or(size(&v["size"])).unwrap_or(224);
        let (crop_h, crop_w) = match (size(&v["crop_size"]["height"]), size(&v["crop_size"]["width"])) {
            (Some(h), Some(w)) => (h, w),
            _ => size(&v["crop_size"]).map_or((224, 224), |c| (c, c)),
        };
        if crop_h > edge || crop_w > edge {
            return Err(err(format!("a {crop_w}×{crop_h} crop of a {edge}-pixel shortest edge would need padding")));
        }
        let triple = |x: &serde_json::Value, default: [f32; 3]| -> [f32; 3] {
            match x.as_array().map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect::<Vec<_>>()) {
                Some(a) if a.len() == 3 => [a[0] as f32, a[1] as f32, a[2] as f32],
                _ => default,
            }
        };
        let base = Self::clip(edge);
        Ok(Self {
            shortest_edge: edge,
            crop_height: crop_h,
            crop_width: crop_w,
            rescale_factor: v["rescale_factor"].as_f64().unwrap_or(base.rescale_factor),
            image_mean: triple(&v["image_mean"], base.image_mean),
            image_std: triple(&v["image_std"], base.image_std),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_configs_fill_transformers_defaults() {
        let full = r#"{"model_type":"clip","projection_dim":768,"vision_config":{"hidden_size":1024,
            "intermediate_size":4096,"num_attention_heads":16,"num_hidden_layers":24,"patch_size":14}}"#;
        let cfg = ClipVisionConfig::from_hf_json(full, "config.json").unwrap();
        assert_eq!((cfg.hidden_size, cfg.image_size, cfg.patch_size, cfg.projection_dim), (1024, 224, 14, 768));
        let bad = ClipVisionConfig::from_hf_json(r#"{"model_type":"siglip"}"#, "c.json").unwrap_err();
        assert!(bad.to_string().contains("not CLIP"), "{bad}");
        let gelu = r#"{"model_type":"clip_vision_model","hidden_act":"gelu"}"#;
        assert!(ClipVisionConfig::from_hf_json(gelu, "c.json").unwrap_err().to_string().contains("quick_gelu"));
        let pre = r#"{"crop_size":{"height":224,"width":224},"size":{"shortest_edge":224},"resample":3}"#;
        assert_eq!(ClipPreprocessConfig::from_hf_json(pre, "p.json").unwrap(), ClipPreprocessConfig::clip(224));
        let old = r#"{"crop_size":224,"size":224}"#;
        assert_eq!(ClipPreprocessConfig::from_hf_json(old, "p.json").unwrap(), ClipPreprocessConfig::clip(224));
        // A single file: wider towers than OpenAI's name what to give instead.
        let mut vit_h = crate::weights::TensorStore::new("clip_vision_h.safetensors");
        let t = candle_core::Tensor::zeros(1280, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        vit_h.insert("vision_model.embeddings.class_embedding", t).unwrap();
        let e = ClipVisionConfig::from_store(&vit_h).unwrap_err().to_string();
        assert!(e.contains("1280-wide") && e.contains("config.json"), "{e}");
        let e = ClipVisionConfig::from_store(&crate::weights::TensorStore::new("x")).unwrap_err().to_string();
        assert!(e.contains("class_embedding"), "{e}");
        let pad = r#"{"crop_size":256,"size":224}"#;
        assert!(ClipPreprocessConfig::from_hf_json(pad, "p.json").unwrap_err().to_string().contains("padding"));
    }

    const FULL: &str = r#"{"architectures":["SiglipModel"],"model_type":"siglip",
        "text_config":{"hidden_size":1152,"model_type":"siglip_text_model"},
        "vision_config":{"hidden_size":1152,"image_size":384,"intermediate_size":4304,
        "model_type":"siglip_vision_model","num_attention_heads":16,"num_hidden_layers":27,"patch_size":14}}"#;

    #[test]
    fn full_siglip_model_config_gives_so400m() {
        let cfg = SiglipVisionConfig::from_hf_json(FULL, "config.json").unwrap();
        assert_eq!(cfg, SiglipVisionConfig::so400m_patch14_384());
        assert_eq!(cfg.num_patches(), 729);
        assert_eq!(cfg.head_dim(), 72);
    }

    #[test]
    fn vision_only_config() {
        let json = r#"{"model_type":"siglip_vision_model","hidden_size":32,"num_attention_heads":4,
            "num_hidden_layers":2,"intermediate_size":64,"image_size":384,"patch_size":14}"#;
        let cfg = SiglipVisionConfig::from_hf_json(json, "c.json").unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.layer_norm_eps), (32, 2, 1e-6));
    }

    #[test]
    fn wrong_model_type_is_named() {
        let err = SiglipVisionConfig::from_hf_json(r#"{"model_type":"clip"}"#, "x/config.json").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x/config.json") && msg.contains("clip"), "{msg}");
    }

    #[test]
    fn inconsistent_config_is_refused() {
        let json = r#"{"model_type":"siglip_vision_model","hidden_size":30,"num_attention_heads":4}"#;
        assert!(SiglipVisionConfig::from_hf_json(json, "c").is_err());
    }

    #[test]
    fn preprocessor_config() {
        let json = r#"{"do_normalize":true,"do_rescale":true,"do_resize":true,"image_mean":[0.5,0.5,0.5],
            "image_processor_type":"SiglipImageProcessor","image_std":[0.5,0.5,0.5],"resample":3,
            "rescale_factor":0.00392156862745098,"size":{"height":384,"width":384}}"#;
        let p = PreprocessConfig::from_hf_json(json, "p").unwrap();
        assert_eq!(p, PreprocessConfig::siglip(384));
        let bilinear = json.replace("\"resample\":3", "\"resample\":2");
        assert!(PreprocessConfig::from_hf_json(&bilinear, "p").is_err());
    }
}
