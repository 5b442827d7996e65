//! The original Depth Anything V2 repository's checkpoints and pipeline: the
//! `.pth` files (and their safetensors conversions) ComfyUI's
//! DepthAnythingV2Preprocessor loads, `depth_anything_v2_vit{s,b,l}.pth` and
//! `depth_anything_v2_metric_{hypersim,vkitti}_vitl.pth`.
//!
//! - [`convert`]: their names (`pretrained.*` DINOv2, `depth_head.*` DPT
//!   head) mapped to transformers' ones the model is built from, the fused
//!   `qkv` split into query, key and value, as transformers' conversion
//!   script does; the sizes inferred from the shapes, and what the weights do
//!   not say (V2 or V1, relative or metric) from the file's name, as ComfyUI
//!   does.
//! - Its pipeline (written after `depth_anything_v2/dpt.py` and
//!   `util/transform.py`): `pixel_values` (the image as f64 in 0..1,
//!   [`resize_cubic_opencv`] to the lower-bound size, normalised in f64) and
//!   [`resize_bilinear_aligned`] back to the image's size (`infer_image`).
//!
//! Not here: V1's checkpoints (their layer choice and output resize differ
//! and their files look the same), the giant backbone's SwiGLU feed-forward.

use candle_core::{Device, Tensor};

use super::{DepthAnythingConfig, DepthKind, DepthPreprocessConfig, Dinov2Config, Reassemble};
use crate::error::{Error, Result};
use crate::preprocess::RgbImage;
use crate::weights::TensorStore;

/// Whether `store` holds a checkpoint in the original repository's names.
pub fn is_original(store: &TensorStore) -> bool {
    store.contains("pretrained.cls_token") && store.names().any(|n| n.starts_with("depth_head."))
}

/// DINOv2's head size in every Depth Anything backbone (ViT-S/B/L/G).
const HEAD_DIM: usize = 64;

/// The original position interpolation's offset (`interpolate_offset`).
const POSITION_OFFSET: f64 = 0.1;

/// The max depth of the metric models, by training set (the repository's
/// `metric_depth/run.py`: 20 m indoors, Hypersim; 80 m outdoors, Virtual KITTI 2).
const MAX_DEPTH_INDOOR: f64 = 20.0;
const MAX_DEPTH_OUTDOOR: f64 = 80.0;

/// Which blocks feed the neck (`intermediate_layer_idx`, by block count: ViT-S
/// and ViT-B 12, ViT-L 24, ViT-G 40), as 0-based block indices.
fn layer_choice(blocks: usize) -> Option<[usize; 4]> {
    match blocks {
        12 => Some([2, 5, 8, 11]),
        24 => Some([4, 11, 17, 23]),
        40 => Some([9, 19, 29, 39]),
        _ => None,
    }
}

fn err(source_name: &str, reason: impl Into<String>) -> Error {
    Error::Config { source_name: source_name.to_string(), reason: reason.into() }
}

/// The model's configuration from the checkpoint's shapes and `file_name`
/// (its last path component): "v2" must be in it (V1's files hold the same
/// names but feed other layers to the neck), "metric" makes the metric head
/// (max depth 80 with "vkitti" in the name, else 20).
pub fn config(store: &TensorStore, file_name: &str) -> Result<DepthAnythingConfig> {
    let src = &store.source_name;
    let lower = file_name.to_lowercase();
    if !lower.contains("v2") {
        return Err(err(
            src,
            format!(
                "`{file_name}` is not named as a Depth Anything V2 checkpoint (depth_anything_v2_*): V1's original \
                 files hold the same tensors but are read differently, so the name decides. For V1 use the \
                 transformers repos (LiheYoung/depth-anything-*-hf); a renamed V2 file needs \"v2\" in its name"
            ),
        ));
    }
    let shape = |name: &str| store.shape(name).ok_or_else(|| err(src, format!("no tensor `{name}`")));
    let dim = |name: &str, i: usize| -> Result<usize> {
        shape(name)?.get(i).copied().ok_or_else(|| err(src, format!("`{name}` has no dimension {i}")))
    };
    if store.contains("pretrained.blocks.0.mlp.w12.weight") {
        return Err(Error::Unsupported(format!(
            "{src}: a SwiGLU feed-forward (the ViT-G backbone) is not supported; use ViT-S, B or L"
        )));
    }
    let hidden = dim("pretrained.cls_token", 2)?;
    let patch = dim("pretrained.patch_embed.proj.weight", 2)?;
    let positions = dim("pretrained.pos_embed", 1)?.saturating_sub(1);
    let grid = (positions as f64).sqrt().round() as usize;
    if grid * grid != positions {
        return Err(err(src, format!("{positions} position embeddings are not a square grid")));
    }
    let blocks = (0..).take_while(|i| store.contains(&format!("pretrained.blocks.{i}.norm1.weight"))).count();
    let chosen = layer_choice(blocks)
        .ok_or_else(|| err(src, format!("{blocks} DINOv2 blocks: Depth Anything V2's backbones have 12, 24 or 40")))?;
    if hidden % HEAD_DIM != 0 {
        return Err(err(src, format!("width {hidden} is not a whole number of DINOv2's {HEAD_DIM}-wide heads")));
    }
    let neck_hidden_sizes =
        (0..4).map(|i| dim(&format!("depth_head.projects.{i}.weight"), 0)).collect::<Result<Vec<_>>>()?;
    let kind = if lower.contains("metric") {
        let max_depth = if lower.contains("vkitti") { MAX_DEPTH_OUTDOOR } else { MAX_DEPTH_INDOOR };
        DepthKind::Metric { max_depth }
    } else {
        DepthKind::Relative
    };
    let cfg = DepthAnythingConfig {
        backbone: Dinov2Config {
            hidden_size: hidden,
            num_hidden_layers: blocks,
            num_attention_heads: hidden / HEAD_DIM,
            intermediate_size: dim("pretrained.blocks.0.mlp.fc1.weight", 0)?,
            patch_size: patch,
            image_size: grid * patch,
            layer_norm_eps: 1e-6,
            // Hidden state i + 1 is block i's output.
            out_indices: chosen.iter().map(|b| b + 1).collect(),
            interpolate_offset: Some(POSITION_OFFSET),
        },
        reassemble_hidden_size: hidden,
        reassemble: vec![Reassemble::Up(4), Reassemble::Up(2), Reassemble::Same, Reassemble::Down(2)],
        neck_hidden_sizes,
        fusion_hidden_size: dim("depth_head.scratch.layer1_rn.weight", 0)?,
        head_hidden_size: dim("depth_head.scratch.output_conv2.0.weight", 0)?,
        patch_size: patch,
        kind,
    };
    cfg.check(src)?;
    Ok(cfg)
}

/// transformers' name of an original tensor other than a fused `qkv`
/// (`None`: not one the model has; validation then names it).
fn hf_name(name: &str) -> Option<String> {
    const STEM: [(&str, &str); 6] = [
        ("pretrained.cls_token", "backbone.embeddings.cls_token"),
        ("pretrained.mask_token", "backbone.embeddings.mask_token"),
        ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
        ("pretrained.patch_embed.proj.weight", "backbone.embeddings.patch_embeddings.projection.weight"),
        ("pretrained.patch_embed.proj.bias", "backbone.embeddings.patch_embeddings.projection.bias"),
        ("pretrained.norm.", "backbone.layernorm."),
    ];
    for (from, to) in STEM {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    if let Some(rest) = name.strip_prefix("pretrained.blocks.") {
        let (block, part) = rest.split_once('.')?;
        const PARTS: [(&str, &str); 7] = [
            ("norm1.", "norm1."),
            ("norm2.", "norm2."),
            ("attn.proj.", "attention.output.dense."),
            ("ls1.gamma", "layer_scale1.lambda1"),
            ("ls2.gamma", "layer_scale2.lambda1"),
            ("mlp.fc1.", "mlp.fc1."),
            ("mlp.fc2.", "mlp.fc2."),
        ];
        let (from, to) = PARTS.iter().find(|(from, _)| part.starts_with(from))?;
        return Some(format!("backbone.encoder.layer.{block}.{to}{}", &part[from.len()..]));
    }
    let head = name.strip_prefix("depth_head.")?;
    if let Some(rest) = head.strip_prefix("projects.") {
        let (i, param) = rest.split_once('.')?;
        return Some(format!("neck.reassemble_stage.layers.{i}.projection.{param}"));
    }
    if let Some(rest) = head.strip_prefix("resize_layers.") {
        let (i, param) = rest.split_once('.')?;
        return Some(format!("neck.reassemble_stage.layers.{i}.resize.{param}"));
    }
    let scratch = head.strip_prefix("scratch.")?;
    if let Some(rest) = scratch.strip_prefix("layer") {
        // layerK_rn.weight → neck.convs.{K-1}.weight
        let (k, param) = rest.split_once("_rn.")?;
        let k: usize = k.parse().ok()?;
        return Some(format!("neck.convs.{}.{param}", k.checked_sub(1)?));
    }
    if let Some(rest) = scratch.strip_prefix("refinenet") {
        // refinenetK fuses the K-th finest map: transformers' fusion layer 4 − K (coarsest first).
        let (k, part) = rest.split_once('.')?;
        let layer = 4usize.checked_sub(k.parse().ok()?)?;
        let part = part
            .replacen("out_conv.", "projection.", 1)
            .replacen("resConfUnit1.", "residual_layer1.", 1)
            .replacen("resConfUnit2.", "residual_layer2.", 1)
            .replacen("conv1.", "convolution1.", 1)
            .replacen("conv2.", "convolution2.", 1);
        return Some(format!("neck.fusion_stage.layers.{layer}.{part}"));
    }
    const HEAD: [(&str, &str); 3] =
        [("output_conv1.", "head.conv1."), ("output_conv2.0.", "head.conv2."), ("output_conv2.2.", "head.conv3.")];
    let (from, to) = HEAD.iter().find(|(from, _)| scratch.starts_with(from))?;
    Some(format!("{to}{}", &scratch[from.len()..]))
}

/// An original checkpoint as the model's configuration and its tensors in
/// transformers' names: [`config`], then each tensor renamed and each
/// block's `qkv` split into query, key and value rows (all still read when
/// used: [`TensorStore::split_rows_to`]). Tensors the model does not have
/// keep their names, so validation lists them.
pub fn convert(mut store: TensorStore, file_name: &str) -> Result<(DepthAnythingConfig, TensorStore)> {
    let cfg = config(&store, file_name)?;
    let hidden = cfg.backbone.hidden_size;
    let mut out = TensorStore::new(store.source_name.clone());
    let names: Vec<String> = store.names().map(str::to_string).collect();
    for name in names {
        let qkv = name.strip_prefix("pretrained.blocks.").and_then(|r| r.split_once(".attn.qkv."));
        match qkv {
            Some((block, param)) => {
                let piece =
                    |part: &str| (format!("backbone.encoder.layer.{block}.attention.attention.{part}.{param}"), hidden);
                store.split_rows_to(&name, &mut out, &[piece("query"), piece("key"), piece("value")])?;
            }
            None => {
                let new_name = hf_name(&name).unwrap_or_else(|| name.clone());
                store.move_to(&name, &mut out, new_name)?;
            }
        }
    }
    Ok((cfg, out))
}

/// The original `image2tensor`: the image as f64 in 0..1, OpenCV's cubic to
/// `(w, h)` ([`DepthPreprocessConfig::input_size`]), `(x − mean) / std` in
/// f64, then f32 `[1, 3, h, w]` on the CPU.
pub(super) fn pixel_values(img: &RgbImage, cfg: &DepthPreprocessConfig, (w, h): (usize, usize)) -> Result<Tensor> {
    let unit: Vec<f64> = img.data.iter().map(|&v| f64::from(v) / 255.0).collect();
    let resized = resize_cubic_opencv(&unit, 3, (img.height, img.width), (h, w))?;
    let plane = w * h;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = ((px[c] - f64::from(cfg.image_mean[c])) / f64::from(cfg.image_std[c])) as f32;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), &Device::Cpu)?)
}

/// OpenCV's `resize(..., INTER_CUBIC)` of an f64 image (`channels`
/// interleaved, row-major `in_h × in_w`), to the bit: the source position
/// `(dst + ½)·in/out − ½` rounded to f32, the cubic weights (A = −0.75) in
/// f32 with the fourth making the sum 1, taps clamped at the borders, rows
/// first then columns, sums in f64 (after OpenCV's `resizeGeneric_` with
/// `HResizeCubic` / `VResizeCubic`).
pub fn resize_cubic_opencv(
    src: &[f64],
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Result<Vec<f64>> {
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 || src.len() != in_h * in_w * channels {
        return Err(Error::Shape(format!(
            "cubic resize of {} values as {in_h}×{in_w}×{channels} to {out_h}×{out_w}",
            src.len()
        )));
    }
    let taps = |n_in: usize, n_out: usize| -> Vec<(isize, [f64; 4])> {
        let scale = 1.0 / (n_out as f64 / n_in as f64);
        (0..n_out)
            .map(|d| {
                const A: f32 = -0.75;
                let fx = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let sx = fx.floor();
                let x = fx - sx;
                let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
                let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
                let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
                let c3 = 1.0 - c0 - c1 - c2;
                (sx as isize - 1, [c0, c1, c2, c3].map(f64::from))
            })
            .collect()
    };
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let (rows, cols) = (taps(in_h, out_h), taps(in_w, out_w));
    // Each source row resized along x, then the rows combined.
    let mut horizontal = vec![0f64; in_h * out_w * channels];
    for y in 0..in_h {
        let row = &src[y * in_w * channels..][..in_w * channels];
        for (x, (x0, w)) in cols.iter().enumerate() {
            for c in 0..channels {
                let at = |j: usize| row[clamp(x0 + j as isize, in_w) * channels + c];
                horizontal[(y * out_w + x) * channels + c] = at(0) * w[0] + at(1) * w[1] + at(2) * w[2] + at(3) * w[3];
            }
        }
    }
    let stride = out_w * channels;
    let mut out = vec![0f64; out_h * stride];
    for (y, (y0, w)) in rows.iter().enumerate() {
        let line = |i: usize| &horizontal[clamp(y0 + i as isize, in_h) * stride..][..stride];
        let (r0, r1, r2, r3) = (line(0), line(1), line(2), line(3));
        for (k, o) in out[y * stride..][..stride].iter_mut().enumerate() {
            *o = r0[k] * w[0] + r1[k] * w[1] + r2[k] * w[2] + r3[k] * w[3];
        }
    }
    Ok(out)
}

/// PyTorch's `interpolate(mode="bilinear", align_corners=True)` of one
/// row-major plane (the original `infer_image`'s resize back): source
/// position `dst · (in − 1) / (out − 1)`, in f64 (PyTorch: f32).
pub fn resize_bilinear_aligned(
    src: &[f32],
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Result<Vec<f32>> {
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 || src.len() != in_h * in_w {
        return Err(Error::Shape(format!(
            "bilinear resize of {} values as {in_h}×{in_w} to {out_h}×{out_w}",
            src.len()
        )));
    }
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f64)> {
        let scale = if n_out > 1 { (n_in - 1) as f64 / (n_out - 1) as f64 } else { 0.0 };
        (0..n_out)
            .map(|d| {
                let real = scale * d as f64;
                let i0 = (real.floor() as usize).min(n_in - 1);
                ((i0), (i0 + 1).min(n_in - 1), real - i0 as f64)
            })
            .collect()
    };
    let (rows, cols) = (taps(in_h, out_h), taps(in_w, out_w));
    let at = |y: usize, x: usize| f64::from(src[y * in_w + x]);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, ly) in &rows {
        for &(x0, x1, lx) in &cols {
            let top = (1.0 - lx) * at(y0, x0) + lx * at(y0, x1);
            let bottom = (1.0 - lx) * at(y1, x0) + lx * at(y1, x1);
            out.push(((1.0 - ly) * top + ly * bottom) as f32);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers_layout() {
        let cases = [
            ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
            ("pretrained.norm.bias", "backbone.layernorm.bias"),
            ("pretrained.blocks.7.ls2.gamma", "backbone.encoder.layer.7.layer_scale2.lambda1"),
            ("pretrained.blocks.0.attn.proj.weight", "backbone.encoder.layer.0.attention.output.dense.weight"),
            ("depth_head.resize_layers.3.bias", "neck.reassemble_stage.layers.3.resize.bias"),
            ("depth_head.scratch.layer4_rn.weight", "neck.convs.3.weight"),
            ("depth_head.scratch.refinenet4.out_conv.weight", "neck.fusion_stage.layers.0.projection.weight"),
            (
                "depth_head.scratch.refinenet1.resConfUnit2.conv1.bias",
                "neck.fusion_stage.layers.3.residual_layer2.convolution1.bias",
            ),
            ("depth_head.scratch.output_conv2.2.weight", "head.conv3.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(hf_name(from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(hf_name("depth_head.scratch.refinenet5.out_conv.weight"), None);
        assert_eq!(hf_name("something.else"), None);
    }

    #[test]
    fn opencv_cubic_keeps_constants_and_same_size_planes() {
        let flat = vec![0.25f64; 5 * 7 * 3];
        for v in resize_cubic_opencv(&flat, 3, (5, 7), (11, 4)).unwrap() {
            assert!((v - 0.25).abs() < 1e-6, "{v}");
        }
        let ramp: Vec<f64> = (0..20).map(f64::from).collect();
        assert_eq!(resize_cubic_opencv(&ramp, 1, (4, 5), (4, 5)).unwrap(), ramp);
        assert!(resize_cubic_opencv(&ramp, 1, (4, 4), (2, 2)).is_err());
    }

    #[test]
    fn aligned_bilinear_keeps_the_corners() {
        let src = [1.0f32, 2.0, 3.0, 4.0];
        let out = resize_bilinear_aligned(&src, (2, 2), (3, 5)).unwrap();
        assert_eq!((out[0], out[4], out[10], out[14]), (1.0, 2.0, 3.0, 4.0));
        assert_eq!(out[7], 2.5);
    }

    #[test]
    fn the_lower_bound_size_keeps_both_sides_at_least_the_target() {
        let cfg = DepthPreprocessConfig::original(518);
        // 160×96: 518/96 wins, 863.3 → 868 (62 patches); the height stays 518.
        assert_eq!(cfg.input_size(160, 96), (868, 518));
        assert_eq!(cfg.input_size(90, 90), (518, 518));
        // 1024×768: the larger scale, 518/768, serves both; 690.7 rounds to 686.
        assert_eq!(cfg.input_size(1024, 768), (686, 518));
        // A side rounded below its target is rounded up: 20 / 14 = 1.43 → 14 < 20 → 28.
        assert_eq!(DepthPreprocessConfig::original(20).input_size(100, 100), (28, 28));
        // transformers' rule rounds it down.
        let dpt = DepthPreprocessConfig { height: 20, width: 20, ..DepthPreprocessConfig::depth_anything() };
        assert_eq!(dpt.input_size(100, 100), (14, 14));
    }
}
