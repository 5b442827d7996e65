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
//! Not here: XLabs' ControlNets (their own tensor names and a pixel-space
//! `input_hint_block`; refused with a message), and Flux's own FLUX.1
//! Canny/Depth models, which take the control latents as input channels
//! ([`super::sampler::Guide::channels`]).

use candle_core::{DType, Device, Tensor};

use super::config::FluxConfig;
use super::hooks::{Hooks, Site};
use super::layout::FluxLayout;
use super::model::{canonical_tensors, Conditioning, FluxLoad, FluxModel, GgufWeights, Weights};
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::weights::TensorStore;

/// Name of the layer that adds the control latents to the image tokens: what
/// tells a diffusers Flux ControlNet.
const X_EMBEDDER: &str = "controlnet_x_embedder";
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
}

impl ControlNetDims {
    /// Sizes from tensor names and shapes alone (no tensor read), after
    /// refusing what is not a diffusers Flux ControlNet.
    pub fn infer(store: &TensorStore) -> Result<Self> {
        if store.names().any(|n| n.starts_with("input_hint_block.")) {
            return Err(Error::Unsupported(format!(
                "{}: an XLabs ControlNet (`input_hint_block`): only diffusers-layout Flux ControlNets \
                 (InstantX's, Shakker-Labs', `controlnet_x_embedder`) are supported",
                store.source_name
            )));
        }
        let x_embedder = store.shape(&format!("{X_EMBEDDER}.weight")).ok_or_else(|| Error::Format {
            source_name: store.source_name.clone(),
            format: "Flux ControlNet",
            reason: format!("no `{X_EMBEDDER}.weight`: not a diffusers Flux ControlNet"),
        })?;
        let in_channels = x_embedder.get(1).copied().unwrap_or(0);
        let modes = store.shape(MODE_EMBEDDER).and_then(|s| s.first().copied());
        let blocks = FluxLayout::Diffusers.infer_without_final_layer(store)?;
        Ok(Self { blocks, in_channels, modes })
    }

    /// Every tensor it has, with its shape (canonical names for its blocks).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = canonical_tensors(&self.blocks);
        v.extend(own_tensors(self));
        v
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
    dims: ControlNetDims,
}

/// Whether `store` holds a diffusers Flux ControlNet (or XLabs' kind, which
/// [`FluxControlNet::from_store`] refuses with a message).
pub fn is_controlnet(store: &TensorStore) -> bool {
    store.contains(&format!("{X_EMBEDDER}.weight")) || store.names().any(|n| n.starts_with("input_hint_block."))
}

impl FluxControlNet {
    /// Reads a diffusers-layout ControlNet: its Flux blocks through
    /// [`FluxLayout`] (every tensor checked), its own layers beside them.
    /// `axes_dim`: diffusers' `axes_dims_rope`, needed only for head sizes
    /// other than FLUX.1's 128.
    pub fn from_store(store: TensorStore, axes_dim: Option<Vec<usize>>, dtype: DType, device: &Device) -> Result<Self> {
        let mut store = store;
        let dims = ControlNetDims::infer(&store)?;
        let mut own = TensorStore::new(store.source_name.clone());
        let names: Vec<String> = store.names().filter(|n| n.starts_with("controlnet_")).map(str::to_string).collect();
        for name in names {
            store.move_to(&name, &mut own, name.clone())?;
        }
        let (layout, body) = FluxLayout::detect(store)?;
        if layout != FluxLayout::Diffusers {
            return Err(Error::Unsupported(format!(
                "{}: a Flux ControlNet's blocks in BFL's names: only diffusers' layout is supported",
                body.source_name
            )));
        }
        let cfg = dims.blocks.clone().with_axes(axes_dim)?;
        own.validate(&own_tensors(&dims))?;
        let canonical = layout.canonicalize(body, &canonical_tensors(&cfg), cfg.hidden_size, cfg.mlp_hidden)?;
        let load = FluxLoad { dtype, device, streamed: &[], gguf: GgufWeights::Dequantized, loras: &[] };
        let (body, _) = FluxModel::from_canonical_store(cfg, canonical, &load)?;
        let mut w = Weights::from_store(own, dtype, device);
        let x_embedder = w.linear(X_EMBEDDER)?;
        let (depth, depth_single) = (dims.blocks.depth, dims.blocks.depth_single);
        let blocks = (0..depth).map(|i| w.linear(&format!("controlnet_blocks.{i}"))).collect::<Result<_>>()?;
        let single_blocks =
            (0..depth_single).map(|i| w.linear(&format!("controlnet_single_blocks.{i}"))).collect::<Result<_>>()?;
        let mode_embedder = if dims.modes.is_some() { Some(w.get(MODE_EMBEDDER)?) } else { None };
        tracing::debug!(target: "ipaflux::flux", ?dims, "loaded a Flux ControlNet");
        let dims = ControlNetDims { blocks: body.cfg.clone(), ..dims };
        Ok(Self { body, x_embedder, blocks, single_blocks, mode_embedder, dims })
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

    /// The residuals for latents `x [B, L_img, in_channels]` at `img_ids`,
    /// with the control image's packed latents `control` (same shape), the
    /// prompt `cond` and a Union net's `mode`, times `scale`.
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
        if control.dims() != x.dims() {
            return Err(Error::Shape(format!(
                "control latents {:?} for latents {:?}: the control image must be encoded at the output size",
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
            repeat: false,
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
    v
}

/// One ControlNet's part in sampling ([`super::sampler::Guide::control`]).
#[derive(Clone, Copy)]
pub struct ControlInput<'a> {
    pub net: &'a FluxControlNet,
    /// The control image's packed latents `[B, L_img, 64]`.
    pub latents: &'a Tensor,
    /// A Union net's control mode (InstantX's: 0 canny, 1 tile, 2 depth,
    /// 3 blur, 4 pose, 5 gray, 6 low quality).
    pub mode: Option<usize>,
    /// diffusers' `controlnet_conditioning_scale` (ComfyUI's strength).
    pub scale: f64,
    pub window: ControlWindow,
}

/// The steps a ControlNet is used in, as fractions of the steps sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlWindow {
    /// Off before this fraction (diffusers' `control_guidance_start`, ComfyUI's `start_percent`).
    pub start: f64,
    /// Off after this fraction (`control_guidance_end`, `end_percent`).
    pub end: f64,
}

impl Default for ControlWindow {
    fn default() -> Self {
        Self { start: 0.0, end: 1.0 }
    }
}

impl ControlWindow {
    /// Whether step `step` of `steps` uses the net: diffusers'
    /// `controlnet_keep` (off where `step / steps < start` or
    /// `(step + 1) / steps > end`, where its residuals are zeros).
    pub fn active(&self, step: usize, steps: usize) -> bool {
        let steps = steps.max(1) as f64;
        !(step as f64 / steps < self.start || (step + 1) as f64 / steps > self.end)
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

    #[test]
    fn the_keep_window_is_diffusers_controlnet_keep() {
        let steps = |w: ControlWindow| (0..6).map(|s| w.active(s, 6)).collect::<Vec<_>>();
        // Written out for 6 steps: end 0.8 keeps steps 0..=3; start 0.2 drops 0 and 1 (1/6 < 0.2).
        assert_eq!(steps(ControlWindow { start: 0.0, end: 0.8 }), [true, true, true, true, false, false]);
        assert_eq!(steps(ControlWindow { start: 0.2, end: 1.0 }), [false, false, true, true, true, true]);
        assert_eq!(steps(ControlWindow::default()), [true; 6]);
        assert_eq!(steps(ControlWindow { start: 0.5, end: 0.5 }), [false; 6]);
    }
}
