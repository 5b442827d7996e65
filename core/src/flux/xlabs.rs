//! XLabs' IP-Adapter for Flux (`XLabs-AI/flux-ip-adapter`, v1 and v2) as an
//! [`AttentionHook`]: a CLIP ViT-L/14 `image_embeds` vector → `proj` (a
//! linear layer to `tokens × context` then LayerNorm: 4 tokens in v1, 16 in
//! v2) → in each double block, `scale · softmax(q Kᵀ/√D) V` with
//! `K, V = ip_adapter_double_stream_{k,v}_proj(tokens)` (no norm) and `q` the
//! block's QK-normed, pre-RoPE image query, added to the image stream after
//! the block's MLP, ungated ([`AttentionHook::block_output`]). Written after
//! XLabs' `IPDoubleStreamBlockProcessor` and diffusers' `FluxIPAdapterAttnProcessor`
//! (read to learn the math; the code is ours).
//!
//! How it differs from the InstantX adapter ([`super::ip`]): a CLIP image
//! encoder instead of SigLIP, a few tokens instead of 128, double blocks
//! only, K/V without RMSNorm, and its term enters after the MLP instead of
//! before the attention's output projection.
//!
//! What it does not do: encode the image (the caller's CLIP vision model), or
//! condition single blocks (the adapter has no weights for them).

use candle_core::{DType, Device, Tensor};

use super::config::FluxConfig;
use super::hooks::{AttentionHook, Contribution, HookPoint, Site};
use super::ip::{check_hook_inputs, IpHookConfig, IpImage};
use crate::error::{Error, Result, TensorProblem};
use crate::ip_adapter::IpKv;
use crate::nn::{LayerNorm, Linear};
use crate::weights::TensorStore;

/// The projection's tensors' prefix in XLabs' file.
const PROJ: &str = "ip_adapter_proj_model";
/// PyTorch's `nn.LayerNorm` default.
const LN_EPS: f64 = 1e-5;

/// A double block's K or V projection in XLabs' names.
fn kv_name(block: usize, kv: char) -> String {
    format!("double_blocks.{block}.processor.ip_adapter_double_stream_{kv}_proj")
}

/// Whether `store` is an XLabs Flux IP-Adapter (by its projection's name).
pub fn is_xlabs(store: &TensorStore) -> bool {
    store.contains(&format!("{PROJ}.proj.weight"))
}

/// Sizes read from the checkpoint's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XlabsDims {
    /// CLIP's `image_embeds` width (768 for ViT-L/14).
    pub embed_dim: usize,
    /// Image tokens (4 in v1, 16 in v2).
    pub tokens: usize,
    /// The tokens' width (Flux's context width, 4096).
    pub cross_dim: usize,
    /// Flux's hidden size (3072).
    pub hidden: usize,
    /// Double blocks with K/V (19).
    pub blocks: usize,
}

impl XlabsDims {
    pub fn infer(store: &TensorStore) -> Result<Self> {
        let missing = |name: String| Error::Checkpoint {
            source_name: store.source_name.clone(),
            problems: vec![TensorProblem::Missing { name, expected: vec![] }],
        };
        let shape = |name: String| store.shape(&name).map(<[usize]>::to_vec).ok_or_else(|| missing(name));
        let proj = shape(format!("{PROJ}.proj.weight"))?;
        let norm = shape(format!("{PROJ}.norm.weight"))?;
        let k0 = shape(format!("{}.weight", kv_name(0, 'k')))?;
        let (&[rows, embed_dim], &[cross_dim], &[hidden, _]) = (&proj[..], &norm[..], &k0[..]) else {
            return Err(Error::Shape(format!(
                "{}: an XLabs IP-Adapter's projection is [tokens·context, embed] with a [context] norm, got {proj:?} \
                 and {norm:?}",
                store.source_name
            )));
        };
        if cross_dim == 0 || rows % cross_dim != 0 {
            return Err(Error::Shape(format!(
                "{}: projection rows {rows} are not a multiple of the norm's width {cross_dim}",
                store.source_name
            )));
        }
        let blocks = (0..).take_while(|&i| store.contains(&format!("{}.weight", kv_name(i, 'k')))).count();
        Ok(Self { embed_dim, tokens: rows / cross_dim, cross_dim, hidden, blocks })
    }

    /// Every tensor of the checkpoint with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![
            (format!("{PROJ}.proj.weight"), vec![self.tokens * self.cross_dim, self.embed_dim]),
            (format!("{PROJ}.proj.bias"), vec![self.tokens * self.cross_dim]),
            (format!("{PROJ}.norm.weight"), vec![self.cross_dim]),
            (format!("{PROJ}.norm.bias"), vec![self.cross_dim]),
        ];
        for i in 0..self.blocks {
            for kv in ['k', 'v'] {
                v.push((format!("{}.weight", kv_name(i, kv)), vec![self.hidden, self.cross_dim]));
                v.push((format!("{}.bias", kv_name(i, kv)), vec![self.hidden]));
            }
        }
        v
    }

    /// Checks that the adapter fits a Flux model: K/V per double block, as wide
    /// as Flux's hidden size, from tokens of its context width.
    pub fn check_compatible(&self, cfg: &FluxConfig) -> Result<()> {
        if (self.hidden, self.blocks, self.cross_dim) != (cfg.hidden_size, cfg.depth, cfg.context_in_dim) {
            return Err(Error::Shape(format!(
                "the XLabs IP-Adapter was made for a Flux of hidden size {} with {} double blocks and context {}, but \
                 this Flux has {}, {} and {}",
                self.hidden, self.blocks, self.cross_dim, cfg.hidden_size, cfg.depth, cfg.context_in_dim
            )));
        }
        Ok(())
    }
}

/// One double block's K and V projections.
struct Processor {
    k: Linear,
    v: Linear,
}

/// The adapter's weights; the projection's names mirror XLabs' checkpoint.
pub struct XlabsIpAdapter {
    pub dims: XlabsDims,
    proj: Linear,
    norm: LayerNorm,
    processors: Vec<Processor>,
}

impl XlabsIpAdapter {
    /// From XLabs' `ip_adapter.safetensors`, every tensor checked up front.
    pub fn from_store(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
        let dims = XlabsDims::infer(store)?;
        store.validate(&dims.expected_tensors())?;
        let vb = store.var_builder(dtype, device);
        let processors = (0..dims.blocks)
            .map(|i| {
                Ok(Processor {
                    k: Linear::new(dims.cross_dim, dims.hidden, vb.pp(kv_name(i, 'k')))?,
                    v: Linear::new(dims.cross_dim, dims.hidden, vb.pp(kv_name(i, 'v')))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let p = vb.pp(PROJ);
        Ok(Self {
            dims,
            proj: Linear::new(dims.embed_dim, dims.tokens * dims.cross_dim, p.pp("proj"))?,
            norm: LayerNorm::new(dims.cross_dim, LN_EPS, p.pp("norm"))?,
            processors,
        })
    }

    /// CLIP `image_embeds` `[B, embed]` → image tokens `[B, tokens, context]`.
    pub fn project(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let x = self.proj.forward(&image_embeds.to_dtype(self.proj.dtype())?)?;
        self.norm.forward(&x.reshape((b, self.dims.tokens, self.dims.cross_dim))?)
    }

    /// Each double block's K/V `[B, H, tokens, head_dim]` for image tokens `[B, tokens, context]`.
    pub fn kv_all(&self, tokens: &Tensor, head_dim: usize) -> Result<Vec<IpKv>> {
        if head_dim == 0 || self.dims.hidden % head_dim != 0 {
            return Err(Error::Shape(format!(
                "K/V width {} is not a multiple of head_dim {head_dim}",
                self.dims.hidden
            )));
        }
        let tokens = tokens.to_dtype(self.proj.dtype())?;
        let split = |x: Tensor| -> Result<Tensor> {
            let (b, t, hd) = x.dims3()?;
            Ok(x.reshape((b, t, hd / head_dim, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        self.processors
            .iter()
            .map(|p| Ok(IpKv { k: split(p.k.forward(&tokens)?)?, v: split(p.v.forward(&tokens)?)? }))
            .collect()
    }
}

/// XLabs' IP-Adapter over one or more reference images. `cfg`'s weight and
/// sigma window work as the InstantX hook's; its block weights, if any, are
/// one per double block.
#[derive(Debug, Clone)]
pub struct XlabsHook {
    images: Vec<IpImage>,
    cfg: IpHookConfig,
    depth: usize,
    attention: crate::nn::Attention,
}

impl XlabsHook {
    /// Validates weights (−1…5), the K/V per image (one per double block) and the block weights.
    pub fn new(images: Vec<IpImage>, cfg: IpHookConfig, flux: &FluxConfig) -> Result<Self> {
        check_hook_inputs(&images, &cfg, flux.depth, "double blocks")?;
        if let Some(bw) = cfg.block_weights.as_ref().filter(|bw| bw.len() != flux.depth) {
            return Err(Error::Shape(format!(
                "{} per-block IP weights given; XLabs' adapter has one per double block ({})",
                bw.len(),
                flux.depth
            )));
        }
        Ok(Self { images, cfg, depth: flux.depth, attention: crate::nn::Attention::reference() })
    }

    /// Runs the image attention with `attention` (e.g. the fused CUDA kernel, as the model's).
    pub fn with_attention(mut self, attention: crate::nn::Attention) -> Self {
        self.attention = attention;
        self
    }

    /// The scale of image `image` in double block `block` at `at` (0 outside the window).
    fn scale(&self, at: &HookPoint, block: usize, image: usize) -> f64 {
        if !self.cfg.window.contains(at.sigma) {
            return 0.0;
        }
        let bw = self.cfg.block_weights.as_ref().and_then(|b| b.get(block).copied()).unwrap_or(1.0);
        self.images.get(image).map_or(0.0, |i| i.weight) * self.cfg.weight.at(at.step) * bw
    }
}

impl AttentionHook for XlabsHook {
    fn name(&self) -> &str {
        "xlabs-ip-adapter"
    }

    /// The attention output is left alone: the term goes in after the MLP.
    fn attention(&self, _at: &HookPoint, _q: &Tensor, _attn: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn contribution(&self, _at: &HookPoint, _q: &Tensor) -> Result<Contribution> {
        Ok(Contribution::Nothing)
    }

    fn block_output(&self, at: &HookPoint, q: &Tensor) -> Result<Option<Tensor>> {
        let Site::Double { index } = at.site else { return Ok(None) };
        if index >= self.depth {
            return Err(Error::Shape(format!("XLabs IP-Adapter called for double block {index} of {}", self.depth)));
        }
        let mut sum: Option<Tensor> = None;
        for (i, img) in self.images.iter().enumerate() {
            let s = self.scale(at, index, i);
            if s == 0.0 {
                continue;
            }
            let term = img.kv[index].attend_with(q, s, &self.attention)?;
            sum = Some(match sum {
                Some(x) => (x + term)?,
                None => term,
            });
        }
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ip::IpWeight;
    use super::*;

    fn store(tokens: usize, ctx: usize, embed: usize, hidden: usize, blocks: usize) -> TensorStore {
        let mut s = TensorStore::new("xlabs.safetensors");
        let dims = XlabsDims { embed_dim: embed, tokens, cross_dim: ctx, hidden, blocks };
        for (name, shape) in dims.expected_tensors() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
            s.insert(&name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap();
        }
        s
    }

    #[test]
    fn sizes_come_from_the_shapes() {
        let s = store(4, 8, 6, 12, 3);
        assert!(is_xlabs(&s));
        let a = XlabsIpAdapter::from_store(&s, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.dims, XlabsDims { embed_dim: 6, tokens: 4, cross_dim: 8, hidden: 12, blocks: 3 });
        let e = Tensor::ones((1, 6), DType::F32, &Device::Cpu).unwrap();
        let tokens = a.project(&e).unwrap();
        assert_eq!(tokens.dims(), [1, 4, 8]);
        let kv = a.kv_all(&tokens, 4).unwrap();
        assert_eq!((kv.len(), kv[0].k.dims()), (3, &[1, 3, 4, 4][..]));
        assert!(a.kv_all(&tokens, 5).is_err());
        assert!(!is_xlabs(&TensorStore::new("other")));
        let e = XlabsIpAdapter::from_store(&TensorStore::new("empty"), DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("ip_adapter_proj_model.proj.weight"), "{e}");
    }

    #[test]
    fn the_term_goes_after_the_mlp_of_double_blocks_only_inside_the_window() {
        let a = XlabsIpAdapter::from_store(&store(4, 8, 6, 12, 2), DType::F32, &Device::Cpu).unwrap();
        let tokens = a.project(&Tensor::ones((1, 6), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let flux = FluxConfig { hidden_size: 12, depth: 2, context_in_dim: 8, num_heads: 3, ..FluxConfig::dev() };
        a.dims.check_compatible(&flux).unwrap();
        assert!(a.dims.check_compatible(&FluxConfig::dev()).is_err());
        let img = IpImage { kv: a.kv_all(&tokens, 4).unwrap(), weight: 0.5 };
        let cfg = IpHookConfig { weight: IpWeight::Constant(2.0), ..IpHookConfig::default() };
        let hook = XlabsHook::new(vec![img.clone()], cfg.clone(), &flux).unwrap();
        let q = Tensor::ones((1, 3, 5, 4), DType::F32, &Device::Cpu).unwrap();
        let at = |site| HookPoint { site, depth: 2, sigma: 0.5, step: 0, txt_len: 0 };
        let term = hook.block_output(&at(Site::Double { index: 1 }), &q).unwrap().unwrap();
        let want = img.kv[1].attend(&q, 1.0).unwrap();
        let diff = (term - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        assert!(hook.block_output(&at(Site::Single { index: 0 }), &q).unwrap().is_none());
        assert!(hook.attention(&at(Site::Double { index: 0 }), &q, &q).unwrap().is_none());
        let shut = IpHookConfig { window: crate::schedule::IpWindow { sigma_start: 0.4, sigma_end: 0.1 }, ..cfg };
        let hook = XlabsHook::new(vec![img.clone()], shut.clone(), &flux).unwrap();
        assert!(hook.block_output(&at(Site::Double { index: 0 }), &q).unwrap().is_none());
        let bad = IpHookConfig { block_weights: Some(vec![1.0; 5]), ..shut };
        assert!(XlabsHook::new(vec![img], bad, &flux).unwrap_err().to_string().contains("per double block"));
    }
}
