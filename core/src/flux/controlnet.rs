//! Flux ControlNets in diffusers' `FluxControlNetModel` layout: InstantX's
//! (Canny, Depth, Union), Shakker-Labs' (Union-Pro) and others trained with
//! diffusers' script.
//!
//! A ControlNet is a few Flux blocks of its own. Each step it runs them on
//! the latents, to which `controlnet_x_embedder` adds the control image's
//! packed VAE latents, with the prompt (a Union net puts its control mode's
//! embedding in front of the text tokens); each block's image stream, through
//! its own linear layer (`controlnet_blocks.N`, `controlnet_single_blocks.N`)
//! and times the conditioning scale, is a residual that Flux adds to its image
//! stream after its blocks: ControlNet block `i / ⌈depth / n⌉` after Flux
//! block `i` ([`ControlResiduals::at`]).
//!
//! Written after diffusers' `FluxControlNetModel.forward`, the residual loop
//! of `FluxTransformer2DModel.forward` and `FluxControlNetPipeline`'s
//! `controlnet_keep` (the steps a net is active in, [`ControlWindow::active`]);
//! checked against that pipeline on tiny nets
//! (tests/reference/make_controlnet_fixtures.py).
//!
//! XLabs' ControlNets read the control image's pixels instead, through a
//! hint block of their own (diffusers' `ControlNetConditioningEmbedding`:
//! 3×3 convolutions, 8× down, then 2×2 patches), and their residuals feed
//! Flux's double blocks in turn (`i mod n`, diffusers'
//! `controlnet_blocks_repeat`). Both layouts are read: diffusers'
//! (XLabs-AI/flux-controlnet-canny-diffusers) and XLabs' own (x-flux's
//! `ControlNetFlux`, `flux-canny-controlnet-v3.safetensors`: BFL's block names,
//! `input_hint_block.0..14`, `pos_embed_input`), as ComfyUI loads it.
//!
//! Its Flux blocks are registry units and can be streamed as Flux's are
//! ([`ControlNetDims::unit_specs`], [`FluxControlNet::from_store_streamed`]):
//! a 6.6 GB Union net need not be resident whole beside Flux.
//!
//! Not here: Flux's own FLUX.1 Canny/Depth models, which take the control
//! latents as input channels ([`super::sampler::Guide::channels`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::FluxConfig;
use super::hooks::{Hooks, Site};
use super::layout::FluxLayout;
use super::model::{canonical_tensors, Conditioning, FluxLoad, FluxModel, GgufWeights, Weights};
use super::stream::{BlockId, BlockSource};
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::registry::UnitSpec;
use crate::schedule::{IpWindow, COMFY_FLUX_SHIFT};
use crate::weights::TensorStore;

/// Name of the layer that adds the control latents to the image tokens: what
/// tells a diffusers Flux ControlNet.
const X_EMBEDDER: &str = "controlnet_x_embedder";
/// Its name in XLabs' own layout.
const XLABS_X_EMBEDDER: &str = "pos_embed_input";
/// XLabs' hint block (diffusers' names below it: `conv_in`, `blocks.N`, `conv_out`).
const HINT: &str = "input_hint_block";
/// A Union net's control-mode embedding table `[modes, hidden]`.
const MODE_EMBEDDER: &str = "controlnet_mode_embedder.weight";

/// A ControlNet's residuals for one model call, already scaled.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One per ControlNet double block `[B, L_img, hidden]`.
    pub double: Vec<Tensor>,
    /// One per ControlNet single block (the image tokens' rows).
    pub single: Vec<Tensor>,
    /// XLabs' way: Flux double block `i` takes residual `i mod n` instead of
    /// `i / ⌈depth / n⌉` (diffusers' `controlnet_blocks_repeat`).
    pub repeat: bool,
}

impl ControlResiduals {
    /// The residual added after Flux block `site` of a model with `depth`
    /// double and `depth_single` single blocks, if any.
    pub fn at(&self, site: Site, depth: usize, depth_single: usize) -> Result<Option<&Tensor>> {
        let (list, index, blocks, repeat) = match site {
            Site::Double { index } => (&self.double, index, depth, self.repeat),
            Site::Single { index } => (&self.single, index, depth_single, false),
        };
        if list.is_empty() {
            return Ok(None);
        }
        let n = list.len();
        let at = if repeat { index % n } else { index / blocks.div_ceil(n).max(1) };
        list.get(at).map(Some).ok_or_else(|| {
            Error::Shape(format!("{n} ControlNet residuals cannot feed block {index} of {blocks} ({site:?})"))
        })
    }
}

/// A ControlNet's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetDims {
    /// Its Flux blocks' sizes (`out_channels` 0: no final layer; RoPE axes
    /// unset until [`FluxConfig::with_axes`]).
    pub blocks: FluxConfig,
    /// Channels of the control latents (64: FLUX.1's packed VAE latents).
    pub in_channels: usize,
    /// A Union net's number of control modes; `None` for a single-purpose net.
    pub modes: Option<usize>,
    /// XLabs' kind: its hint block's convolutions, which read the control
    /// image's pixels; `None`: the net takes the control image's latents.
    pub hint: Option<HintDims>,
}

/// An XLabs hint block's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintDims {
    /// Each convolution's `[out, in, 3, 3]`, in order (`conv_in`, `blocks.*`, `conv_out`).
    pub convs: Vec<[usize; 4]>,
    /// Side of the patches its output is cut into: Flux's 2 (16 channels × 2×2 = 64).
    pub patch: usize,
}

impl HintDims {
    /// The hint block's stride: `conv_in` and `conv_out` keep the size, then
    /// every second of the `blocks` halves it (8× for XLabs' six).
    fn stride(&self, conv: usize) -> usize {
        let last = self.convs.len().saturating_sub(1);
        if conv > 0 && conv < last && conv % 2 == 0 {
            2
        } else {
            1
        }
    }

    /// How much smaller each token's pixel square is than the image (8 × patch: 16).
    pub fn pixels_per_token(&self) -> usize {
        (0..self.convs.len()).map(|i| self.stride(i)).product::<usize>() * self.patch
    }

    /// Its tensors' canonical (diffusers) names and shapes.
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let last = self.convs.len().saturating_sub(1);
        let mut v = Vec::new();
        for (i, shape) in self.convs.iter().enumerate() {
            let p = hint_conv_name(i, last);
            v.push((format!("{p}.weight"), shape.to_vec()));
            v.push((format!("{p}.bias"), vec![shape[0]]));
        }
        v
    }
}

/// The canonical name of hint convolution `i` of `0..=last`.
fn hint_conv_name(i: usize, last: usize) -> String {
    match i {
        0 => format!("{HINT}.conv_in"),
        i if i == last => format!("{HINT}.conv_out"),
        i => format!("{HINT}.blocks.{}", i - 1),
    }
}

/// A store in diffusers' names for the ControlNet's own layers: XLabs'
/// `pos_embed_input` and its hint block's `nn.Sequential` indices (the
/// convolutions; SiLUs between hold no tensors) renamed; its blocks keep
/// their (BFL) names for [`FluxLayout`].
fn canonical_own_names(store: TensorStore) -> TensorStore {
    if !store.contains(&format!("{XLABS_X_EMBEDDER}.weight")) {
        return store;
    }
    let index = |n: &str| n.strip_prefix(&format!("{HINT}."))?.split('.').next()?.parse::<usize>().ok();
    let indices: std::collections::BTreeSet<usize> = store.names().filter_map(index).collect();
    let order: Vec<usize> = indices.into_iter().collect();
    let last = order.len().saturating_sub(1);
    store.filter_rename(|n| {
        if let Some(rest) = n.strip_prefix(XLABS_X_EMBEDDER) {
            return Some(format!("{X_EMBEDDER}{rest}"));
        }
        match (index(n), n.rsplit_once('.')) {
            (Some(i), Some((_, leaf))) => {
                let at = order.iter().position(|&o| o == i)?;
                Some(format!("{}.{leaf}", hint_conv_name(at, last)))
            }
            _ => Some(n.to_string()),
        }
    })
}

/// The hint block's sizes from `store` (canonical names), checked: each
/// convolution takes the last one's channels, the first the image's 3, and
/// the last's channels in `patch × patch` squares make `in_channels`.
fn infer_hint(store: &TensorStore, in_channels: usize) -> Result<Option<HintDims>> {
    let first = format!("{HINT}.conv_in.weight");
    let Some(conv_in) = store.shape(&first) else { return Ok(None) };
    let bad = |why: String| Error::Shape(format!("{}: the ControlNet's hint block: {why}", store.source_name));
    let conv = |name: &str| -> Result<[usize; 4]> {
        match store.shape(name) {
            Some(&[o, i, kh, kw]) if kh == 3 && kw == 3 => Ok([o, i, kh, kw]),
            Some(s) => Err(bad(format!("`{name}` has shape {s:?}, not [out, in, 3, 3]"))),
            None => Err(bad(format!("no `{name}`"))),
        }
    };
    let mut convs = vec![conv(&first)?];
    let blocks = store.names().filter(|n| n.starts_with(&format!("{HINT}.blocks.")) && n.ends_with(".weight")).count();
    for k in 0..blocks {
        convs.push(conv(&format!("{HINT}.blocks.{k}.weight"))?);
    }
    convs.push(conv(&format!("{HINT}.conv_out.weight"))?);
    if conv_in[1] != 3 {
        return Err(bad(format!("its first convolution takes {} channels, not RGB's 3", conv_in[1])));
    }
    if let Some(w) = convs.windows(2).find(|w| w[1][1] != w[0][0]) {
        return Err(bad(format!("a convolution of {} channels follows one of {}", w[1][1], w[0][0])));
    }
    let out = convs.last().map_or(0, |c| c[0]);
    if out * 4 != in_channels {
        return Err(bad(format!(
            "its {out} output channels do not make {in_channels}-channel tokens in Flux's 2×2 patches"
        )));
    }
    Ok(Some(HintDims { convs, patch: 2 }))
}

impl ControlNetDims {
    /// Sizes from tensor names and shapes alone (no tensor read), in either
    /// layout; what is not a Flux ControlNet is refused.
    pub fn infer(store: &TensorStore) -> Result<Self> {
        let store = canonical_own_names(store.clone());
        let x_embedder = store.shape(&format!("{X_EMBEDDER}.weight")).ok_or_else(|| Error::Format {
            source_name: store.source_name.clone(),
            format: "Flux ControlNet",
            reason: format!("no `{X_EMBEDDER}.weight` (or XLabs' `{XLABS_X_EMBEDDER}.weight`): not a Flux ControlNet"),
        })?;
        let in_channels = x_embedder.get(1).copied().unwrap_or(0);
        let modes = store.shape(MODE_EMBEDDER).and_then(|s| s.first().copied());
        let layout = if store.names().any(|n| n.starts_with("double_blocks.") || n.starts_with("single_blocks.")) {
            FluxLayout::Bfl
        } else {
            FluxLayout::Diffusers
        };
        let blocks = layout.infer_without_final_layer(&store)?;
        let hint = infer_hint(&store, in_channels)?;
        Ok(Self { blocks, in_channels, modes, hint })
    }

    /// Every tensor it has, with its shape (canonical names for its blocks).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = canonical_tensors(&self.blocks);
        v.extend(own_tensors(self));
        v
    }

    /// Bytes it takes loaded in `dtype`: everything in `dtype` but XLabs'
    /// hint block, which is held in f32.
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        let (hint, rest): (Vec<_>, Vec<_>) =
            self.expected_tensors().into_iter().partition(|(n, _)| n.starts_with(&format!("{HINT}.")));
        crate::weights::loaded_bytes(&rest, dtype) + crate::weights::loaded_bytes(&hint, DType::F32)
    }

    /// Its registry units, as Flux's ([`super::stream::unit_specs`]): the
    /// base unit (the embedders and every layer of its own, the hint block in
    /// f32), then one per block in execution order, each with its exact
    /// bytes; their sum is [`Self::loaded_bytes`]. The blocks can be
    /// streamed ([`FluxControlNet::from_store_streamed`]); the base unit is
    /// always resident.
    pub fn unit_specs(&self, dtype: DType) -> Vec<UnitSpec> {
        let mut units = super::stream::unit_specs(&self.blocks, dtype);
        let (hint, rest): (Vec<_>, Vec<_>) =
            own_tensors(self).into_iter().partition(|(n, _)| n.starts_with(&format!("{HINT}.")));
        let own = crate::weights::loaded_bytes(&rest, dtype) + crate::weights::loaded_bytes(&hint, DType::F32);
        if let Some(base) = units.first_mut() {
            base.bytes += own;
        }
        units
    }

    /// Refuses a net whose sizes do not fit `flux`'s (a ControlNet for another model).
    pub fn check_compatible(&self, flux: &FluxConfig) -> Result<()> {
        let b = &self.blocks;
        let pairs = [
            ("hidden size", b.hidden_size, flux.hidden_size),
            ("attention heads", b.num_heads, flux.num_heads),
            ("text token width", b.context_in_dim, flux.context_in_dim),
            ("pooled vector width", b.vec_in_dim, flux.vec_in_dim),
            ("control latent channels", self.in_channels, LATENT_INPUT_CHANNELS),
        ];
        match pairs.iter().find(|(_, ours, theirs)| ours != theirs) {
            Some((what, ours, theirs)) => Err(Error::Shape(format!(
                "this ControlNet's {what} is {ours} where this Flux's is {theirs}: it was trained for another model"
            ))),
            None => Ok(()),
        }
    }
}

/// A Flux latent token's channels (16 VAE channels × 2×2 patch): what a
/// ControlNet takes for the latents and for the control latents.
const LATENT_INPUT_CHANNELS: usize = 64;

/// A Flux ControlNet on one device.
#[derive(Debug, Clone)]
pub struct FluxControlNet {
    /// Its Flux blocks and embedders (no final layer).
    body: FluxModel,
    x_embedder: Linear,
    blocks: Vec<Linear>,
    single_blocks: Vec<Linear>,
    /// `[modes, hidden]` in the model dtype.
    mode_embedder: Option<Tensor>,
    /// XLabs' hint block: (weight, bias, stride) per convolution, f32.
    hint: Vec<(Tensor, Tensor, usize)>,
    dims: ControlNetDims,
}

/// Whether `store` holds a Flux ControlNet (diffusers' layout, or XLabs' own).
pub fn is_controlnet(store: &TensorStore) -> bool {
    store.contains(&format!("{X_EMBEDDER}.weight")) || store.contains(&format!("{XLABS_X_EMBEDDER}.weight"))
}

impl FluxControlNet {
    /// Reads a ControlNet in diffusers' layout or XLabs' own: its Flux blocks
    /// through [`FluxLayout`] (every tensor checked), its own layers beside them.
    /// `axes_dim`: diffusers' `axes_dims_rope`, needed only for head sizes
    /// other than FLUX.1's 128.
    pub fn from_store(store: TensorStore, axes_dim: Option<Vec<usize>>, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_store_streamed(store, axes_dim, dtype, device, &[])?.0)
    }

    /// [`Self::from_store`] with the Flux blocks `streamed` left out of the
    /// model, as [`FluxModel::from_store_streamed`] leaves them: their
    /// tensors are returned (canonical names, in `dtype` where they stay) for
    /// the [`BlockSource`] the owner gives it ([`Self::set_block_source`]).
    pub fn from_store_streamed(
        store: TensorStore,
        axes_dim: Option<Vec<usize>>,
        dtype: DType,
        device: &Device,
        streamed: &[BlockId],
    ) -> Result<(Self, BTreeMap<String, Tensor>)> {
        let dims = ControlNetDims::infer(&store)?;
        let mut store = canonical_own_names(store);
        let mut own = TensorStore::new(store.source_name.clone());
        let own_name = |n: &&str| n.starts_with("controlnet_") || n.starts_with(&format!("{HINT}."));
        let names: Vec<String> = store.names().filter(own_name).map(str::to_string).collect();
        for name in names {
            store.move_to(&name, &mut own, name.clone())?;
        }
        let (layout, body) = FluxLayout::detect(store)?;
        let cfg = dims.blocks.clone().with_axes(axes_dim)?;
        own.validate(&own_tensors(&dims))?;
        let canonical = layout.canonicalize(body, &canonical_tensors(&cfg), cfg.hidden_size, cfg.mlp_hidden)?;
        let load = FluxLoad { dtype, device, streamed, gguf: GgufWeights::Dequantized, loras: &[] };
        let (body, kept) = FluxModel::from_canonical_store(cfg, canonical, &load)?;
        let mut w = Weights::from_store(own, dtype, device);
        let x_embedder = w.linear(X_EMBEDDER)?;
        let (depth, depth_single) = (dims.blocks.depth, dims.blocks.depth_single);
        let blocks = (0..depth).map(|i| w.linear(&format!("controlnet_blocks.{i}"))).collect::<Result<_>>()?;
        let single_blocks =
            (0..depth_single).map(|i| w.linear(&format!("controlnet_single_blocks.{i}"))).collect::<Result<_>>()?;
        let mode_embedder = if dims.modes.is_some() { Some(w.get(MODE_EMBEDDER)?) } else { None };
        let mut hint = Vec::new();
        if let Some(h) = &dims.hint {
            // Small, and run in f32: candle's CPU convolutions have no bf16 path.
            let last = h.convs.len().saturating_sub(1);
            for i in 0..h.convs.len() {
                let p = hint_conv_name(i, last);
                let mut f32 = |n: String| -> Result<Tensor> { Ok(w.get_stored(&n)?.to_dtype(DType::F32)?) };
                hint.push((f32(format!("{p}.weight"))?, f32(format!("{p}.bias"))?, h.stride(i)));
            }
        }
        tracing::debug!(target: "ipaflux::flux", ?dims, streamed = streamed.len(), "loaded a Flux ControlNet");
        let dims = ControlNetDims { blocks: body.cfg.clone(), ..dims };
        Ok((Self { body, x_embedder, blocks, single_blocks, mode_embedder, hint, dims }, kept))
    }

    /// Where its streamed blocks come from (as [`FluxModel::set_block_source`]).
    pub fn set_block_source(&mut self, source: Arc<dyn BlockSource>) {
        self.body.set_block_source(source);
    }

    /// Uses `attention` in its blocks (as [`FluxModel::set_attention`]).
    pub fn set_attention(&mut self, attention: crate::nn::Attention) {
        self.body.set_attention(attention);
    }

    /// Uses fused modulation kernels in its blocks (as [`FluxModel::set_fused_modulation`]).
    pub fn set_fused_modulation(&mut self, kernels: Option<std::sync::Arc<dyn crate::nn::FusedModulation>>) {
        self.body.set_fused_modulation(kernels);
    }

    /// Its sizes (RoPE axes resolved).
    pub fn dims(&self) -> &ControlNetDims {
        &self.dims
    }

    /// Whether it reads the control image's pixels (XLabs' hint block), not its latents.
    pub fn takes_pixels(&self) -> bool {
        !self.hint.is_empty()
    }

    /// XLabs' hint block on pixels `[B, 3, H, W]` in [-1, 1]: tokens `[B, L, 4·C]`,
    /// packed as the latents are ([`super::sampler::pack`]).
    fn hint_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut x = pixels.to_dtype(DType::F32)?;
        let last = self.hint.len().saturating_sub(1);
        for (i, (w, b, stride)) in self.hint.iter().enumerate() {
            x = x.conv2d(w, 1, *stride, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
            if i < last {
                x = x.silu()?;
            }
        }
        super::sampler::pack(&x)
    }

    /// The residuals for latents `x [B, L_img, in_channels]` at `img_ids`,
    /// with the control image `control` — its packed latents (same shape as
    /// `x`), or for a net that [`Self::takes_pixels`] its pixels `[B, 3, H, W]`
    /// in [-1, 1] at the output size — the prompt `cond` and a Union net's
    /// `mode`, times `scale`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        img_ids: &[[f32; 3]],
        control: &Tensor,
        mode: Option<usize>,
        cond: &Conditioning,
        sigma: f64,
        scale: f64,
    ) -> Result<ControlResiduals> {
        let control = if self.takes_pixels() { self.hint_tokens(control)? } else { control.clone() };
        if control.dims() != x.dims() {
            return Err(Error::Shape(format!(
                "the control image's tokens {:?} for latents {:?}: it must be given at the output size",
                control.dims(),
                x.dims()
            )));
        }
        let dt = self.body.dtype;
        let mut emb = self.body.embed(x, cond, sigma)?;
        emb.img = (emb.img + self.x_embedder.forward(&control.to_dtype(dt)?)?)?;
        match (&self.mode_embedder, mode) {
            (Some(table), Some(mode)) => {
                let modes = table.dim(0)?;
                if mode >= modes {
                    return Err(Error::Unsupported(format!(
                        "control mode {mode}: this Union ControlNet has modes 0..{modes}"
                    )));
                }
                let (b, _, h) = emb.txt.dims3()?;
                let token = table.narrow(0, mode, 1)?.unsqueeze(0)?.broadcast_as((b, 1, h))?;
                emb.txt = Tensor::cat(&[&token, &emb.txt], 1)?;
            }
            (Some(_), None) => {
                return Err(Error::Unsupported("this is a Union ControlNet: give a control mode".into()));
            }
            (None, Some(mode)) => {
                return Err(Error::Unsupported(format!(
                    "control mode {mode} given, but this ControlNet has no modes (not a Union net)"
                )));
            }
            (None, None) => {}
        }
        let (mut double, mut single) = (Vec::new(), Vec::new());
        let mut keep = |site: Site, img: &Tensor| -> Result<Option<Tensor>> {
            match site {
                Site::Double { .. } => double.push(img.clone()),
                Site::Single { .. } => single.push(img.clone()),
            }
            Ok(None)
        };
        self.body.run(emb, img_ids, sigma, 0, Hooks::none(), &mut keep)?;
        let project = |features: Vec<Tensor>, layers: &[Linear]| -> Result<Vec<Tensor>> {
            features.iter().zip(layers).map(|(f, l)| Ok(l.forward(&f.contiguous()?)?.affine(scale, 0.0)?)).collect()
        };
        Ok(ControlResiduals {
            double: project(double, &self.blocks)?,
            single: project(single, &self.single_blocks)?,
            // diffusers' `controlnet_blocks_repeat`: XLabs' nets (those with a hint block).
            repeat: self.takes_pixels(),
        })
    }
}

/// The tensors a ControlNet has besides its Flux blocks.
fn own_tensors(d: &ControlNetDims) -> Vec<(String, Vec<usize>)> {
    let h = d.blocks.hidden_size;
    let mut v = vec![(format!("{X_EMBEDDER}.weight"), vec![h, d.in_channels]), (format!("{X_EMBEDDER}.bias"), vec![h])];
    let blocks = (0..d.blocks.depth).map(|i| format!("controlnet_blocks.{i}"));
    for p in blocks.chain((0..d.blocks.depth_single).map(|i| format!("controlnet_single_blocks.{i}"))) {
        v.push((format!("{p}.weight"), vec![h, h]));
        v.push((format!("{p}.bias"), vec![h]));
    }
    if let Some(m) = d.modes {
        v.push((MODE_EMBEDDER.into(), vec![m, h]));
    }
    v.extend(d.hint.iter().flat_map(HintDims::tensors));
    v
}

/// One ControlNet's part in sampling ([`super::sampler::Guide::control`]).
#[derive(Clone, Copy)]
pub struct ControlInput<'a> {
    pub net: &'a FluxControlNet,
    /// The control image's packed latents `[B, L_img, 64]`, or its pixels
    /// `[B, 3, H, W]` in [-1, 1] for a net that [`FluxControlNet::takes_pixels`].
    pub image: &'a Tensor,
    /// A Union net's control mode (InstantX's: 0 canny, 1 tile, 2 depth,
    /// 3 blur, 4 pose, 5 gray, 6 low quality).
    pub mode: Option<usize>,
    /// diffusers' `controlnet_conditioning_scale` (ComfyUI's strength).
    pub scale: f64,
    pub window: ControlWindow,
}

/// The steps a ControlNet is used in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ControlWindow {
    /// diffusers' `control_guidance_start` and `_end`: fractions of the
    /// steps sampled; off before `start` and after `end`.
    Steps { start: f64, end: f64 },
    /// ComfyUI's `start_percent` and `end_percent` (Apply ControlNet): on
    /// where the step's sigma is inside the window they map to.
    Sigmas(IpWindow),
}

impl Default for ControlWindow {
    fn default() -> Self {
        Self::Steps { start: 0.0, end: 1.0 }
    }
}

impl ControlWindow {
    /// ComfyUI's window from its percents (`percent_to_sigma` at Flux's shift).
    pub fn from_percent(start_percent: f64, end_percent: f64) -> Self {
        Self::Sigmas(IpWindow::from_percent(start_percent, end_percent, COMFY_FLUX_SHIFT))
    }

    /// Whether step `step` of `steps`, at `sigma`, uses the net: diffusers'
    /// `controlnet_keep` (off where `step / steps < start` or
    /// `(step + 1) / steps > end`, where its residuals are zeros), or
    /// ComfyUI's `end ≤ σ ≤ start` (its ControlBase's `timestep_range`).
    pub fn active(&self, step: usize, steps: usize, sigma: f64) -> bool {
        match *self {
            Self::Steps { start, end } => {
                let steps = steps.max(1) as f64;
                !(step as f64 / steps < start || (step + 1) as f64 / steps > end)
            }
            Self::Sigmas(window) => window.contains(sigma),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn residuals(double: usize, single: usize, repeat: bool) -> ControlResiduals {
        let t = |i: usize| Tensor::full(i as f32, (1, 1, 1), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        ControlResiduals { double: (0..double).map(t).collect(), single: (0..single).map(t).collect(), repeat }
    }

    fn which(r: &ControlResiduals, site: Site, depth: usize, single: usize) -> Option<f32> {
        let t = r.at(site, depth, single).unwrap_or_else(|e| panic!("{e}"));
        t.map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap_or_else(|e| panic!("{e}"))[0])
    }

    #[test]
    fn controlnet_blocks_feed_flux_blocks_as_diffusers_spaces_them() {
        // InstantX's 5 double and 10 single blocks over FLUX.1's 19 and 38: ⌈19/5⌉ = 4, ⌈38/10⌉ = 4.
        let r = residuals(5, 10, false);
        let doubles: Vec<_> = (0..19).map(|i| which(&r, Site::Double { index: i }, 19, 38)).collect();
        assert_eq!(doubles[..5], [Some(0.0), Some(0.0), Some(0.0), Some(0.0), Some(1.0)]);
        assert_eq!(doubles[18], Some(4.0));
        assert_eq!(which(&r, Site::Single { index: 37 }, 19, 38), Some(9.0));
        assert_eq!(which(&r, Site::Single { index: 3 }, 19, 38), Some(0.0));
        // XLabs' repeat: block i takes i mod n; none for a kind the net lacks.
        let r = residuals(2, 0, true);
        assert_eq!(which(&r, Site::Double { index: 5 }, 19, 38), Some(1.0));
        assert_eq!(which(&r, Site::Single { index: 0 }, 19, 38), None);
        // More residuals than blocks: the spacing stays in range.
        assert!(residuals(3, 0, false).at(Site::Double { index: 1 }, 2, 0).is_ok());
    }

    /// InstantX's FLUX.1-dev-Controlnet-Union: 5 double and 10 single blocks, 10 modes.
    fn instantx_union() -> ControlNetDims {
        let blocks = FluxConfig { depth: 5, depth_single: 10, out_channels: 0, ..FluxConfig::dev() };
        ControlNetDims { blocks, in_channels: 64, modes: Some(10), hint: None }
    }

    #[test]
    fn a_controlnets_units_are_its_bytes_block_by_block() {
        let union = instantx_union();
        let units = union.unit_specs(DType::BF16);
        assert_eq!(units.len(), 1 + 5 + 10);
        // diffusers' FluxControlNetModel at these sizes: 3,301,956,608 parameters.
        assert_eq!(union.loaded_bytes(DType::BF16), 6_603_913_216);
        assert_eq!(units.iter().map(|u| u.bytes).sum::<u64>(), union.loaded_bytes(DType::BF16));
        // Its blocks are Flux's blocks, byte for byte (FLUX.1-dev's 679,662,592 and 283,183,616 in bf16).
        assert!(units[1..6].iter().all(|u| u.bytes == 679_662_592), "{units:?}");
        assert!(units[6..].iter().all(|u| u.bytes == 283_183_616), "{units:?}");
        // The scenario that plans it lists these units.
        let scenario: serde_json::Value =
            serde_json::from_str(include_str!("../registry/scenarios/flux-dev-controlnet.json")).unwrap_or_default();
        let net = &scenario["models"][3];
        assert_eq!(net["name"], "controlnet-union");
        let listed: Vec<(u64, u64)> = net["units"]
            .as_array()
            .map(|a| a.iter().map(|u| (u["count"].as_u64().unwrap_or(1), u["size"].as_u64().unwrap_or(0))).collect())
            .unwrap_or_default();
        assert_eq!(listed, [(1, units[0].bytes), (5, units[1].bytes), (10, units[6].bytes)]);
        // XLabs' hint block is held in f32, in the base unit.
        let hint = HintDims { convs: vec![[16, 3, 3, 3], [16, 16, 3, 3]], patch: 2 };
        let xlabs = ControlNetDims { hint: Some(hint), modes: None, ..instantx_union() };
        let units = xlabs.unit_specs(DType::BF16);
        assert_eq!(units.iter().map(|u| u.bytes).sum::<u64>(), xlabs.loaded_bytes(DType::BF16));
    }

    #[test]
    fn the_keep_window_is_diffusers_controlnet_keep() {
        let sigmas = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1];
        let steps = |w: ControlWindow| (0..6).map(|s| w.active(s, 6, sigmas[s])).collect::<Vec<_>>();
        // Written out for 6 steps: end 0.8 keeps steps 0..=3; start 0.2 drops 0 and 1 (1/6 < 0.2).
        assert_eq!(steps(ControlWindow::Steps { start: 0.0, end: 0.8 }), [true, true, true, true, false, false]);
        assert_eq!(steps(ControlWindow::Steps { start: 0.2, end: 1.0 }), [false, false, true, true, true, true]);
        assert_eq!(steps(ControlWindow::default()), [true; 6]);
        assert_eq!(steps(ControlWindow::Steps { start: 0.5, end: 0.5 }), [false; 6]);
        // ComfyUI's percents go by sigma: 0..1 is every step; 0..0 only σ = 1; the
        // middle half is σ within percent_to_sigma(0.25)..percent_to_sigma(0.75).
        assert_eq!(steps(ControlWindow::from_percent(0.0, 1.0)), [true; 6]);
        assert_eq!(steps(ControlWindow::from_percent(0.0, 0.0)), [true, false, false, false, false, false]);
        let (hi, lo) = (
            crate::schedule::percent_to_sigma(0.25, COMFY_FLUX_SHIFT),
            crate::schedule::percent_to_sigma(0.75, COMFY_FLUX_SHIFT),
        );
        let want: Vec<bool> = sigmas.iter().map(|&s| lo <= s && s <= hi).collect();
        assert_eq!(steps(ControlWindow::from_percent(0.25, 0.75)), want);
        assert!(want.contains(&true) && want.contains(&false), "the window cuts this schedule");
    }
}
