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

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::config::SiglipVisionConfig;
use crate::error::{Error, Result};
use crate::nn::{sdpa, Activation, LayerNorm, Linear};

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

fn activation(cfg: &SiglipVisionConfig) -> Activation {
    if cfg.hidden_act == "gelu" {
        Activation::GeluErf
    } else {
        Activation::GeluTanh
    }
}

/// Splits `[B, L, H*D]` into heads `[B, H, L, D]`.
fn heads(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    Ok(x.reshape((b, l, n, hd / n))?.transpose(1, 2)?)
}

/// Merges heads `[B, H, L, D]` back to `[B, L, H*D]`.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

#[derive(Debug, Clone)]
struct Embeddings {
    patch_embedding: Linear,
    position_embedding: Tensor,
    patch_size: usize,
}

impl Embeddings {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let pvb = vb.pp("patch_embedding");
        let w = pvb.get((h, c, p, p), "weight")?.reshape((h, c * p * p))?;
        let b = pvb.get(h, "bias")?;
        let position_embedding = vb.pp("position_embedding").get((cfg.num_patches(), h), "weight")?;
        Ok(Self { patch_embedding: Linear::from_parts(w, Some(b))?, position_embedding, patch_size: p })
    }

    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (hh / p, ww / p);
        // A stride-p convolution ignores the pixels past the last whole patch.
        let pixels = pixels.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        // [B, C, gh, p, gw, p] → [B, gh, gw, C, p, p] → [B, gh*gw, C*p*p]
        let patches = pixels.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?.reshape((
            b,
            gh * gw,
            c * p * p,
        ))?;
        let x = self.patch_embedding.forward(&patches)?;
        Ok(x.broadcast_add(&self.position_embedding)?)
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
}

impl SelfAttention {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(h, h, vb.pp("q_proj"))?,
            k_proj: Linear::new(h, h, vb.pp("k_proj"))?,
            v_proj: Linear::new(h, h, vb.pp("v_proj"))?,
            out_proj: Linear::new(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = heads(&self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(&self.k_proj.forward(x)?, self.num_heads)?;
        let v = heads(&self.v_proj.forward(x)?, self.num_heads)?;
        self.out_proj.forward(&merge_heads(&sdpa(&q, &k, &v)?)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: Linear::new(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            act: activation(cfg),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(h, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(h, eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        Ok((&x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?)
    }
}

/// `torch.nn.MultiheadAttention`-style pooling: a learned probe attends over all tokens.
#[derive(Debug, Clone)]
struct PoolingHead {
    probe: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    out_proj: Linear,
    layernorm: LayerNorm,
    mlp: Mlp,
    num_heads: usize,
}

impl PoolingHead {
    fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let avb = vb.pp("attention");
        let w = avb.get((3 * h, h), "in_proj_weight")?;
        let b = avb.get(3 * h, "in_proj_bias")?;
        let part =
            |i: usize| -> Result<Linear> { Linear::from_parts(w.narrow(0, i * h, h)?, Some(b.narrow(0, i * h, h)?)) };
        Ok(Self {
            probe: vb.get((1, 1, h), "probe")?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out_proj: Linear::new(h, h, avb.pp("out_proj"))?,
            layernorm: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            num_heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let probe = self.probe.broadcast_as((b, 1, self.probe.dim(2)?))?.contiguous()?;
        let q = heads(&self.q.forward(&probe)?, self.num_heads)?;
        let k = heads(&self.k.forward(x)?, self.num_heads)?;
        let v = heads(&self.v.forward(x)?, self.num_heads)?;
        let attn = self.out_proj.forward(&merge_heads(&sdpa(&q, &k, &v)?)?)?;
        let y = (&attn + self.mlp.forward(&self.layernorm.forward(&attn)?)?)?;
        Ok(y.squeeze(1)?)
    }
}

/// The vision tower. `forward` returns the pooled embedding `[B, hidden]`.
#[derive(Debug, Clone)]
pub struct SiglipVisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    head: PoolingHead,
    cfg: SiglipVisionConfig,
}

impl SiglipVisionModel {
    /// Builds from a `VarBuilder` whose names have no `vision_model.` prefix.
    pub fn new(cfg: &SiglipVisionConfig, vb: VarBuilder) -> Result<Self> {
        if !cfg.vision_use_head {
            return Err(Error::Unsupported(
                "this SigLIP checkpoint has no attention-pooling head (vision_use_head=false); the IP-Adapter needs it"
                    .into(),
            ));
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{l}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers,
            post_layernorm: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            head: PoolingHead::new(cfg, vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// The tokens after the encoder and `post_layernorm`: `[B, num_patches, hidden]`.
    pub fn last_hidden_state(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        if c != self.cfg.num_channels || h != self.cfg.image_size || w != self.cfg.image_size {
            return Err(Error::Shape(format!(
                "pixel values are [_, {c}, {h}, {w}], the model takes [_, {}, {s}, {s}]",
                self.cfg.num_channels,
                s = self.cfg.image_size
            )));
        }
        let mut x = self.embeddings.forward(pixels)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x)
    }

    /// Pooled embedding `[B, hidden]` (`pooler_output`).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_dtype(self.embeddings.position_embedding.dtype())?;
        self.head.forward(&self.last_hidden_state(&pixels)?)
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
