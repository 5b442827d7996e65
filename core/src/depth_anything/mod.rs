//! Depth Anything (V1 and V2): an image → its depth map, the control image
//! FLUX.1 Depth follows.
//!
//! Written after transformers' `DepthAnythingForDepthEstimation` (DINOv2
//! backbone → DPT-style neck → head) and its `DPTImageProcessor` (PIL
//! backend); the model of depth-anything/Depth-Anything-V2-*-hf and
//! LiheYoung/depth-anything-*-hf, in their checkpoints' names (`backbone.*`,
//! `neck.*`, `head.*`). Struct fields mirror those names.
//!
//! Steps: [`DepthPreprocessConfig::input_size`] (keep the aspect ratio,
//! scale as little as possible, each side a multiple of the patch size) →
//! Pillow bicubic → rescale, ImageNet normalisation ([`pixel_values`]) →
//! [`DepthAnything::forward`] (`[B, H, W]` at the input size) →
//! [`resize_bicubic`] back to the image's size (PyTorch's bicubic, as
//! `post_process_depth_estimation`) → [`depth_map_u8`], the 8-bit map
//! ComfyUI's and controlnet_aux's preprocessors make (min-max to 0..255,
//! truncated; a metric model's turned over, near bright).
//!
//! The original repository's V2 checkpoints (the `.pth` files ComfyUI's
//! preprocessor loads) are read through [`original`]: their names mapped to
//! these, their sizes inferred, and that repository's own pipeline
//! ([`DepthPipeline::Original`]: OpenCV's cubic, lower-bound sizes, DINOv2's
//! offset position interpolation, bilinear back to the image).
//!
//! Not here: V1's original checkpoints, DINOv2's SwiGLU feed-forward (the
//! giant backbone), file IO.

pub mod original;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, LayerNorm, Linear, VarBuilder};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::preprocess::{resize, Resample, RgbImage};

/// DINOv2's sizes, as Depth Anything's `backbone_config` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    /// The size the position embeddings were trained at (518 for Depth Anything).
    pub image_size: usize,
    pub layer_norm_eps: f64,
    /// Which hidden states feed the neck: 0 is the embeddings, `i` the output of layer `i`.
    pub out_indices: Vec<usize>,
    /// How the position table is resized to another grid: `None` to the
    /// grid's size (transformers); `Some(offset)` by the scale factor
    /// `(side + offset) / trained side`, and left as trained for a square
    /// input of the trained grid (the original DINOv2, offset 0.1).
    pub interpolate_offset: Option<f64>,
}

impl Dinov2Config {
    /// Side of the trained grid of patch positions.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// What the head predicts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DepthKind {
    /// Relative depth (inverse depth, larger is nearer): ReLU.
    Relative,
    /// Metric depth in metres: sigmoid × `max_depth`.
    Metric { max_depth: f64 },
}

/// How a reassemble layer resizes its feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reassemble {
    /// A transposed convolution, kernel = stride = the factor.
    Up(usize),
    Same,
    /// A 3×3 convolution with this stride.
    Down(usize),
}

/// A Depth Anything model's configuration (transformers' `DepthAnythingConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct DepthAnythingConfig {
    pub backbone: Dinov2Config,
    pub reassemble_hidden_size: usize,
    pub reassemble: Vec<Reassemble>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    pub head_hidden_size: usize,
    pub patch_size: usize,
    pub kind: DepthKind,
}

fn config_err(source_name: &str, reason: impl Into<String>) -> Error {
    Error::Config { source_name: source_name.to_string(), reason: reason.into() }
}

fn usize_of(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

impl DepthAnythingConfig {
    /// depth-anything/Depth-Anything-V2-Small-hf.
    pub fn v2_small() -> Self {
        Self {
            backbone: Dinov2Config {
                hidden_size: 384,
                num_hidden_layers: 12,
                num_attention_heads: 6,
                intermediate_size: 1536,
                patch_size: 14,
                image_size: 518,
                layer_norm_eps: 1e-6,
                out_indices: vec![3, 6, 9, 12],
                interpolate_offset: None,
            },
            reassemble_hidden_size: 384,
            reassemble: vec![Reassemble::Up(4), Reassemble::Up(2), Reassemble::Same, Reassemble::Down(2)],
            neck_hidden_sizes: vec![48, 96, 192, 384],
            fusion_hidden_size: 64,
            head_hidden_size: 32,
            patch_size: 14,
            kind: DepthKind::Relative,
        }
    }

    /// Reads a Hugging Face `config.json` of a `DepthAnythingForDepthEstimation`.
    /// Missing backbone fields take `Dinov2Config`'s defaults, as transformers does.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let err = |reason: String| config_err(source_name, reason);
        let v: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if v["model_type"].as_str().is_some_and(|t| t != "depth_anything") {
            return Err(err(format!("model_type {} is not depth_anything", v["model_type"])));
        }
        let b = &v["backbone_config"];
        if !b.is_object() {
            return Err(err("no backbone_config (a Depth Anything config.json names its DINOv2 sizes there)".into()));
        }
        if b["model_type"].as_str().is_some_and(|t| t != "dinov2") {
            return Err(err(format!("backbone {} is not supported; only DINOv2 is", b["model_type"])));
        }
        for (flag, want) in [("use_swiglu_ffn", false), ("qkv_bias", true), ("apply_layernorm", true)] {
            if b[flag].as_bool().is_some_and(|x| x != want) {
                return Err(err(format!("backbone {flag} {} is not supported", !want)));
            }
        }
        if b["hidden_act"].as_str().is_some_and(|a| a != "gelu") {
            return Err(err(format!("backbone hidden_act {} is not supported; only gelu is", b["hidden_act"])));
        }
        let get = |x: &Value, default: usize| usize_of(x).unwrap_or(default);
        let hidden_size = get(&b["hidden_size"], 768);
        let mlp_ratio = b["mlp_ratio"].as_f64().unwrap_or(4.0);
        let layers = get(&b["num_hidden_layers"], 12);
        let out_indices: Vec<usize> = match b["out_indices"].as_array() {
            Some(a) => a.iter().map(|x| usize_of(x).ok_or_else(|| err(format!("out_indices entry {x}")))).collect(),
            None => match b["out_features"].as_array() {
                Some(a) => a
                    .iter()
                    .map(|x| match x.as_str() {
                        Some("stem") => Ok(0),
                        Some(s) => s.strip_prefix("stage").and_then(|n| n.parse().ok()).ok_or_else(|| err(s.into())),
                        None => Err(err(format!("out_features entry {x}"))),
                    })
                    .collect(),
                None => Ok(vec![layers]),
            },
        }?;
        let backbone = Dinov2Config {
            hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: get(&b["num_attention_heads"], 12),
            intermediate_size: (hidden_size as f64 * mlp_ratio) as usize,
            patch_size: get(&b["patch_size"], 14),
            image_size: get(&b["image_size"], 224),
            layer_norm_eps: b["layer_norm_eps"].as_f64().unwrap_or(1e-6),
            out_indices,
            interpolate_offset: None,
        };
        let factors: Vec<f64> = match v["reassemble_factors"].as_array() {
            Some(a) => a.iter().filter_map(Value::as_f64).collect(),
            None => vec![4.0, 2.0, 1.0, 0.5],
        };
        let reassemble = factors
            .iter()
            .map(|&f| match f {
                1.0 => Ok(Reassemble::Same),
                f if f > 1.0 && f.fract() == 0.0 => Ok(Reassemble::Up(f as usize)),
                f if f > 0.0 && f < 1.0 && (1.0 / f).fract() == 0.0 => Ok(Reassemble::Down((1.0 / f) as usize)),
                f => Err(err(format!("reassemble factor {f} is neither a whole number nor one over one"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let neck_hidden_sizes: Vec<usize> = match v["neck_hidden_sizes"].as_array() {
            Some(a) => a.iter().filter_map(usize_of).collect(),
            None => vec![48, 96, 192, 384],
        };
        if v["head_in_index"].as_i64().is_some_and(|i| i != -1) {
            return Err(err(format!("head_in_index {} is not supported; only -1 is", v["head_in_index"])));
        }
        let kind = match v["depth_estimation_type"].as_str().unwrap_or("relative") {
            "relative" => DepthKind::Relative,
            "metric" => DepthKind::Metric { max_depth: v["max_depth"].as_f64().unwrap_or(1.0) },
            other => return Err(err(format!("depth_estimation_type {other} is neither relative nor metric"))),
        };
        let cfg = Self {
            backbone,
            reassemble_hidden_size: get(&v["reassemble_hidden_size"], 384),
            reassemble,
            neck_hidden_sizes,
            fusion_hidden_size: get(&v["fusion_hidden_size"], 64),
            head_hidden_size: get(&v["head_hidden_size"], 32),
            patch_size: get(&v["patch_size"], 14),
            kind,
        };
        cfg.check(source_name)?;
        Ok(cfg)
    }

    pub(crate) fn check(&self, source_name: &str) -> Result<()> {
        let b = &self.backbone;
        let n = self.neck_hidden_sizes.len();
        let problem = if self.reassemble.len() != n || b.out_indices.len() != n || n == 0 {
            Some(format!(
                "{} reassemble factors, {} neck sizes and {} backbone features must be as many (and some)",
                self.reassemble.len(),
                n,
                b.out_indices.len()
            ))
        } else if let Some(i) = b.out_indices.iter().find(|&&i| i > b.num_hidden_layers) {
            Some(format!("feature index {i} past the backbone's {} layers", b.num_hidden_layers))
        } else if b.num_attention_heads == 0 || b.hidden_size % b.num_attention_heads != 0 {
            Some(format!("hidden size {} is not a multiple of {} heads", b.hidden_size, b.num_attention_heads))
        } else if b.patch_size != self.patch_size || b.patch_size == 0 || b.grid() == 0 {
            Some(format!("patch size {} (backbone {}), image size {}", self.patch_size, b.patch_size, b.image_size))
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(config_err(source_name, p)))
    }

    /// Every tensor the model needs, with its shape (the checkpoint's names).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let b = &self.backbone;
        let (h, p) = (b.hidden_size, b.patch_size);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("backbone.embeddings.cls_token".into(), vec![1, 1, h]),
            ("backbone.embeddings.position_embeddings".into(), vec![1, b.grid() * b.grid() + 1, h]),
            ("backbone.embeddings.patch_embeddings.projection.weight".into(), vec![h, 3, p, p]),
            ("backbone.embeddings.patch_embeddings.projection.bias".into(), vec![h]),
            ("backbone.layernorm.weight".into(), vec![h]),
            ("backbone.layernorm.bias".into(), vec![h]),
        ];
        let with_bias = |v: &mut Vec<(String, Vec<usize>)>, name: String, shape: Vec<usize>| {
            let out = shape[0];
            v.push((format!("{name}.weight"), shape));
            v.push((format!("{name}.bias"), vec![out]));
        };
        for l in 0..b.num_hidden_layers {
            let pre = format!("backbone.encoder.layer.{l}");
            for proj in ["attention.attention.query", "attention.attention.key", "attention.attention.value"] {
                with_bias(&mut v, format!("{pre}.{proj}"), vec![h, h]);
            }
            with_bias(&mut v, format!("{pre}.attention.output.dense"), vec![h, h]);
            with_bias(&mut v, format!("{pre}.norm1"), vec![h]);
            with_bias(&mut v, format!("{pre}.norm2"), vec![h]);
            with_bias(&mut v, format!("{pre}.mlp.fc1"), vec![b.intermediate_size, h]);
            with_bias(&mut v, format!("{pre}.mlp.fc2"), vec![h, b.intermediate_size]);
            v.push((format!("{pre}.layer_scale1.lambda1"), vec![h]));
            v.push((format!("{pre}.layer_scale2.lambda1"), vec![h]));
        }
        let f = self.fusion_hidden_size;
        for (i, (&c, r)) in self.neck_hidden_sizes.iter().zip(&self.reassemble).enumerate() {
            let pre = format!("neck.reassemble_stage.layers.{i}");
            with_bias(&mut v, format!("{pre}.projection"), vec![c, self.reassemble_hidden_size, 1, 1]);
            match r {
                // ConvTranspose2d's weight is [in, out, k, k].
                Reassemble::Up(k) => with_bias(&mut v, format!("{pre}.resize"), vec![c, c, *k, *k]),
                Reassemble::Same => {}
                Reassemble::Down(_) => with_bias(&mut v, format!("{pre}.resize"), vec![c, c, 3, 3]),
            }
            let pre = format!("neck.fusion_stage.layers.{i}");
            with_bias(&mut v, format!("{pre}.projection"), vec![f, f, 1, 1]);
            for res in ["residual_layer1", "residual_layer2"] {
                with_bias(&mut v, format!("{pre}.{res}.convolution1"), vec![f, f, 3, 3]);
                with_bias(&mut v, format!("{pre}.{res}.convolution2"), vec![f, f, 3, 3]);
            }
        }
        with_bias(&mut v, "head.conv1".into(), vec![f / 2, f, 3, 3]);
        with_bias(&mut v, "head.conv2".into(), vec![self.head_hidden_size, f / 2, 3, 3]);
        with_bias(&mut v, "head.conv3".into(), vec![1, self.head_hidden_size, 1, 1]);
        for (i, &c) in self.neck_hidden_sizes.iter().enumerate() {
            v.push((format!("neck.convs.{i}.weight"), vec![f, c, 3, 3]));
        }
        v
    }
}

/// Whose pipeline turns an image into the model's input, and its output into
/// the image's depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DepthPipeline {
    /// transformers' `DPTImageProcessor` (PIL backend) and
    /// `post_process_depth_estimation`: the scale nearer 1, Pillow's bicubic
    /// on the 8-bit image, PyTorch's bicubic back.
    #[default]
    Transformers,
    /// The original repository's `image2tensor` / `infer_image` (what
    /// ComfyUI's preprocessor runs): both sides at least the target, OpenCV's
    /// cubic on the image in f64, bilinear with aligned corners back.
    Original,
}

/// How an image becomes the model's input (transformers' `DPTImageProcessor`,
/// or the original repository's transform: [`DepthPipeline`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DepthPreprocessConfig {
    pub pipeline: DepthPipeline,
    pub height: usize,
    pub width: usize,
    pub keep_aspect_ratio: bool,
    pub ensure_multiple_of: usize,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl DepthPreprocessConfig {
    /// Depth Anything's: 518×518, aspect kept, multiple of 14, ImageNet mean and std.
    pub fn depth_anything() -> Self {
        Self {
            pipeline: DepthPipeline::Transformers,
            height: 518,
            width: 518,
            keep_aspect_ratio: true,
            ensure_multiple_of: 14,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }

    /// Reads a `preprocessor_config.json` of a `DPTImageProcessor`.
    pub fn from_hf_json(json: &str, source_name: &str) -> Result<Self> {
        let err = |reason: String| config_err(source_name, reason);
        let v: Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
        if v["resample"].as_u64().is_some_and(|r| r != 3) {
            return Err(err(format!("resample {} is not supported; only bicubic (3) is", v["resample"])));
        }
        for (flag, want) in [("do_resize", true), ("do_rescale", true), ("do_normalize", true), ("do_pad", false)] {
            if v[flag].as_bool().is_some_and(|x| x != want) {
                return Err(err(format!("{flag} {} is not supported", !want)));
            }
        }
        let d = Self::depth_anything();
        let triple = |x: &Value, default: [f32; 3]| match x.as_array() {
            Some(a) if a.len() == 3 && a.iter().all(Value::is_number) => {
                let f = |i: usize| a[i].as_f64().unwrap_or_default() as f32;
                [f(0), f(1), f(2)]
            }
            _ => default,
        };
        let cfg = Self {
            pipeline: DepthPipeline::Transformers,
            height: usize_of(&v["size"]["height"]).unwrap_or(d.height),
            width: usize_of(&v["size"]["width"]).unwrap_or(d.width),
            keep_aspect_ratio: v["keep_aspect_ratio"].as_bool().unwrap_or(d.keep_aspect_ratio),
            ensure_multiple_of: usize_of(&v["ensure_multiple_of"]).unwrap_or(d.ensure_multiple_of).max(1),
            rescale_factor: v["rescale_factor"].as_f64().unwrap_or(d.rescale_factor),
            image_mean: triple(&v["image_mean"], d.image_mean),
            image_std: triple(&v["image_std"], d.image_std),
        };
        if cfg.height == 0 || cfg.width == 0 {
            return Err(err(format!("size {}×{}", cfg.width, cfg.height)));
        }
        Ok(cfg)
    }

    /// The original repository's transform at `size` (518 in ComfyUI's
    /// preprocessor): lower-bound sides, multiple of 14, ImageNet mean and std.
    pub fn original(size: usize) -> Self {
        Self { pipeline: DepthPipeline::Original, height: size, width: size, ..Self::depth_anything() }
    }

    /// The model's input size `(width, height)` for an image. transformers'
    /// `get_resize_output_image_size`: with the aspect kept, the scale nearer
    /// 1 of the two serves both sides; each side is then rounded (half to
    /// even, as Python) to a multiple. The original `Resize` (lower bound):
    /// the larger scale serves both, and a side rounded below its target is
    /// rounded up instead.
    pub fn input_size(&self, width: usize, height: usize) -> (usize, usize) {
        let mut scale_h = self.height as f64 / height as f64;
        let mut scale_w = self.width as f64 / width as f64;
        let lower_bound = self.pipeline == DepthPipeline::Original;
        if self.keep_aspect_ratio {
            let width_wins =
                if lower_bound { scale_w > scale_h } else { (1.0 - scale_w).abs() < (1.0 - scale_h).abs() };
            if width_wins {
                scale_h = scale_w;
            } else {
                scale_w = scale_h;
            }
        }
        let m = self.ensure_multiple_of as f64;
        let side = |x: f64, target: usize| {
            let y = (x / m).round_ties_even() * m;
            let y = if lower_bound && y < target as f64 { (x / m).ceil() * m } else { y };
            y as usize
        };
        (side(scale_w * width as f64, self.width), side(scale_h * height as f64, self.height))
    }
}

/// The model's input for an image: `[1, 3, h, w]` f32 on the CPU, at
/// [`DepthPreprocessConfig::input_size`]. transformers: Pillow's bicubic,
/// rescaled in f64 then normalised in f32, as its PIL backend. Original:
/// rescaled to f64, OpenCV's cubic, normalised in f64 (`original::pixel_values`).
pub fn pixel_values(img: &RgbImage, cfg: &DepthPreprocessConfig) -> Result<Tensor> {
    let (w, h) = cfg.input_size(img.width, img.height);
    if w == 0 || h == 0 {
        return Err(Error::Image {
            source_name: "depth input".into(),
            reason: format!(
                "a {}×{} image makes a {w}×{h} depth-model input: too small, or too long and narrow",
                img.width, img.height
            ),
        });
    }
    if cfg.pipeline == DepthPipeline::Original {
        return original::pixel_values(img, cfg, (w, h));
    }
    let resized = resize(img, w, h, Resample::Bicubic);
    let plane = w * h;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = (f64::from(px[c]) * cfg.rescale_factor) as f32;
            chw[c * plane + i] = (v - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu)?)
}

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` (no
/// antialiasing) of `planes` row-major `in_h × in_w` planes: the cubic
/// convolution with A = −0.75, source index `(dst + ½)·in/out − ½`, taps
/// clamped at the borders. Computed in f64 (PyTorch: f32; they differ by
/// rounding only). `src` must hold the planes; no side may be 0.
pub fn resize_bicubic(
    src: &[f32],
    planes: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Result<Vec<f32>> {
    let step = |n_in: usize, n_out: usize| n_in as f64 / n_out.max(1) as f64;
    resize_bicubic_stepped(src, planes, (in_h, in_w), (out_h, out_w), (step(in_h, out_h), step(in_w, out_w)))
}

/// [`resize_bicubic`] with the source step per output pixel given: what
/// PyTorch uses when `interpolate` gets a `scale_factor` (the step is its
/// inverse) instead of a size.
pub fn resize_bicubic_stepped(
    src: &[f32],
    planes: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    (step_h, step_w): (f64, f64),
) -> Result<Vec<f32>> {
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 || src.len() != planes * in_h * in_w {
        return Err(Error::Shape(format!(
            "bicubic resize of {} values as {planes} planes of {in_h}×{in_w} to {out_h}×{out_w}",
            src.len()
        )));
    }
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    // For each output index: the first tap and the four weights.
    let taps = |n_out: usize, scale: f64| -> Vec<(isize, [f64; 4])> {
        (0..n_out)
            .map(|d| {
                let real = scale * (d as f64 + 0.5) - 0.5;
                let base = real.floor();
                let t = real - base;
                (base as isize - 1, [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
            })
            .collect()
    };
    let (rows, cols) = (taps(out_h, step_h), taps(out_w, step_w));
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut out = vec![0f32; planes * out_h * out_w];
    for p in 0..planes {
        let plane = &src[p * in_h * in_w..][..in_h * in_w];
        for (y, (y0, wy)) in rows.iter().enumerate() {
            for (x, (x0, wx)) in cols.iter().enumerate() {
                let mut acc = 0.0;
                for (i, wyi) in wy.iter().enumerate() {
                    let row = &plane[clamp(y0 + i as isize, in_h) * in_w..][..in_w];
                    let line: f64 =
                        wx.iter().enumerate().map(|(j, w)| w * f64::from(row[clamp(x0 + j as isize, in_w)])).sum();
                    acc += wyi * line;
                }
                out[(p * out_h + y) * out_w + x] = acc as f32;
            }
        }
    }
    Ok(out)
}

/// The 8-bit depth map of a depth plane, near bright, as ComfyUI's and
/// controlnet_aux's Depth Anything preprocessors make it: `(d − min) / (max −
/// min) · 255`, truncated; for a metric model (metres: far is large) 255
/// minus that, as ComfyUI's DepthAnythingV2 node does. A flat plane maps to 0.
pub fn depth_map_u8(depth: &[f32], kind: DepthKind) -> Vec<u8> {
    let (lo, hi) = depth.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    let range = hi - lo;
    let level = |d: f32| if range > 0.0 { ((d - lo) / range * 255.0) as u8 } else { 0 };
    match kind {
        DepthKind::Relative => depth.iter().map(|&d| level(d)).collect(),
        DepthKind::Metric { .. } => depth.iter().map(|&d| 255 - level(d)).collect(),
    }
}

struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        Ok(Self {
            query: candle_nn::linear(h, h, a.pp("query"))?,
            key: candle_nn::linear(h, h, a.pp("key"))?,
            value: candle_nn::linear(h, h, a.pp("value"))?,
            dense: candle_nn::linear(h, h, vb.pp("output").pp("dense"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let d = h / self.heads;
        let split =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, self.heads, d))?.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (split(self.query.forward(x)?)?, split(self.key.forward(x)?)?, split(self.value.forward(x)?)?);
        // Core's attention: heads in groups whose score matrix stays small.
        Ok(self.dense.forward(&crate::nn::merge_heads(&crate::nn::sdpa(&q, &k, &v)?)?)?)
    }
}

struct Layer {
    norm1: LayerNorm,
    attention: SelfAttention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_scale2: Tensor,
}

impl Layer {
    fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            norm1: candle_nn::layer_norm(h, eps, vb.pp("norm1"))?,
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            layer_scale1: vb.get(h, "layer_scale1.lambda1")?,
            norm2: candle_nn::layer_norm(h, eps, vb.pp("norm2"))?,
            fc1: candle_nn::linear(h, i, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(i, h, vb.pp("mlp").pp("fc2"))?,
            layer_scale2: vb.get(h, "layer_scale2.lambda1")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let attn = self.attention.forward(&self.norm1.forward(x)?)?;
        let x = (attn.broadcast_mul(&self.layer_scale1)? + x)?;
        let mlp = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((mlp.broadcast_mul(&self.layer_scale2)? + x)?)
    }
}

/// DINOv2 as Depth Anything's backbone: the hidden states it was asked for,
/// each through the final LayerNorm, `[B, 1 + h·w, hidden]`.
struct Backbone {
    cls_token: Tensor,
    position_embeddings: Tensor,
    projection: Conv2d,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    cfg: Dinov2Config,
}

impl Backbone {
    fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let (h, p) = (cfg.hidden_size, cfg.patch_size);
        let e = vb.pp("embeddings");
        let conv = Conv2dConfig { stride: p, ..Default::default() };
        Ok(Self {
            cls_token: e.get((1, 1, h), "cls_token")?,
            position_embeddings: e.get((1, cfg.grid() * cfg.grid() + 1, h), "position_embeddings")?,
            projection: candle_nn::conv2d(3, h, p, conv, e.pp("patch_embeddings").pp("projection"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|l| Layer::new(cfg, vb.pp("encoder").pp("layer").pp(l)))
                .collect::<Result<_>>()?,
            layernorm: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            cfg: cfg.clone(),
        })
    }

    /// The trained position table resized to a `rows × cols` patch grid
    /// (PyTorch's bicubic, in f32, as transformers' `interpolate_pos_encoding`;
    /// with an offset, as the original DINOv2's: [`Dinov2Config::interpolate_offset`]).
    fn positions(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let (g, h) = (self.cfg.grid(), self.cfg.hidden_size);
        if self.cfg.interpolate_offset.is_some() && rows == g && cols == g {
            return Ok(self.position_embeddings.clone());
        }
        let table = self.position_embeddings.to_dtype(DType::F32)?.squeeze(0)?;
        let cls = table.narrow(0, 0, 1)?;
        // [g·g, h] → h planes of g × g.
        let planes = table.narrow(0, 1, g * g)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let resized = match self.cfg.interpolate_offset {
            // PyTorch steps by the inverse of the scale factor it was given.
            Some(offset) => {
                let step = |side: usize| g as f64 / (side as f64 + offset);
                resize_bicubic_stepped(&planes, h, (g, g), (rows, cols), (step(rows), step(cols)))?
            }
            None => resize_bicubic(&planes, h, (g, g), (rows, cols))?,
        };
        let grid = Tensor::from_vec(resized, (h, rows * cols), &Device::Cpu)?.t()?;
        let all = Tensor::cat(&[cls.to_device(&Device::Cpu)?, grid], 0)?;
        Ok(all
            .to_device(self.position_embeddings.device())?
            .to_dtype(self.position_embeddings.dtype())?
            .unsqueeze(0)?)
    }

    fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let (b, _, height, width) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let patches = self.projection.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.hidden_size))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions(height / p, width / p)?)?;
        // The hidden states asked for (0: the embeddings, i: layer i's output), then each normed.
        let wanted = |i: usize| self.cfg.out_indices.contains(&i);
        let mut states: Vec<Option<Tensor>> = vec![None; self.layers.len() + 1];
        states[0] = wanted(0).then(|| x.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            states[i + 1] = wanted(i + 1).then(|| x.clone());
        }
        self.cfg
            .out_indices
            .iter()
            .map(|&i| match states.get(i).and_then(Option::as_ref) {
                Some(state) => Ok(self.layernorm.forward(state)?),
                None => Err(Error::Shape(format!("backbone feature {i} past its {} layers", self.layers.len()))),
            })
            .collect()
    }
}

enum Resize {
    Up(ConvTranspose2d),
    Same,
    Down(Conv2d),
}

/// ReLU → 3×3 conv → ReLU → 3×3 conv, plus the input.
struct ResidualUnit {
    convolution1: Conv2d,
    convolution2: Conv2d,
}

fn conv3(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    Ok(candle_nn::conv2d(c_in, c_out, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)?)
}

impl ResidualUnit {
    fn new(f: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            convolution1: conv3(f, f, vb.pp("convolution1"))?,
            convolution2: conv3(f, f, vb.pp("convolution2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.convolution2.forward(&self.convolution1.forward(&x.relu()?)?.relu()?)?;
        Ok((y + x)?)
    }
}

struct FusionLayer {
    projection: Conv2d,
    residual_layer1: ResidualUnit,
    residual_layer2: ResidualUnit,
}

impl FusionLayer {
    /// `x` (+ the unit of `residual`) → unit → bilinear (corners aligned) to
    /// `size`, or twice the size → 1×1 projection.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>, size: Option<(usize, usize)>) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(r) = residual {
            let (_, _, h, w) = x.dims4()?;
            let r = if r.dims() == x.dims() { r.clone() } else { r.upsample_bilinear2d(h, w, false)? };
            x = (x + self.residual_layer1.forward(&r)?)?;
        }
        let x = self.residual_layer2.forward(&x)?;
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        Ok(self.projection.forward(&x.upsample_bilinear2d(th, tw, true)?)?)
    }
}

/// Depth Anything: pixel values → depth `[B, H, W]` at the input's size.
pub struct DepthAnything {
    backbone: Backbone,
    reassemble: Vec<(Conv2d, Resize)>,
    convs: Vec<Conv2d>,
    fusion: Vec<FusionLayer>,
    head: [Conv2d; 3],
    cfg: DepthAnythingConfig,
}

impl std::fmt::Debug for DepthAnything {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepthAnything").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl DepthAnything {
    /// Builds the model from checkpoint tensors (check them first with
    /// [`DepthAnythingConfig::expected_tensors`]).
    pub fn new(cfg: &DepthAnythingConfig, vb: VarBuilder) -> Result<Self> {
        let f = cfg.fusion_hidden_size;
        let neck = vb.pp("neck");
        let reassemble = cfg
            .neck_hidden_sizes
            .iter()
            .zip(&cfg.reassemble)
            .enumerate()
            .map(|(i, (&c, r))| {
                let vb = neck.pp("reassemble_stage").pp("layers").pp(i);
                let projection =
                    candle_nn::conv2d(cfg.reassemble_hidden_size, c, 1, Default::default(), vb.pp("projection"))?;
                let resize = match *r {
                    Reassemble::Up(k) => {
                        let conv = ConvTranspose2dConfig { stride: k, ..Default::default() };
                        Resize::Up(candle_nn::conv_transpose2d(c, c, k, conv, vb.pp("resize"))?)
                    }
                    Reassemble::Same => Resize::Same,
                    Reassemble::Down(s) => {
                        let conv = Conv2dConfig { padding: 1, stride: s, ..Default::default() };
                        Resize::Down(candle_nn::conv2d(c, c, 3, conv, vb.pp("resize"))?)
                    }
                };
                Ok((projection, resize))
            })
            .collect::<Result<_>>()?;
        let padded = Conv2dConfig { padding: 1, ..Default::default() };
        let convs = (0..cfg.neck_hidden_sizes.len())
            .map(|i| Ok(candle_nn::conv2d_no_bias(cfg.neck_hidden_sizes[i], f, 3, padded, neck.pp("convs").pp(i))?))
            .collect::<Result<_>>()?;
        let fusion = (0..cfg.neck_hidden_sizes.len())
            .map(|i| {
                let vb = neck.pp("fusion_stage").pp("layers").pp(i);
                Ok(FusionLayer {
                    projection: candle_nn::conv2d(f, f, 1, Default::default(), vb.pp("projection"))?,
                    residual_layer1: ResidualUnit::new(f, vb.pp("residual_layer1"))?,
                    residual_layer2: ResidualUnit::new(f, vb.pp("residual_layer2"))?,
                })
            })
            .collect::<Result<_>>()?;
        let head = vb.pp("head");
        Ok(Self {
            backbone: Backbone::new(&cfg.backbone, vb.pp("backbone"))?,
            reassemble,
            convs,
            fusion,
            head: [
                conv3(f, f / 2, head.pp("conv1"))?,
                conv3(f / 2, cfg.head_hidden_size, head.pp("conv2"))?,
                candle_nn::conv2d(cfg.head_hidden_size, 1, 1, Default::default(), head.pp("conv3"))?,
            ],
            cfg: cfg.clone(),
        })
    }

    /// Pixel values `[B, 3, H, W]` (sides multiples of the patch size) →
    /// depth `[B, H, W]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if c != 3 || height < p || width < p {
            return Err(Error::Shape(format!(
                "depth model input {:?}: expected [B, 3, H ≥ {p}, W ≥ {p}]",
                pixels.dims()
            )));
        }
        let (rows, cols) = (height / p, width / p);
        let features = self.backbone.forward(pixels)?;
        // Reassemble: tokens (without CLS) → feature maps at four scales → fusion width.
        let mut maps = Vec::with_capacity(features.len());
        for ((t, (projection, resize)), conv) in features.iter().zip(&self.reassemble).zip(&self.convs) {
            let hidden = t.dim(D::Minus1)?;
            let map =
                t.narrow(1, 1, rows * cols)?.reshape((b, rows, cols, hidden))?.permute((0, 3, 1, 2))?.contiguous()?;
            let map = projection.forward(&map)?;
            let map = match resize {
                Resize::Up(t) => t.forward(&map)?,
                Resize::Same => map,
                Resize::Down(d) => d.forward(&map)?,
            };
            maps.push(conv.forward(&map)?);
        }
        // Fusion, coarsest first: each layer upsamples to the next map's size.
        maps.reverse();
        let mut fused: Option<Tensor> = None;
        for (i, (map, layer)) in maps.iter().zip(&self.fusion).enumerate() {
            let size = match maps.get(i + 1) {
                Some(next) => Some((next.dim(2)?, next.dim(3)?)),
                None => None,
            };
            fused = Some(match &fused {
                None => layer.forward(map, None, size)?,
                Some(prev) => layer.forward(prev, Some(map), size)?,
            });
        }
        let fused = fused.ok_or_else(|| Error::Shape("no neck features".into()))?;
        let [conv1, conv2, conv3] = &self.head;
        let x = conv1.forward(&fused)?.upsample_bilinear2d(rows * p, cols * p, true)?;
        let x = conv3.forward(&conv2.forward(&x)?.relu()?)?;
        let depth = match self.cfg.kind {
            DepthKind::Relative => x.relu()?,
            DepthKind::Metric { max_depth } => (candle_nn::ops::sigmoid(&x)? * max_depth)?,
        };
        Ok(depth.squeeze(1)?)
    }

    /// What the head predicts.
    pub fn kind(&self) -> DepthKind {
        self.cfg.kind
    }

    /// An image → its depth at the image's size, `height × width` f32 row-major
    /// (the model's output resized with PyTorch's bicubic, as
    /// `post_process_depth_estimation`, or bilinear with aligned corners, as
    /// the original `infer_image`). Runs on the model's device and dtype.
    pub fn depth(&self, img: &RgbImage, pre: &DepthPreprocessConfig) -> Result<Vec<f32>> {
        let weight = &self.backbone.cls_token;
        let pixels = pixel_values(img, pre)?.to_device(weight.device())?.to_dtype(weight.dtype())?;
        let depth = self.forward(&pixels)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, h, w) = depth.dims3()?;
        let plane = depth.flatten_all()?.to_vec1::<f32>()?;
        match pre.pipeline {
            DepthPipeline::Transformers => resize_bicubic(&plane, 1, (h, w), (img.height, img.width)),
            DepthPipeline::Original => original::resize_bilinear_aligned(&plane, (h, w), (img.height, img.width)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_size_follows_dpt_rounding() {
        let cfg = DepthPreprocessConfig::depth_anything();
        // The scale nearer 1 wins: 1024×768 → 518/768 for both sides.
        assert_eq!(cfg.input_size(1024, 768), (686, 518));
        assert_eq!(cfg.input_size(518, 518), (518, 518));
        // Halves round to even: 21 / 14 = 1.5 → 2, 35 / 14 = 2.5 → 2.
        let tiny = DepthPreprocessConfig { height: 21, width: 35, keep_aspect_ratio: false, ..cfg };
        assert_eq!(tiny.input_size(100, 100), (28, 28));
    }

    #[test]
    fn an_image_that_would_vanish_is_refused() {
        let img = RgbImage { width: 4000, height: 4, data: vec![0; 4000 * 4 * 3] };
        let e = pixel_values(&img, &DepthPreprocessConfig::depth_anything()).unwrap_err().to_string();
        assert!(e.contains("4000×4 image makes a") && e.contains("narrow"), "{e}");
    }

    #[test]
    fn bicubic_keeps_a_same_size_plane_and_constants() {
        let src: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        assert_eq!(resize_bicubic(&src, 1, (3, 4), (3, 4)).unwrap(), src);
        assert!(resize_bicubic(&src, 1, (3, 5), (3, 4)).is_err());
        assert!(resize_bicubic(&[], 1, (0, 0), (3, 4)).is_err());
        let flat = vec![2.5f32; 6];
        assert!(resize_bicubic(&flat, 1, (2, 3), (5, 7)).unwrap().iter().all(|&x| (x - 2.5).abs() < 1e-6));
    }

    #[test]
    fn depth_map_spans_0_to_255() {
        assert_eq!(depth_map_u8(&[1.0, 2.0, 3.0], DepthKind::Relative), vec![0, 127, 255]);
        assert_eq!(depth_map_u8(&[4.0, 4.0], DepthKind::Relative), vec![0, 0]);
        // Metres: far is large, so the map is turned over (near bright).
        assert_eq!(depth_map_u8(&[1.0, 2.0, 3.0], DepthKind::Metric { max_depth: 20.0 }), vec![255, 128, 0]);
    }

    /// depth-anything/Depth-Anything-V2-Small-hf's config.json: the backbone
    /// section names only what differs from DINOv2's defaults.
    const V2_SMALL: &str = r#"{"architectures":["DepthAnythingForDepthEstimation"],"backbone":null,
        "backbone_config":{"architectures":["Dinov2Model"],"hidden_size":384,"image_size":518,"model_type":"dinov2",
        "num_attention_heads":6,"out_features":["stage3","stage6","stage9","stage12"],"out_indices":[3,6,9,12],
        "reshape_hidden_states":false,"torch_dtype":"float32"},
        "fusion_hidden_size":64,"head_hidden_size":32,"head_in_index":-1,"initializer_range":0.02,
        "model_type":"depth_anything","neck_hidden_sizes":[48,96,192,384],"patch_size":14,
        "reassemble_factors":[4,2,1,0.5],"reassemble_hidden_size":384,"torch_dtype":"float32"}"#;

    #[test]
    fn the_published_v2_small_config_is_the_preset() {
        assert_eq!(
            DepthAnythingConfig::from_hf_json(V2_SMALL, "config.json").unwrap(),
            DepthAnythingConfig::v2_small()
        );
        // Without out_indices, the stage names say the same.
        let by_names = V2_SMALL.replace(r#""out_indices":[3,6,9,12],"#, "");
        assert_eq!(DepthAnythingConfig::from_hf_json(&by_names, "c.json").unwrap(), DepthAnythingConfig::v2_small());
    }

    #[test]
    fn config_presets_and_refusals() {
        let cfg = DepthAnythingConfig::v2_small();
        assert_eq!(cfg.backbone.grid(), 37);
        assert_eq!(cfg.expected_tensors().len(), 6 + 12 * 18 + 4 * (2 + 2 + 2 + 8 + 1) - 2 + 6);
        let swiglu = r#"{"model_type":"depth_anything","backbone_config":{"use_swiglu_ffn":true}}"#;
        let e = DepthAnythingConfig::from_hf_json(swiglu, "c.json").unwrap_err().to_string();
        assert!(e.contains("use_swiglu_ffn"), "{e}");
        let e = DepthAnythingConfig::from_hf_json(r#"{"model_type":"depth_anything"}"#, "c.json").unwrap_err();
        assert!(e.to_string().contains("backbone_config"), "{e}");
        let few = r#"{"backbone_config":{"out_indices":[1,2]}}"#;
        let e = DepthAnythingConfig::from_hf_json(few, "c.json").unwrap_err().to_string();
        assert!(e.contains("must be as many"), "{e}");
        let pad = r#"{"do_pad":true}"#;
        assert!(DepthPreprocessConfig::from_hf_json(pad, "p.json").unwrap_err().to_string().contains("do_pad"));
    }
}
