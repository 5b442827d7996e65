//! LoRA for Flux: low-rank weight changes read from the file layouts LoRAs
//! are shared in, mapped onto the canonical (BFL) weights, and applied as
//! the model loads.
//!
//! A LoRA file holds, per module (one linear layer), a `down` matrix
//! `[rank, in]`, an `up` matrix `[out, rank]` and optionally an `alpha`; the
//! layer's weight becomes `W + strength · (alpha / rank) · up · down` (scale
//! 1 without `alpha`). Read here:
//!
//! - **kohya / sd-scripts** (most Flux LoRAs shared for ComfyUI):
//!   `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, BFL names
//!   with dots written as underscores;
//! - **BFL names**, bare or under `diffusion_model.` (ComfyUI's);
//! - **diffusers / PEFT**: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`
//!   (also bare, or kohya-style as `lora_transformer_…`). Q, K, V and the
//!   single blocks' MLP input are separate modules there; each patches only
//!   its rows of BFL's fused weight, and the final modulation's (scale,
//!   shift) halves are swapped as [`super::layout`] does for the weights.
//!
//! The weight pairs may be named `lora_down`/`lora_up`, `lora_A`/`lora_B` or
//! `lora.down`/`lora.up`; the up matrix may have a bias (PEFT's `lora_bias`,
//! `lora_B.bias`), added to the layer's bias × the same scale.
//!
//! **FLUX.1 Canny/Depth LoRAs** (BFL's `flux1-canny-dev-lora`, in BFL or
//! diffusers names) also widen the input layer `img_in` to 128 channels (the
//! control image's latents after the latents'; the weight's new columns are
//! zero before the change is added, as diffusers and ComfyUI expand it:
//! [`input_channels`]) and replace the QK-norm scales outright
//! (`*.query_norm.scale`, diffusers' `norm_q.weight`, …; [`replacement`],
//! whatever the strength, as both do). Written after the key conventions diffusers'
//! `lora_conversion_utils` and ComfyUI's `lora.py` accept (read to learn the
//! names; the code is ours).
//!
//! Text-encoder modules (CLIP-L: `lora_te1_*`, `text_encoder.*`; T5-XXL:
//! `lora_te3_*`, `text_encoder_2.*`) are kept and merged into those
//! encoders' weights when they load ([`apply_to_text_encoder`]). Refused by name:
//! XLabs' format, LoHa, LoKr, DoRA and full-difference modules. Modules that name no layer
//! of this Flux (a LoRA for another model, or for a Flux of other depth)
//! are an error listing them.
//!
//! How the change is applied is the model's business ([`LowRank`] in
//! [`crate::nn`]): a weight held dense in the compute dtype is merged once
//! at load (`W + ΔW` in f32, then rounded); one kept fp8 or as GGML blocks
//! keeps the factors and adds `ΔW` whenever the layer materialises its
//! weight, so the file's memory savings stay (as ComfyUI-GGUF patches).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::config::FluxConfig;
use super::layout::FluxLayout;
use super::model::canonical_tensors;
use crate::error::{Error, Result};
use crate::nn::LowRank;
use crate::weights::TensorStore;

/// Suffixes of a module's (down, up) pair, in the namings we read.
const PAIRS: [(&str, &str); 3] = [
    ("lora_down.weight", "lora_up.weight"),
    ("lora_A.weight", "lora_B.weight"),
    ("lora.down.weight", "lora.up.weight"),
];

/// Suffixes of an up matrix's bias, in the same namings.
const UP_BIASES: [&str; 3] = ["lora_up.bias", "lora_B.bias", "lora.up.bias"];

/// Name endings of the QK-norm scales a LoRA may replace (BFL's, diffusers').
const NORM_SCALES: [&str; 6] = [
    "query_norm.scale",
    "key_norm.scale",
    ".norm_q.weight",
    ".norm_k.weight",
    ".norm_added_q.weight",
    ".norm_added_k.weight",
];

/// The one canonical weight a LoRA may widen (its input, for FLUX.1 Canny/Depth).
const WIDENABLE: &str = "img_in.weight";

/// Tensor-name fragments of LoRA-like formats we do not apply, with their names.
const REFUSED: [(&str, &str); 7] = [
    (".processor.", "XLabs (`processor.*_lora*`)"),
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("dora_scale", "DoRA"),
    (".diff_b", "full bias difference"),
    (".diff", "full weight difference"),
    (".lora_mid.", "LoCon mid (Tucker)"),
];

/// The text encoder a LoRA module is for (kohya: `lora_te1_*` CLIP-L,
/// `lora_te3_*` T5-XXL as sd-scripts names them for Flux; diffusers:
/// `text_encoder.*`, `text_encoder_2.*`; ComfyUI: `text_encoders.clip_l.*`,
/// `text_encoders.t5xxl.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoder {
    Clip,
    T5,
}

impl TextEncoder {
    const CLIP_PREFIXES: [&'static str; 4] = ["lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l."];
    const T5_PREFIXES: [&'static str; 4] = ["lora_te3_", "lora_te2_", "text_encoder_2.", "text_encoders.t5xxl."];

    /// The encoder a module name is for, by its prefix.
    fn of(module: &str) -> Option<Self> {
        if Self::T5_PREFIXES.iter().any(|p| module.starts_with(p)) {
            Some(Self::T5)
        } else if Self::CLIP_PREFIXES.iter().any(|p| module.starts_with(p)) {
            Some(Self::Clip)
        } else {
            None
        }
    }

    /// Every module name a LoRA may use for the weight `{stem}.weight` of
    /// this encoder's checkpoint (Hugging Face names, CLIP's with or without
    /// `text_model.`).
    fn keys(self, stem: &str) -> [String; 4] {
        let u = |s: &str| s.replace('.', "_");
        match self {
            Self::Clip => {
                let n = stem.strip_prefix("text_model.").unwrap_or(stem);
                [
                    format!("lora_te1_text_model_{}", u(n)),
                    format!("lora_te_text_model_{}", u(n)),
                    format!("text_encoder.text_model.{n}"),
                    format!("text_encoders.clip_l.transformer.text_model.{n}"),
                ]
            }
            Self::T5 => [
                format!("lora_te3_{}", u(stem)),
                format!("lora_te2_{}", u(stem)),
                format!("text_encoder_2.{stem}"),
                format!("text_encoders.t5xxl.transformer.{stem}"),
            ],
        }
    }
}

impl std::fmt::Display for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Clip => "CLIP",
            Self::T5 => "T5",
        })
    }
}

/// How many unknown module names an error lists.
const LISTED: usize = 5;

/// Where a LoRA module lands in the canonical weights.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    /// Canonical weight name, e.g. `double_blocks.0.img_attn.qkv.weight`.
    weight: String,
    /// The weight's rows `[out]` and columns `[in]`.
    out: usize,
    in_dim: usize,
    /// The rows this module patches.
    row0: usize,
    rows: usize,
    /// diffusers' final modulation: (scale, shift) where BFL has (shift, scale).
    swap_halves: bool,
}

/// Every module name a LoRA may use for a layer of a Flux with `cfg`.
fn targets(cfg: &FluxConfig) -> Result<BTreeMap<String, Target>> {
    let mut map = BTreeMap::new();
    let mut add = |key: String, t: Target| match map.insert(key.clone(), t) {
        None => Ok(()),
        Some(_) => Err(Error::Shape(format!("two Flux layers answer to LoRA module `{key}`"))),
    };
    let underscored = |s: &str| s.replace('.', "_");
    for (name, shape) in canonical_tensors(cfg) {
        let (Some(stem), &[out, in_dim]) = (name.strip_suffix(".weight"), &shape[..]) else { continue };
        let whole = Target { weight: name.clone(), out, in_dim, row0: 0, rows: out, swap_halves: false };
        for key in [
            stem.to_string(),
            format!("diffusion_model.{stem}"),
            format!("model.diffusion_model.{stem}"),
            format!("lora_unet_{}", underscored(stem)),
        ] {
            add(key, whole.clone())?;
        }
        let sources = FluxLayout::Diffusers.sources(&name, cfg.hidden_size, cfg.mlp_hidden);
        let single = sources.len() == 1;
        let mut row0 = 0;
        for (source, rows) in sources {
            let rows = if single { out } else { rows };
            let src = source.strip_suffix(".weight").unwrap_or(&source);
            let swap_halves = FluxLayout::Diffusers.swaps_halves(&name);
            let part = Target { row0, rows, swap_halves, ..whole.clone() };
            for key in [src.to_string(), format!("transformer.{src}"), format!("lora_transformer_{}", underscored(src))]
            {
                add(key, part.clone())?;
            }
            row0 += rows;
        }
    }
    Ok(map)
}

/// Every name a LoRA may give a QK-norm scale it replaces (BFL's, bare or
/// under ComfyUI's prefixes; diffusers', bare or under `transformer.`) →
/// the canonical name and its shape.
fn replaceable(cfg: &FluxConfig) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut map = BTreeMap::new();
    for (name, shape) in canonical_tensors(cfg).into_iter().filter(|(n, _)| n.ends_with("_norm.scale")) {
        let mut keys = vec![name.clone(), format!("diffusion_model.{name}"), format!("model.diffusion_model.{name}")];
        for (source, _) in FluxLayout::Diffusers.sources(&name, cfg.hidden_size, cfg.mlp_hidden) {
            keys.push(format!("transformer.{source}"));
            keys.push(source);
        }
        for key in keys {
            map.insert(key, (name.clone(), shape.clone()));
        }
    }
    map
}

/// One module's change to rows of a canonical weight.
#[derive(Debug, Clone)]
struct Patch {
    target: Target,
    /// `[rank, in]`, f32, on the CPU; `in` wider than the weight's only for [`WIDENABLE`].
    down: Tensor,
    /// `[rows, rank]`, f32, on the CPU, already in BFL's row order.
    up: Tensor,
    /// The up matrix's bias `[rows]` (same order), f32, on the CPU.
    up_bias: Option<Tensor>,
    /// `alpha / rank`, or 1.
    scale: f64,
}

/// One module's change to a text encoder's weight, matched to the weight when
/// that encoder's checkpoint loads ([`apply_to_text_encoder`]).
#[derive(Debug, Clone)]
struct TextPatch {
    module: String,
    encoder: TextEncoder,
    /// `[rank, in]` and `[out, rank]`, f32, on the CPU.
    down: Tensor,
    up: Tensor,
    /// `alpha / rank`, or 1.
    scale: f64,
}

/// A Flux LoRA, read and checked against the model's sizes; its
/// text-encoder parts are checked when those encoders load.
#[derive(Debug, Clone)]
pub struct FluxLora {
    /// For messages (the file).
    pub source_name: String,
    /// Multiplies every change to Flux (ComfyUI's `strength_model`).
    pub strength: f64,
    /// Multiplies every change to the text encoders (ComfyUI's
    /// `strength_clip`); [`Self::from_store`] sets it to `strength`.
    pub text_strength: f64,
    /// By canonical weight name.
    patches: BTreeMap<String, Vec<Patch>>,
    /// Tensors replaced outright (QK-norm scales), by canonical name; f32, on the CPU.
    replaced: BTreeMap<String, Tensor>,
    text: Vec<TextPatch>,
}

/// What a tensor of a LoRA module is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    UpBias,
    Alpha,
}

/// The module a LoRA tensor belongs to and its role (`None`: not a LoRA tensor).
fn module_and_role(name: &str) -> Option<(&str, Role)> {
    let module = |suffix: &str| name.strip_suffix(suffix).and_then(|m| m.strip_suffix('.'));
    PAIRS
        .iter()
        .find_map(|(down, up)| module(down).map(|m| (m, Role::Down)).or_else(|| module(up).map(|m| (m, Role::Up))))
        .or_else(|| UP_BIASES.iter().find_map(|b| module(b)).map(|m| (m, Role::UpBias)))
        .or_else(|| name.strip_suffix(".alpha").map(|m| (m, Role::Alpha)))
}

/// A module's tensors by role.
#[derive(Debug, Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    up_bias: Option<String>,
    alpha: Option<String>,
}

impl FluxLora {
    /// Reads every module of `store` (any of the namings above) for a Flux
    /// with `cfg`; all problems of one kind in one error.
    pub fn from_store(mut store: TensorStore, cfg: &FluxConfig, strength: f64) -> Result<Self> {
        let source_name = store.source_name.clone();
        let bad = |reason: String| Error::Lora { source_name: source_name.clone(), reason };
        if !strength.is_finite() {
            return Err(bad(format!("strength {strength} is not a number")));
        }
        let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unknown_tensors = Vec::new();
        let replaceable = replaceable(cfg);
        let mut replaced_names: BTreeMap<String, String> = BTreeMap::new();
        for name in store.names() {
            if let Some((_, kind)) = REFUSED.iter().find(|(frag, _)| name.contains(frag)) {
                return Err(bad(format!(
                    "tensor `{name}` is part of a {kind} module; only plain LoRA (down/up pairs) is supported"
                )));
            }
            if let Some((canonical, _)) = replaceable.get(name) {
                if let Some(other) = replaced_names.insert(canonical.clone(), name.to_string()) {
                    return Err(bad(format!("`{other}` and `{name}` both replace `{canonical}`")));
                }
                continue;
            }
            let Some((module, role)) = module_and_role(name) else {
                unknown_tensors.push(name.to_string());
                continue;
            };
            let parts = modules.entry(module.to_string()).or_default();
            let slot = match role {
                Role::Down => &mut parts.down,
                Role::Up => &mut parts.up,
                Role::UpBias => &mut parts.up_bias,
                Role::Alpha => &mut parts.alpha,
            }
            .replace(name.to_string());
            if let Some(other) = slot {
                return Err(bad(format!("module `{module}` has two tensors for one role: `{other}` and `{name}`")));
            }
        }
        if !unknown_tensors.is_empty() {
            return Err(bad(format!(
                "{} tensor(s) are not LoRA down/up/alpha tensors or QK-norm scales, e.g. {}",
                unknown_tensors.len(),
                listed(&unknown_tensors)
            )));
        }
        let targets = targets(cfg)?;
        let mut text = Vec::new();
        let mut unknown = Vec::new();
        let mut patches: BTreeMap<String, Vec<Patch>> = BTreeMap::new();
        // Every module's name first, so a LoRA for another model is refused before any tensor is read.
        for (module, parts) in &modules {
            if parts.down.is_none() || parts.up.is_none() {
                return Err(bad(format!("module `{module}` needs both a down and an up matrix")));
            }
            if !targets.contains_key(module) && TextEncoder::of(module).is_none() {
                unknown.push(module.clone());
            }
        }
        if !unknown.is_empty() {
            return Err(bad(format!(
                "{} module(s) name no layer of this Flux model ({} double, {} single blocks), e.g. {}; \
                 is it a LoRA for another model (SD 1.5, SDXL, SD3) or another Flux size?",
                unknown.len(),
                cfg.depth,
                cfg.depth_single,
                listed(&unknown)
            )));
        }
        for (module, parts) in modules {
            let (Some(down), Some(up)) = (&parts.down, &parts.up) else { continue };
            let target = targets.get(&module);
            let encoder = TextEncoder::of(&module);
            let down = matrix(&mut store, down)?;
            let up = matrix(&mut store, up)?;
            let rank = down.dim(0)?;
            let up_rank = up.dim(1)?;
            if up_rank != rank || rank == 0 {
                return Err(bad(format!(
                    "module `{module}`: down {:?} and up {:?} differ in rank",
                    down.dims(),
                    up.dims()
                )));
            }
            let scale = match &parts.alpha {
                Some(a) => scalar(&mut store, a)? / rank as f64,
                None => 1.0,
            };
            let Some(target) = target else {
                if let Some(b) = &parts.up_bias {
                    return Err(bad(format!("`{b}`: a text encoder's LoRA with a bias is not supported")));
                }
                if let Some(encoder) = encoder {
                    text.push(TextPatch { module, encoder, down, up, scale });
                }
                continue;
            };
            let patch = flux_patch(&mut store, &module, &parts, target, (down, up, scale))?;
            patches.entry(target.weight.clone()).or_default().push(patch);
        }
        let replaced = read_replaced(&mut store, replaced_names, &replaceable)?;
        if patches.is_empty() && text.is_empty() && replaced.is_empty() {
            return Err(bad("no LoRA modules found".into()));
        }
        tracing::debug!(target: "ipaflux::flux", source = %source_name, weights = patches.len(),
            text_encoder_modules = text.len(), replaced = replaced.len(), strength, "LoRA read");
        Ok(Self { source_name, strength, text_strength: strength, patches, replaced, text })
    }

    /// The input channels this LoRA widens Flux's `img_in` to (128 for a
    /// FLUX.1 Canny/Depth LoRA); `None`: it keeps the model's.
    pub fn input_channels(&self) -> Option<usize> {
        let patches = self.patches.get(WIDENABLE)?;
        let model = patches.first()?.target.in_dim;
        patches.iter().map(|p| p.down.dim(1).unwrap_or(0)).max().filter(|&w| w > model)
    }

    /// Tensors it replaces outright (QK-norm scales).
    pub fn replaced(&self) -> usize {
        self.replaced.len()
    }

    /// Modules whose up matrix has a bias.
    pub fn with_bias(&self) -> usize {
        self.patches.values().flatten().filter(|p| p.up_bias.is_some()).count()
    }

    /// Modules for `encoder` (applied by [`apply_to_text_encoder`]).
    pub fn text_encoder_modules(&self, encoder: TextEncoder) -> usize {
        self.text.iter().filter(|p| p.encoder == encoder).count()
    }

    /// The canonical weights this LoRA changes.
    pub fn weights(&self) -> impl Iterator<Item = &str> {
        self.patches.keys().map(String::as_str)
    }

    /// Modules that change Flux.
    pub fn modules(&self) -> usize {
        self.patches.values().map(Vec::len).sum()
    }

    /// Bytes of the f32 factors kept for canonical weight `weight` by a layer
    /// that does not merge them (see [`low_rank`]).
    pub fn factor_bytes(&self, weight: &str) -> u64 {
        self.patches.get(weight).map_or(0, |ps| {
            ps.iter().map(|p| (p.down.elem_count() + p.target.out * p.down.dim(0).unwrap_or(0)) as u64 * 4).sum()
        })
    }
}

/// What a LoRA file holds, from its names and shapes alone (no tensor data,
/// no model): for `ipaflux inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSummary {
    /// Modules with a down matrix (text-encoder ones included).
    pub modules: usize,
    pub text_encoder_modules: usize,
    pub with_alpha: usize,
    /// Modules whose up matrix has a bias (PEFT's `lora_bias`).
    pub with_bias: usize,
    /// QK-norm scales it replaces (a FLUX.1 Canny/Depth LoRA's).
    pub norm_scales: usize,
    /// Smallest and largest rank.
    pub ranks: (usize, usize),
    /// The naming of its Flux modules.
    pub naming: &'static str,
}

impl LoraSummary {
    /// `None` when `store` holds no LoRA down matrices.
    pub fn of(store: &TensorStore) -> Option<Self> {
        let mut modules = BTreeMap::new();
        for name in store.names() {
            if let Some((m, Role::Down)) = module_and_role(name) {
                modules.insert(m.to_string(), store.shape(name).and_then(|s| s.first().copied()).unwrap_or(0));
            }
        }
        let ranks = (modules.values().copied().min()?, modules.values().copied().max()?);
        let is_te = |m: &str| TextEncoder::of(m).is_some();
        let first = modules.keys().find(|m| !is_te(m)).map_or("", String::as_str);
        let naming = if first.starts_with("lora_unet_") {
            "kohya / sd-scripts (BFL layers)"
        } else if first.starts_with("lora_transformer_") {
            "kohya-style (diffusers layers)"
        } else if first.contains("double_blocks")
            || first.contains("single_blocks")
            || first.starts_with("diffusion_model.")
        {
            "BFL"
        } else if first.contains("transformer_blocks") || first.starts_with("transformer.") {
            "diffusers / PEFT"
        } else {
            "not Flux's"
        };
        Some(Self {
            modules: modules.len(),
            text_encoder_modules: modules.keys().filter(|m| is_te(m)).count(),
            with_alpha: modules.keys().filter(|m| store.contains(&format!("{m}.alpha"))).count(),
            with_bias: store.names().filter(|n| matches!(module_and_role(n), Some((_, Role::UpBias)))).count(),
            norm_scales: store.names().filter(|n| NORM_SCALES.iter().any(|s| n.ends_with(s))).count(),
            ranks,
            naming,
        })
    }
}

/// Module `module`'s change to a Flux weight: its factors checked against the
/// `target` (a wider input only for [`WIDENABLE`]), its up bias read, both
/// put in BFL's row order.
fn flux_patch(
    store: &mut TensorStore,
    module: &str,
    parts: &Parts,
    target: &Target,
    (down, up, scale): (Tensor, Tensor, f64),
) -> Result<Patch> {
    let source_name = store.source_name.clone();
    let bad = |reason: String| Error::Lora { source_name: source_name.clone(), reason };
    let ((_, in_dim), (rows, _)) = (down.dims2()?, up.dims2()?);
    let widens = target.weight == WIDENABLE && in_dim > target.in_dim;
    if (in_dim != target.in_dim && !widens) || rows != target.rows {
        return Err(bad(format!(
            "module `{module}`: down {:?} and up {:?} do not fit `{}` (expected down [rank, {}], up [{}, rank])",
            down.dims(),
            up.dims(),
            target.weight,
            target.in_dim,
            target.rows
        )));
    }
    let up_bias = match &parts.up_bias {
        Some(b) => {
            let t = store.take(b)?.ok_or_else(|| Error::Shape(format!("LoRA tensor `{b}` vanished")))?;
            if t.dims() != [rows] {
                return Err(bad(format!("`{b}` has shape {:?}; the up matrix has {rows} rows", t.dims())));
            }
            Some(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
        }
        None => None,
    };
    let swap = |t: Tensor| -> Result<Tensor> {
        let half = rows / 2;
        Ok(if target.swap_halves {
            Tensor::cat(&[t.narrow(0, half, rows - half)?, t.narrow(0, 0, half)?], 0)?
        } else {
            t
        })
    };
    let (up, up_bias) = (swap(up)?, up_bias.map(swap).transpose()?);
    Ok(Patch { target: target.clone(), down, up, up_bias, scale })
}

/// The QK-norm scales a LoRA replaces (`names`: canonical → its tensor), shapes checked.
fn read_replaced(
    store: &mut TensorStore,
    names: BTreeMap<String, String>,
    replaceable: &BTreeMap<String, (String, Vec<usize>)>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut replaced = BTreeMap::new();
    for (canonical, name) in names {
        let t = store.take(&name)?.ok_or_else(|| Error::Shape(format!("LoRA tensor `{name}` vanished")))?;
        let want = replaceable.get(&name).map(|(_, shape)| shape.as_slice()).unwrap_or_default();
        if t.dims() != want {
            return Err(Error::Lora {
                source_name: store.source_name.clone(),
                reason: format!("`{name}` has shape {:?}; `{canonical}` is {want:?}", t.dims()),
            });
        }
        replaced.insert(canonical, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
    }
    Ok(replaced)
}

/// `names` as a short list for a message.
fn listed(names: &[String]) -> String {
    let mut s = names.iter().take(LISTED).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > LISTED {
        s.push_str(", …");
    }
    s
}

/// A 2-D f32 matrix (conv-style trailing 1×1 dimensions dropped).
fn matrix(store: &mut TensorStore, name: &str) -> Result<Tensor> {
    let t = store.take(name)?.ok_or_else(|| Error::Shape(format!("LoRA tensor `{name}` vanished")))?;
    let dims = t.dims().to_vec();
    let t = match dims[..] {
        [_, _] => t,
        [a, b, 1, 1] => t.reshape((a, b))?,
        _ => {
            return Err(Error::Lora {
                source_name: store.source_name.clone(),
                reason: format!("`{name}` has shape {dims:?}; a LoRA matrix is 2-D"),
            })
        }
    };
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// A one-element tensor's value.
fn scalar(store: &mut TensorStore, name: &str) -> Result<f64> {
    let t = store.take(name)?.ok_or_else(|| Error::Shape(format!("LoRA tensor `{name}` vanished")))?;
    if t.elem_count() != 1 {
        return Err(Error::Lora {
            source_name: store.source_name.clone(),
            reason: format!("`{name}` has shape {:?}; an alpha is one number", t.dims()),
        });
    }
    Ok(f64::from(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0]))
}

/// Every LoRA's patches of canonical weight `weight`, with the LoRA.
fn patches_of<'a>(loras: &'a [FluxLora], weight: &str) -> Vec<(&'a FluxLora, &'a Patch)> {
    loras.iter().flat_map(|l| l.patches.get(weight).into_iter().flatten().map(move |p| (l, p))).collect()
}

/// `part` `[rows, n]` placed at rows `[row0, row0 + rows)` of `[out, n]` (zeros elsewhere).
fn in_rows(part: Tensor, t: &Target) -> Result<Tensor> {
    let dims = part.dims().to_vec();
    let rest = |rows: usize| -> Result<Tensor> {
        let mut dims = dims.clone();
        dims[0] = rows;
        Ok(Tensor::zeros(dims, DType::F32, &Device::Cpu)?)
    };
    let mut column = Vec::with_capacity(3);
    if t.row0 > 0 {
        column.push(rest(t.row0)?);
    }
    column.push(part);
    if t.row0 + t.rows < t.out {
        column.push(rest(t.out - t.row0 - t.rows)?);
    }
    Ok(Tensor::cat(&column, 0)?)
}

/// Every LoRA's change to canonical weight `weight` as one [`LowRank`] on
/// `device`: the downs stacked (zero-padded to the widest input, for a LoRA
/// that widens `img_in`), each up placed in its rows (zeros elsewhere) and
/// scaled by `strength · alpha / rank`. `None` if no LoRA changes it.
pub fn low_rank(loras: &[FluxLora], weight: &str, device: &Device) -> Result<Option<LowRank>> {
    let patches = patches_of(loras, weight);
    let width = patches.iter().map(|(_, p)| p.down.dim(1)).collect::<candle_core::Result<Vec<_>>>()?;
    let Some(&width) = width.iter().max() else { return Ok(None) };
    let mut downs = Vec::with_capacity(patches.len());
    let mut ups = Vec::with_capacity(patches.len());
    for (lora, p) in &patches {
        ups.push(in_rows((&p.up * (lora.strength * p.scale))?, &p.target)?);
        let (rank, in_dim) = p.down.dims2()?;
        downs.push(if in_dim < width {
            Tensor::cat(&[p.down.clone(), Tensor::zeros((rank, width - in_dim), DType::F32, &Device::Cpu)?], 1)?
        } else {
            p.down.clone()
        });
    }
    let down = Tensor::cat(&downs, 0)?.to_device(device)?;
    let up = Tensor::cat(&ups, 1)?.to_device(device)?;
    Ok(Some(LowRank::new(down, up)?))
}

/// Every LoRA's change to canonical bias `bias` (`{layer}.bias`): the up
/// matrices' biases in their rows, × `strength · alpha / rank`, summed, f32
/// `[out]` on `device`. `None` if no LoRA has one for it.
pub fn bias_delta(loras: &[FluxLora], bias: &str, device: &Device) -> Result<Option<Tensor>> {
    let Some(layer) = bias.strip_suffix(".bias") else { return Ok(None) };
    let mut sum: Option<Tensor> = None;
    for (lora, p) in patches_of(loras, &format!("{layer}.weight")) {
        let Some(b) = &p.up_bias else { continue };
        let placed = in_rows((b * (lora.strength * p.scale))?, &p.target)?;
        sum = Some(match sum {
            Some(s) => (s + placed)?,
            None => placed,
        });
    }
    Ok(match sum {
        Some(s) => Some(s.to_device(device)?),
        None => None,
    })
}

/// The tensor a LoRA puts in place of canonical tensor `name` (a QK-norm
/// scale), f32 on the CPU; of several LoRAs, the last given wins.
pub fn replacement<'a>(loras: &'a [FluxLora], name: &str) -> Option<&'a Tensor> {
    loras.iter().rev().find_map(|l| l.replaced.get(name))
}

/// Flux's input channels with `loras` applied: `in_channels`, or the widest
/// a LoRA widens `img_in` to (a FLUX.1 Canny/Depth LoRA on FLUX.1-dev: 128).
pub fn input_channels(loras: &[FluxLora], in_channels: usize) -> usize {
    loras.iter().filter_map(FluxLora::input_channels).fold(in_channels, usize::max)
}

/// The text-encoder parts of `loras` for `encoder` merged into its weights
/// (`store`: that encoder's checkpoint under Hugging Face names): each
/// weight gets `Σ text_strength · (alpha / rank) · up · down`, added in f32
/// (the encoder converts to its dtype as it loads). A module that names no
/// weight of this checkpoint, or does not fit it, is an error.
pub fn apply_to_text_encoder(loras: &[FluxLora], encoder: TextEncoder, mut store: TensorStore) -> Result<TensorStore> {
    let parts: Vec<(&FluxLora, &TextPatch)> =
        loras.iter().flat_map(|l| l.text.iter().filter(|p| p.encoder == encoder).map(move |p| (l, p))).collect();
    if parts.is_empty() {
        return Ok(store);
    }
    let mut weights: BTreeMap<String, String> = BTreeMap::new();
    for name in store.names() {
        let Some(stem) = name.strip_suffix(".weight") else { continue };
        if store.shape(name).is_some_and(|s| s.len() == 2) {
            for key in encoder.keys(stem) {
                weights.insert(key, name.to_string());
            }
        }
    }
    let mut deltas: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (lora, p) in &parts {
        let Some(weight) = weights.get(&p.module) else {
            unknown.push(format!("{} ({})", p.module, lora.source_name));
            continue;
        };
        let shape = store.shape(weight).map(<[usize]>::to_vec).unwrap_or_default();
        if shape != [p.up.dim(0)?, p.down.dim(1)?] {
            return Err(Error::Lora {
                source_name: lora.source_name.clone(),
                reason: format!(
                    "module `{}`: down {:?} and up {:?} do not fit {encoder}'s `{weight}` {shape:?}",
                    p.module,
                    p.down.dims(),
                    p.up.dims()
                ),
            });
        }
        let d = (p.up.matmul(&p.down)? * (lora.text_strength * p.scale))?;
        let sum = match deltas.remove(weight) {
            Some(before) => (before + d)?,
            None => d,
        };
        deltas.insert(weight.clone(), sum);
    }
    if !unknown.is_empty() {
        return Err(Error::Lora {
            source_name: store.source_name.clone(),
            reason: format!(
                "{} LoRA module(s) for {encoder} name no weight of this {encoder} checkpoint, e.g. {}",
                unknown.len(),
                listed(&unknown)
            ),
        });
    }
    for (weight, delta) in deltas {
        let w = store.take(&weight)?.ok_or_else(|| Error::Shape(format!("`{weight}` vanished")))?;
        let merged = (w.to_device(&Device::Cpu)?.to_dtype(DType::F32)? + delta)?;
        store.insert(weight, merged)?;
    }
    tracing::debug!(target: "ipaflux::flux", %encoder, modules = parts.len(), "LoRA applied to a text encoder");
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flux::testing::tiny;

    fn store(tensors: Vec<(&str, Tensor)>) -> TensorStore {
        TensorStore::from_tensors("test-lora", tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect())
    }

    fn rand(shape: (usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn every_naming_reaches_the_same_rows() {
        let cfg = tiny();
        let map = targets(&cfg).unwrap();
        let h = cfg.hidden_size;
        let qkv = |k: &str| map.get(k).map(|t| (t.weight.as_str(), t.row0, t.rows));
        let w = "double_blocks.1.img_attn.qkv.weight";
        assert_eq!(qkv("lora_unet_double_blocks_1_img_attn_qkv"), Some((w, 0, 3 * h)));
        assert_eq!(qkv("diffusion_model.double_blocks.1.img_attn.qkv"), Some((w, 0, 3 * h)));
        assert_eq!(qkv("transformer.transformer_blocks.1.attn.to_k"), Some((w, h, h)));
        assert_eq!(qkv("lora_transformer_transformer_blocks_1_attn_to_v"), Some((w, 2 * h, h)));
        let l1 = "single_blocks.0.linear1.weight";
        assert_eq!(qkv("single_transformer_blocks.0.proj_mlp"), Some((l1, 3 * h, cfg.mlp_hidden)));
        assert!(map["transformer.norm_out.linear"].swap_halves);
        assert!(!map["lora_unet_final_layer_adaLN_modulation_1"].swap_halves);
    }

    #[test]
    fn low_rank_places_each_part_in_its_rows_with_its_scale() {
        let cfg = tiny();
        let h = cfg.hidden_size;
        let (dq, uq, dv, uv) = (rand((2, h)), rand((h, 2)), rand((3, h)), rand((h, 3)));
        let s = store(vec![
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", dq.clone()),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", uq.clone()),
            ("transformer.transformer_blocks.0.attn.to_v.lora_A.weight", dv.clone()),
            ("transformer.transformer_blocks.0.attn.to_v.lora_B.weight", uv.clone()),
            ("transformer.transformer_blocks.0.attn.to_v.alpha", Tensor::new(6f32, &Device::Cpu).unwrap()),
        ]);
        let lora = FluxLora::from_store(s, &cfg, 0.5).unwrap();
        assert_eq!(lora.modules(), 2);
        let lr = low_rank(&[lora], "double_blocks.0.img_attn.qkv.weight", &Device::Cpu).unwrap().unwrap();
        let delta = lr.delta().unwrap();
        assert_eq!(delta.dims(), [3 * h, h]);
        let q = (uq.matmul(&dq).unwrap() * 0.5).unwrap();
        let v = (uv.matmul(&dv).unwrap() * (0.5 * 6.0 / 3.0)).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&delta.narrow(0, 0, h).unwrap(), &q) < 1e-5);
        assert_eq!(delta.narrow(0, h, h).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert!(diff(&delta.narrow(0, 2 * h, h).unwrap(), &v) < 1e-5);
        let none = low_rank(&[], "double_blocks.0.img_attn.qkv.weight", &Device::Cpu).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn refusals_name_the_problem() {
        let cfg = tiny();
        let h = cfg.hidden_size;
        let err = |tensors| FluxLora::from_store(store(tensors), &cfg, 1.0).unwrap_err().to_string();
        let sdxl = err(vec![
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", rand((2, 8))),
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", rand((8, 2))),
        ]);
        assert!(sdxl.contains("name no layer of this Flux") && sdxl.contains("down_blocks_0"), "{sdxl}");
        let loha = err(vec![("lora_unet_single_blocks_0_linear2.hada_w1_a", rand((2, 2)))]);
        assert!(loha.contains("LoHa"), "{loha}");
        let xlabs = err(vec![("double_blocks.0.processor.qkv_lora1.down.weight", rand((2, h)))]);
        assert!(xlabs.contains("XLabs"), "{xlabs}");
        let shape = err(vec![
            ("lora_unet_single_blocks_0_linear2.lora_down.weight", rand((2, h + 1))),
            ("lora_unet_single_blocks_0_linear2.lora_up.weight", rand((h, 2))),
        ]);
        assert!(shape.contains("do not fit `single_blocks.0.linear2.weight`"), "{shape}");
        let half = err(vec![("lora_unet_single_blocks_0_linear2.lora_down.weight", rand((2, h)))]);
        assert!(half.contains("needs both"), "{half}");
        let stray = err(vec![("something_else", rand((2, 2)))]);
        assert!(stray.contains("not LoRA down/up/alpha"), "{stray}");
    }

    #[test]
    fn control_loras_widen_only_the_input_and_replace_norms_of_the_right_size() {
        let cfg = tiny();
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let scale = |v: f32| Tensor::full(v, d, &Device::Cpu).unwrap();
        let s = store(vec![
            ("img_in.lora_A.weight", rand((2, 2 * cfg.in_channels))),
            ("img_in.lora_B.weight", rand((h, 2))),
            ("img_in.lora_B.bias", rand((h, 1)).flatten_all().unwrap()),
            ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale", scale(2.0)),
            ("transformer.single_transformer_blocks.1.attn.norm_k.weight", scale(3.0)),
        ]);
        let lora = FluxLora::from_store(s, &cfg, 0.5).unwrap();
        assert_eq!((lora.input_channels(), lora.replaced(), lora.with_bias()), (Some(2 * cfg.in_channels), 2, 1));
        assert_eq!(input_channels(std::slice::from_ref(&lora), cfg.in_channels), 2 * cfg.in_channels);
        let r = replacement(std::slice::from_ref(&lora), "single_blocks.1.norm.key_norm.scale").unwrap();
        assert_eq!(r.to_vec1::<f32>().unwrap(), vec![3.0; d]);
        // The bias change is the up bias × strength; the down matrix is zero-padded to the widest input.
        let b = bias_delta(std::slice::from_ref(&lora), "img_in.bias", &Device::Cpu).unwrap().unwrap();
        assert_eq!(b.dims(), [h]);
        let plain = FluxLora::from_store(
            store(vec![("img_in.lora_A.weight", rand((3, cfg.in_channels))), ("img_in.lora_B.weight", rand((h, 3)))]),
            &cfg,
            1.0,
        )
        .unwrap();
        assert_eq!(plain.input_channels(), None);
        let both = low_rank(&[plain, lora], "img_in.weight", &Device::Cpu).unwrap().unwrap();
        assert_eq!(both.delta().unwrap().dims(), [h, 2 * cfg.in_channels]);

        let err = |tensors| FluxLora::from_store(store(tensors), &cfg, 1.0).unwrap_err().to_string();
        let wide = err(vec![
            ("txt_in.lora_A.weight", rand((2, 2 * cfg.context_in_dim))),
            ("txt_in.lora_B.weight", rand((h, 2))),
        ]);
        assert!(wide.contains("do not fit `txt_in.weight`"), "{wide}");
        let bias = err(vec![
            ("img_in.lora_A.weight", rand((2, cfg.in_channels))),
            ("img_in.lora_B.weight", rand((h, 2))),
            ("img_in.lora_B.bias", rand((h + 1, 1)).flatten_all().unwrap()),
        ]);
        assert!(bias.contains("img_in.lora_B.bias") && bias.contains("rows"), "{bias}");
        let norm =
            err(vec![("double_blocks.0.img_attn.norm.query_norm.scale", scale(1.0).narrow(0, 1, d - 1).unwrap())]);
        assert!(norm.contains("query_norm.scale"), "{norm}");
        let twice = err(vec![
            ("double_blocks.0.img_attn.norm.key_norm.scale", scale(1.0)),
            ("transformer.transformer_blocks.0.attn.norm_k.weight", scale(1.0)),
        ]);
        assert!(twice.contains("both replace"), "{twice}");
    }

    #[test]
    fn a_summary_needs_only_names_and_shapes() {
        let cfg = tiny();
        let h = cfg.hidden_size;
        let s = store(vec![
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", rand((2, 4))),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", rand((4, 2))),
            ("lora_unet_single_blocks_0_linear2.lora_down.weight", rand((8, h + cfg.mlp_hidden))),
            ("lora_unet_single_blocks_0_linear2.lora_up.weight", rand((h, 8))),
            ("lora_unet_single_blocks_0_linear2.alpha", Tensor::new(4f32, &Device::Cpu).unwrap()),
        ]);
        let sum = LoraSummary::of(&s).unwrap();
        let want = LoraSummary {
            modules: 2,
            text_encoder_modules: 1,
            with_alpha: 1,
            with_bias: 0,
            norm_scales: 0,
            ranks: (2, 8),
            naming: "kohya / sd-scripts (BFL layers)",
        };
        assert_eq!(sum, want);
        assert!(LoraSummary::of(&store(vec![("x.weight", rand((2, 2)))])).is_none());
    }

    #[test]
    fn text_encoder_parts_merge_into_the_encoders_weights_and_must_fit_them() {
        let cfg = tiny();
        let h = cfg.hidden_size;
        let (d, u) = (rand((2, 4)), rand((6, 2)));
        let s = store(vec![
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", d.clone()),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", u.clone()),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", Tensor::new(1f32, &Device::Cpu).unwrap()),
            ("lora_unet_single_blocks_0_linear2.lora_down.weight", rand((2, h + cfg.mlp_hidden))),
            ("lora_unet_single_blocks_0_linear2.lora_up.weight", rand((h, 2))),
        ]);
        let mut lora = FluxLora::from_store(s, &cfg, 1.0).unwrap();
        lora.text_strength = 0.5;
        assert_eq!((lora.modules(), lora.text_encoder_modules(TextEncoder::Clip)), (1, 1));
        assert_eq!(lora.text_encoder_modules(TextEncoder::T5), 0);
        assert_eq!(lora.weights().collect::<Vec<_>>(), ["single_blocks.0.linear2.weight"]);
        // CLIP saved without `text_model.` (transformers 5) and with it (ComfyUI's clip_l.safetensors).
        for name in ["encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.weight"] {
            let w = rand((6, 4));
            let clip = store(vec![(name, w.clone()), ("other.weight", rand((3, 3)))]);
            let mut merged = apply_to_text_encoder(std::slice::from_ref(&lora), TextEncoder::Clip, clip).unwrap();
            let got = merged.take(name).unwrap().unwrap();
            // text strength 0.5, alpha 1 over rank 2.
            let want = (&w + (u.matmul(&d).unwrap() * 0.25).unwrap()).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{name}: {diff}");
        }
        // The T5 store is left alone; a CLIP without that layer, or with another shape, is an error.
        let t5 = store(vec![("encoder.block.0.layer.0.SelfAttention.q.weight", rand((4, 4)))]);
        assert!(apply_to_text_encoder(std::slice::from_ref(&lora), TextEncoder::T5, t5).is_ok());
        let other = store(vec![("encoder.layers.1.mlp.fc1.weight", rand((6, 4)))]);
        let e = apply_to_text_encoder(std::slice::from_ref(&lora), TextEncoder::Clip, other).unwrap_err();
        assert!(e.to_string().contains("name no weight of this CLIP checkpoint"), "{e}");
        let wrong = store(vec![("encoder.layers.0.mlp.fc1.weight", rand((6, 5)))]);
        let e = apply_to_text_encoder(std::slice::from_ref(&lora), TextEncoder::Clip, wrong).unwrap_err();
        assert!(e.to_string().contains("do not fit CLIP"), "{e}");
        // A file of text-encoder modules only is a LoRA too.
        let only = store(vec![
            ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", rand((2, 4))),
            ("lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight", rand((4, 2))),
        ]);
        let only = FluxLora::from_store(only, &cfg, 1.0).unwrap();
        assert_eq!((only.modules(), only.text_encoder_modules(TextEncoder::T5)), (0, 1));
    }
}
