//! SigLIP vision transformer with its attention-pooling head: pixel values
//! `[B, 3, H, W]` → pooled embedding `[B, hidden]` (transformers'
//! `SiglipVisionModel(...).pooler_output`, which the InstantX IP-Adapter uses).
//!
//! Written after transformers' `modeling_siglip.py`; struct fields mirror the
//! checkpoint's key names (`embeddings.patch_embedding`, `encoder.layers.N`,
//! `post_layernorm`, `head.*`). Key names here are *without* the
//! `vision_model.` prefix; [`siglip_tensor_name`] maps checkpoint names.
//! The patch embedding (a stride = kernel convolution) runs as a matmul over
//! unfolded patches: same numbers, one primitive fewer for other backends.
//!
//! The math is written once, generic over [`VisionOps`] ([`SiglipVision`]);
//! [`SiglipVisionModel`] is that model on candle.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::config::SiglipVisionConfig;
use crate::error::{Error, Result};
use crate::nn::Activation;
use crate::ops::{CandleOps, LoadOps, VisionOps};

/// Maps a checkpoint tensor name to ours: strips `vision_model.`; drops the
/// text tower and logit scale/bias of a full `SiglipModel` (`None`).
pub fn siglip_tensor_name(name: &str) -> Option<String> {
    let n = name.strip_prefix("vision_model.").unwrap_or(name);
    if n.starts_with("text_model.") || n == "logit_scale" || n == "logit_bias" {
        None
    } else {
        Some(n.to_string())
    }
}

/// Every tensor the vision tower needs, with its shape: for validation.
pub fn expected_tensors(cfg: &SiglipVisionConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, c, p) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size);
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.patch_embedding.weight".into(), vec![h, c, p, p]),
        ("embeddings.patch_embedding.bias".into(), vec![h]),
        ("embeddings.position_embedding.weight".into(), vec![cfg.num_patches(), h]),
        ("post_layernorm.weight".into(), vec![h]),
        ("post_layernorm.bias".into(), vec![h]),
    ];
    let ln_lin = |prefix: String, v: &mut Vec<(String, Vec<usize>)>, out: usize, inp: usize| {
        v.push((format!("{prefix}.weight"), if inp == 0 { vec![out] } else { vec![out, inp] }));
        v.push((format!("{prefix}.bias"), vec![out]));
    };
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            ln_lin(format!("{pre}.self_attn.{proj}"), &mut v, h, h);
        }
        ln_lin(format!("{pre}.layer_norm1"), &mut v, h, 0);
        ln_lin(format!("{pre}.layer_norm2"), &mut v, h, 0);
        ln_lin(format!("{pre}.mlp.fc1"), &mut v, i, h);
        ln_lin(format!("{pre}.mlp.fc2"), &mut v, h, i);
    }
    if cfg.vision_use_head {
        v.push(("head.probe".into(), vec![1, 1, h]));
        v.push(("head.attention.in_proj_weight".into(), vec![3 * h, h]));
        v.push(("head.attention.in_proj_bias".into(), vec![3 * h]));
        ln_lin("head.attention.out_proj".into(), &mut v, h, h);
        ln_lin("head.layernorm".into(), &mut v, h, 0);
        ln_lin("head.mlp.fc1".into(), &mut v, i, h);
        ln_lin("head.mlp.fc2".into(), &mut v, h, i);
    }
    v
}

/// The weights loaded as linear layers by name (`[out, in]`): the ones
/// `ipaflux quantize` stores in a smaller format. The patch embedding (4-D)
/// and the head's packed `in_proj_weight` stay as stored.
pub fn linear_weights(cfg: &SiglipVisionConfig) -> Vec<String> {
    let mut names = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            names.push(format!("encoder.layers.{l}.self_attn.{proj}.weight"));
        }
        names.push(format!("encoder.layers.{l}.mlp.fc1.weight"));
        names.push(format!("encoder.layers.{l}.mlp.fc2.weight"));
    }
    if cfg.vision_use_head {
        for n in ["head.attention.out_proj", "head.mlp.fc1", "head.mlp.fc2"] {
            names.push(format!("{n}.weight"));
        }
    }
    names
}

fn activation(cfg: &SiglipVisionConfig) -> Activation {
    if cfg.hidden_act == "gelu" {
        Activation::GeluErf
    } else {
        Activation::GeluTanh
    }
}

fn linear<O: LoadOps>(ops: &O, vb: &VarBuilder, out: usize, inp: usize) -> Result<O::Linear, O::Error> {
    ops.load_linear_at(vb, out, inp)
}

fn layer_norm<O: LoadOps>(ops: &O, vb: &VarBuilder, dim: usize, eps: f64) -> Result<O::Norm, O::Error> {
    let w = vb.get(dim, "weight").map_err(Error::from)?;
    let b = vb.get(dim, "bias").map_err(Error::from)?;
    ops.load_norm(w, b, eps)
}

struct Embeddings<O: VisionOps> {
    patch_embedding: O::Linear,
    position_embedding: O::T,
    patch_size: usize,
}

impl<O: VisionOps> Embeddings<O> {
    fn new(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error>
    where
        O: LoadOps,
    {
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let pvb = vb.pp("patch_embedding");
        // A stride = kernel convolution is a matmul over unfolded patches.
        let w = pvb.get((h, c, p, p), "weight").and_then(|w| w.reshape((h, c * p * p))).map_err(Error::from)?;
        let b = pvb.get(h, "bias").map_err(Error::from)?;
        let pos = vb
            .pp("position_embedding")
            .get((cfg.num_patches(), h), "weight")
            .and_then(|t| t.unsqueeze(0))
            .map_err(Error::from)?;
        Ok(Self { patch_embedding: ops.load_linear(w, b)?, position_embedding: ops.load_tensor(pos)?, patch_size: p })
    }

    fn forward(&self, ops: &O, pixels: &O::T) -> Result<O::T, O::Error> {
        let x = ops.linear(&ops.patchify(pixels, self.patch_size)?, &self.patch_embedding)?;
        ops.add_rows(&x, &self.position_embedding)
    }
}

struct SelfAttention<O: VisionOps> {
    q_proj: O::Linear,
    k_proj: O::Linear,
    v_proj: O::Linear,
    out_proj: O::Linear,
    num_heads: usize,
}

impl<O: VisionOps> SelfAttention<O> {
    fn new(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error>
    where
        O: LoadOps,
    {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(ops, &vb.pp("q_proj"), h, h)?,
            k_proj: linear(ops, &vb.pp("k_proj"), h, h)?,
            v_proj: linear(ops, &vb.pp("v_proj"), h, h)?,
            out_proj: linear(ops, &vb.pp("out_proj"), h, h)?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// `residual + attention(x)`.
    fn forward_add(&self, ops: &O, x: &O::T, residual: &O::T) -> Result<O::T, O::Error> {
        let q = ops.linear(x, &self.q_proj)?;
        let k = ops.linear(x, &self.k_proj)?;
        let v = ops.linear(x, &self.v_proj)?;
        ops.linear_add(&ops.attention(&q, &k, &v, self.num_heads)?, &self.out_proj, residual)
    }
}

struct Mlp<O: VisionOps> {
    fc1: O::Linear,
    fc2: O::Linear,
    act: Activation,
}

impl<O: VisionOps> Mlp<O> {
    fn new(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error>
    where
        O: LoadOps,
    {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            fc1: linear(ops, &vb.pp("fc1"), i, h)?,
            fc2: linear(ops, &vb.pp("fc2"), h, i)?,
            act: activation(cfg),
        })
    }

    /// `residual + mlp(x)`.
    fn forward_add(&self, ops: &O, x: &O::T, residual: &O::T) -> Result<O::T, O::Error> {
        ops.linear_add(&ops.linear_act(x, &self.fc1, self.act)?, &self.fc2, residual)
    }
}

struct EncoderLayer<O: VisionOps> {
    layer_norm1: O::Norm,
    self_attn: SelfAttention<O>,
    layer_norm2: O::Norm,
    mlp: Mlp<O>,
}

impl<O: VisionOps> EncoderLayer<O> {
    fn new(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error>
    where
        O: LoadOps,
    {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: layer_norm(ops, &vb.pp("layer_norm1"), h, eps)?,
            self_attn: SelfAttention::new(ops, cfg, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(ops, &vb.pp("layer_norm2"), h, eps)?,
            mlp: Mlp::new(ops, cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, ops: &O, x: &O::T) -> Result<O::T, O::Error> {
        let x = self.self_attn.forward_add(ops, &ops.layer_norm(x, &self.layer_norm1)?, x)?;
        self.mlp.forward_add(ops, &ops.layer_norm(&x, &self.layer_norm2)?, &x)
    }
}

/// `torch.nn.MultiheadAttention`-style pooling: a learned probe attends over all tokens.
struct PoolingHead<O: VisionOps> {
    probe: O::T,
    q: O::Linear,
    k: O::Linear,
    v: O::Linear,
    out_proj: O::Linear,
    layernorm: O::Norm,
    mlp: Mlp<O>,
    num_heads: usize,
}

impl<O: VisionOps> PoolingHead<O> {
    fn new(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error>
    where
        O: LoadOps,
    {
        let h = cfg.hidden_size;
        let avb = vb.pp("attention");
        let w = avb.get((3 * h, h), "in_proj_weight").map_err(Error::from)?;
        let b = avb.get(3 * h, "in_proj_bias").map_err(Error::from)?;
        // `in_proj` packs q, k and v along the output dimension.
        let part = |i: usize| -> Result<O::Linear, O::Error> {
            let wi = w.narrow(0, i * h, h).and_then(|t| t.contiguous()).map_err(Error::from)?;
            let bi = b.narrow(0, i * h, h).and_then(|t| t.contiguous()).map_err(Error::from)?;
            ops.load_linear(wi, bi)
        };
        Ok(Self {
            probe: ops.load_tensor(vb.get((1, 1, h), "probe").map_err(Error::from)?)?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out_proj: linear(ops, &avb.pp("out_proj"), h, h)?,
            layernorm: layer_norm(ops, &vb.pp("layernorm"), h, cfg.layer_norm_eps)?,
            mlp: Mlp::new(ops, cfg, vb.pp("mlp"))?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// Tokens `[B, L, C]` → pooled `[B, 1, C]`.
    fn forward(&self, ops: &O, x: &O::T) -> Result<O::T, O::Error> {
        let probe = ops.expand_batch(&self.probe, ops.batch(x)?)?;
        let q = ops.linear(&probe, &self.q)?;
        let k = ops.linear(x, &self.k)?;
        let v = ops.linear(x, &self.v)?;
        let attn = ops.linear(&ops.attention(&q, &k, &v, self.num_heads)?, &self.out_proj)?;
        self.mlp.forward_add(ops, &ops.layer_norm(&attn, &self.layernorm)?, &attn)
    }
}

/// The vision tower on any [`VisionOps`] backend. [`SiglipVisionModel`] is
/// this on candle; `ipaflux-gpu` builds it on WebGPU/wgpu.
pub struct SiglipVision<O: VisionOps> {
    embeddings: Embeddings<O>,
    layers: Vec<EncoderLayer<O>>,
    post_layernorm: O::Norm,
    head: PoolingHead<O>,
    cfg: SiglipVisionConfig,
}

impl<O: LoadOps> SiglipVision<O> {
    /// Builds from a `VarBuilder` whose names have no `vision_model.` prefix;
    /// `ops` converts each host tensor into the backend's format.
    pub fn load(ops: &O, cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self, O::Error> {
        if !cfg.vision_use_head {
            return Err(Error::Unsupported(
                "this SigLIP checkpoint has no attention-pooling head (vision_use_head=false); the IP-Adapter needs it"
                    .into(),
            )
            .into());
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| EncoderLayer::new(ops, cfg, vb.pp(format!("encoder.layers.{l}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            embeddings: Embeddings::new(ops, cfg, vb.pp("embeddings"))?,
            layers,
            post_layernorm: layer_norm(ops, &vb.pp("post_layernorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            head: PoolingHead::new(ops, cfg, vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }
}

impl<O: VisionOps> SiglipVision<O> {
    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// The tokens after the encoder and `post_layernorm`: `[B, num_patches, hidden]`
    /// from pixels `[B, C, H, W]` (shape checked by the caller).
    pub fn last_hidden_state(&self, ops: &O, pixels: &O::T) -> Result<O::T, O::Error> {
        let mut x = self.embeddings.forward(ops, pixels)?;
        for layer in &self.layers {
            x = layer.forward(ops, &x)?;
        }
        ops.layer_norm(&x, &self.post_layernorm)
    }

    /// Pooled embedding `[B, 1, hidden]`.
    pub fn pooled(&self, ops: &O, pixels: &O::T) -> Result<O::T, O::Error> {
        self.head.forward(ops, &self.last_hidden_state(ops, pixels)?)
    }

    /// Checks pixel values `[_, C, H, W]` against the config.
    pub fn check_pixels(&self, dims: &[usize]) -> Result<(), Error> {
        let s = self.cfg.image_size;
        match dims {
            [_, c, h, w] if *c == self.cfg.num_channels && *h == s && *w == s => Ok(()),
            _ => Err(Error::Shape(format!(
                "pixel values are {dims:?}, the model takes [_, {}, {s}, {s}]",
                self.cfg.num_channels
            ))),
        }
    }
}

/// The vision tower on candle. `forward` returns the pooled embedding `[B, hidden]`.
pub struct SiglipVisionModel {
    inner: SiglipVision<CandleOps>,
    ops: CandleOps,
    dtype: candle_core::DType,
    device: candle_core::Device,
}

impl std::fmt::Debug for SiglipVisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiglipVisionModel")
            .field("cfg", &self.inner.cfg)
            .field("dtype", &self.dtype)
            .field("attention", &self.ops.attention.name())
            .field("linear", &self.ops.linear.as_ref().map(|l| l.name()))
            .finish()
    }
}

impl SiglipVisionModel {
    /// Builds from a `VarBuilder` whose names have no `vision_model.` prefix.
    pub fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let ops = CandleOps::default();
        Ok(Self { inner: SiglipVision::load(&ops, cfg, vb)?, ops, dtype, device })
    }

    /// The precision the weights and activations are in.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// The device the weights are on.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Uses `attention` (e.g. a fused CUDA kernel) from now on.
    pub fn set_attention(&mut self, attention: crate::nn::Attention) {
        self.ops.attention = attention;
    }

    /// Runs the linear layers through `linear` (their bias, GELU or the
    /// residual add in the product) where it takes them; `None`: candle's ops.
    pub fn set_fused_linear(&mut self, linear: Option<std::sync::Arc<dyn crate::nn::FusedLinear>>) {
        self.ops.linear = linear;
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        &self.inner.cfg
    }

    /// The tokens after the encoder and `post_layernorm`: `[B, num_patches, hidden]`.
    pub fn last_hidden_state(&self, pixels: &Tensor) -> Result<Tensor> {
        self.inner.check_pixels(pixels.dims())?;
        self.inner.last_hidden_state(&self.ops, &pixels.to_dtype(self.dtype)?)
    }

    /// Pooled embedding `[B, hidden]` (`pooler_output`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.inner.check_pixels(pixels.dims())?;
        Ok(self.inner.pooled(&self.ops, &pixels.to_dtype(self.dtype)?)?.squeeze(1)?)
    }
}

impl SiglipVisionModel {
    /// Validates a checkpoint (full `SiglipModel` or vision-only, with or
    /// without the `vision_model.` prefix) and builds at `dtype` on `device`.
    pub fn from_store(
        cfg: &SiglipVisionConfig,
        store: crate::weights::TensorStore,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let store = store.filter_rename(siglip_tensor_name);
        store.validate(&expected_tensors(cfg))?;
        Self::new(cfg, store.var_builder(dtype, device))
    }
}

#[cfg(test)]
mod tests {
    //! The linear-epilogue seam ([`crate::nn::FusedLinear`]) through the
    //! encoder with a host transcription of what a fused product computes
    //! (f32, one rounding): equal to candle's separate ops, and taken by every
    //! linear layer with the epilogue the layer's successor asks for.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::nn::{FusedLinear, Linear, LinearEpilogue};

    #[derive(Debug, Default)]
    struct HostEpilogues {
        /// Calls per epilogue: bias, GELU, residual.
        calls: [AtomicUsize; 3],
    }

    impl FusedLinear for HostEpilogues {
        fn name(&self) -> &'static str {
            "host transcription of linear epilogues"
        }

        fn linear(&self, x: &Tensor, layer: &Linear, epilogue: LinearEpilogue<'_>) -> Option<crate::Result<Tensor>> {
            let run = || -> crate::Result<Tensor> {
                let (b, l, k) = x.dims3()?;
                let w = layer.weight()?.to_dtype(DType::F32)?;
                let n = w.dim(0)?;
                let (xs, ws) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
                let bias = match layer.bias() {
                    Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    None => vec![0.0; n],
                };
                let residual = match epilogue {
                    LinearEpilogue::Residual(r) => Some(r.flatten_all()?.to_vec1::<f32>()?),
                    _ => None,
                };
                let out: Vec<f32> = crate::kernels::host_linear(&xs, &ws, &bias, k)
                    .into_iter()
                    .enumerate()
                    .map(|(i, y)| match epilogue {
                        LinearEpilogue::Bias => y,
                        LinearEpilogue::GeluTanh => crate::kernels::gelu_tanh(y),
                        LinearEpilogue::Residual(_) => residual.as_ref().map_or(f32::NAN, |res| res[i]) + y,
                    })
                    .collect();
                let slot = match epilogue {
                    LinearEpilogue::Bias => 0,
                    LinearEpilogue::GeluTanh => 1,
                    LinearEpilogue::Residual(_) => 2,
                };
                self.calls[slot].fetch_add(1, Ordering::Relaxed);
                Ok(Tensor::from_vec(out, (b, l, n), x.device())?)
            };
            Some(run())
        }
    }

    fn tiny() -> SiglipVisionConfig {
        SiglipVisionConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 28,
            patch_size: 14,
            ..SiglipVisionConfig::so400m_patch14_384()
        }
    }

    #[test]
    fn linear_epilogues_through_the_seam_equal_candles_ops() -> crate::Result<()> {
        let cfg = tiny();
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        for (i, (name, shape)) in expected_tensors(&cfg).into_iter().enumerate() {
            let t = Tensor::randn(0f32, 0.3, shape.as_slice(), &dev)?;
            // Distinct values per tensor (candle's randn on the CPU is seeded per call).
            weights.insert(name, (t + 0.01 * i as f64)?);
        }
        let vb = || VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
        let plain = SiglipVisionModel::new(&cfg, vb())?;
        let mut fused = SiglipVisionModel::new(&cfg, vb())?;
        let host = Arc::new(HostEpilogues::default());
        fused.set_fused_linear(Some(host.clone()));
        let pixels = Tensor::randn(0f32, 1.0, (2, 3, 28, 28), &dev)?;
        let (want, got) = (plain.forward(&pixels)?, fused.forward(&pixels)?);
        let scale = want.abs()?.max_keepdim(1)?.max(0)?.squeeze(0)?.to_scalar::<f32>()?;
        let err = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale;
        assert!(err < 1e-5, "relative error {err:e}");
        let calls = host.calls.each_ref().map(|c| c.load(Ordering::Relaxed));
        let layers = cfg.num_hidden_layers;
        // Bias: the patch embedding, q/k/v of each layer, the head's q/k/v/out;
        // GELU: each MLP's fc1; residual: each layer's out_proj and fc2, the head's fc2.
        assert_eq!(calls, [1 + 3 * layers + 4, layers + 1, 2 * layers + 1]);
        Ok(())
    }
}
