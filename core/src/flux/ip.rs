//! The InstantX IP-Adapter as an [`AttentionHook`].
//!
//! In each block the hook adds `scale · softmax(q Kᵢₚᵀ/√D) Vᵢₚ` to the
//! attention output (InstantX's `IPAFluxAttnProcessor2_0`): for double blocks
//! to the image tokens, for single blocks to all tokens. K/V are computed once
//! per reference image before sampling ([`crate::IpAdapter::kv_all`]) and reused every
//! step, so the processors' weights need not stay on the device.
//!
//! `scale` = image weight × global weight (constant, or the Advanced node's
//! per-step ramp) × the block's weight; the hook is inactive outside its sigma
//! window. A zero scale skips the term, so weight 0 is exactly "no adapter".

use candle_core::Tensor;

use super::config::FluxConfig;
use super::hooks::{AttentionHook, Contribution, HookPoint};
use crate::error::{Error, Result};
use crate::ip_adapter::{IpAdapterDims, IpKv};
use crate::schedule::{IpWindow, WeightRamp};

/// The weight range the ComfyUI nodes accept.
pub const IP_WEIGHT_RANGE: std::ops::RangeInclusive<f64> = -1.0..=5.0;

/// One reference image: its per-block K/V and its weight.
#[derive(Debug, Clone)]
pub struct IpImage {
    /// One entry per block, double blocks first.
    pub kv: Vec<IpKv>,
    pub weight: f64,
}

/// The adapter's overall weight over the sampler steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IpWeight {
    Constant(f64),
    /// `start` at step 0 to `end` at the ramp's last step (ComfyUI's Advanced node).
    Ramp(WeightRamp),
}

impl IpWeight {
    pub fn at(&self, step: usize) -> f64 {
        match self {
            Self::Constant(w) => *w,
            Self::Ramp(r) => r.weight(step),
        }
    }
}

/// How the adapter is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct IpHookConfig {
    pub weight: IpWeight,
    pub window: IpWindow,
    /// One weight per block (double then single: 19 + 38 = 57 for FLUX.1); `None` = all 1.
    pub block_weights: Option<Vec<f64>>,
}

impl Default for IpHookConfig {
    fn default() -> Self {
        Self {
            weight: IpWeight::Constant(1.0),
            window: IpWindow { sigma_start: f64::INFINITY, sigma_end: f64::NEG_INFINITY },
            block_weights: None,
        }
    }
}

/// Checks that an adapter fits a Flux model: one processor per block, K/V as wide as Flux's hidden size.
pub fn check_compatible(dims: &IpAdapterDims, cfg: &FluxConfig) -> Result<()> {
    if dims.hidden != cfg.hidden_size || dims.num_processors != cfg.num_blocks() {
        return Err(Error::Shape(format!(
            "the IP-Adapter was made for a Flux of hidden size {} with {} blocks, but this Flux has hidden size {} \
             and {} blocks ({} double + {} single)",
            dims.hidden,
            dims.num_processors,
            cfg.hidden_size,
            cfg.num_blocks(),
            cfg.depth,
            cfg.depth_single
        )));
    }
    Ok(())
}

fn check_weight(what: &str, w: f64) -> Result<()> {
    if IP_WEIGHT_RANGE.contains(&w) {
        Ok(())
    } else {
        Err(Error::Unsupported(format!("{what} {w} is outside the accepted range −1…5")))
    }
}

/// Checks every weight an IP hook applies (−1…5): each image's and the global
/// one (constant or ramp); and that each image has `blocks` K/V (`what`
/// names those blocks in the message).
pub(crate) fn check_hook_inputs(images: &[IpImage], cfg: &IpHookConfig, blocks: usize, what: &str) -> Result<()> {
    for (i, img) in images.iter().enumerate() {
        check_weight(&format!("weight of reference image {}", i + 1), img.weight)?;
        if img.kv.len() != blocks {
            return Err(Error::Shape(format!(
                "reference image {} has K/V for {} {what}; this Flux has {blocks}",
                i + 1,
                img.kv.len()
            )));
        }
    }
    match cfg.weight {
        IpWeight::Constant(w) => check_weight("IP weight", w),
        IpWeight::Ramp(r) => {
            check_weight("IP weight_start", r.start)?;
            check_weight("IP weight_end", r.end)
        }
    }
}

/// The IP-Adapter hook over one or more reference images.
#[derive(Debug, Clone)]
pub struct IpAdapterHook {
    images: Vec<IpImage>,
    cfg: IpHookConfig,
    num_blocks: usize,
    attention: crate::nn::Attention,
}

impl IpAdapterHook {
    /// Validates weights (−1…5), the number of K/V per image and of block weights.
    pub fn new(images: Vec<IpImage>, cfg: IpHookConfig, flux: &FluxConfig) -> Result<Self> {
        let n = flux.num_blocks();
        check_hook_inputs(&images, &cfg, n, "blocks")?;
        if let Some(bw) = &cfg.block_weights {
            if bw.len() != n {
                return Err(Error::Shape(format!(
                    "{} per-block IP weights given; this Flux has {n} blocks ({} double + {} single)",
                    bw.len(),
                    flux.depth,
                    flux.depth_single
                )));
            }
        }
        Ok(Self { images, cfg, num_blocks: n, attention: crate::nn::Attention::reference() })
    }

    /// Runs the image attention with `attention` (e.g. the fused CUDA kernel, as the model's).
    pub fn with_attention(mut self, attention: crate::nn::Attention) -> Self {
        self.attention = attention;
        self
    }

    /// Bytes of the cached K/V of all images.
    pub fn kv_bytes(&self) -> usize {
        self.images.iter().flat_map(|i| &i.kv).map(IpKv::nbytes).sum()
    }

    /// The scale of image `image` at this hook point (0 outside the window).
    pub fn scale(&self, at: &HookPoint, image: usize) -> f64 {
        if !self.cfg.window.contains(at.sigma) {
            return 0.0;
        }
        let block = at.site.global_index(at.depth);
        let bw = self.cfg.block_weights.as_ref().and_then(|b| b.get(block).copied()).unwrap_or(1.0);
        let iw = self.images.get(image).map_or(0.0, |i| i.weight);
        iw * self.cfg.weight.at(at.step) * bw
    }
}

impl AttentionHook for IpAdapterHook {
    fn name(&self) -> &str {
        "ip-adapter"
    }

    fn attention(&self, at: &HookPoint, q: &Tensor, attn: &Tensor) -> Result<Option<Tensor>> {
        let block = self.block(at)?;
        let mut out: Option<Tensor> = None;
        for (i, img) in self.images.iter().enumerate() {
            let s = self.scale(at, i);
            if s == 0.0 {
                continue;
            }
            let base = out.as_ref().unwrap_or(attn);
            out = Some(img.kv[block].attend_add(q, s, base, &self.attention)?);
        }
        Ok(out)
    }

    /// One image in its window (the usual case): its term, for the block's
    /// attention kernel to add (the model's attention computes it then, not
    /// the one given by [`IpAdapterHook::with_attention`]); none: nothing;
    /// several: [`Self::attention`].
    fn contribution(&self, at: &HookPoint, q: &Tensor) -> Result<Contribution> {
        let block = self.block(at)?;
        let mut active =
            self.images.iter().enumerate().map(|(i, img)| (img, self.scale(at, i))).filter(|(_, s)| *s != 0.0);
        Ok(match (active.next(), active.next()) {
            (None, _) => Contribution::Nothing,
            (Some((img, scale)), None) => {
                let (k, v) = img.kv[block].kv_for(q)?;
                Contribution::Attention { k, v, scale }
            }
            (Some(_), Some(_)) => Contribution::Other,
        })
    }
}

impl IpAdapterHook {
    /// The processor index of `at`, checked against the adapter's.
    fn block(&self, at: &HookPoint) -> Result<usize> {
        let block = at.site.global_index(at.depth);
        if block >= self.num_blocks {
            return Err(Error::Shape(format!(
                "IP-Adapter called for block {block} of a {}-block model",
                self.num_blocks
            )));
        }
        Ok(block)
    }
}
