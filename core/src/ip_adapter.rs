//! The InstantX IP-Adapter for FLUX.1, independent of Flux itself:
//! the MLP projection (pooled image embedding → image prompt tokens), and the
//! per-block IP processors (`to_k_ip`, `to_v_ip`) with the attention of a
//! block's query over those tokens.
//!
//! Math after InstantX's `MLPProjModel` / `IPAFluxAttnProcessor2_0` and the
//! ComfyUI-IPAdapter-Flux node. The two published variants differ only in
//! whether V is RMS-normalised per head; [`VNorm`] makes that explicit.
//! All dimensions come from the checkpoint's tensor shapes ([`IpAdapterDims`]).
//! Not here: hooking into Flux blocks, sigma windows, weight schedules.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, TensorProblem};
use crate::nn::{rms_norm, Activation, LayerNorm, Linear};
use crate::weights::TensorStore;
use candle_core::Module;

/// The projection's LayerNorm epsilon (torch.nn.LayerNorm default).
pub const PROJ_LAYER_NORM_EPS: f64 = 1e-5;
/// The per-head RMSNorm epsilon of the IP processors.
pub const IP_RMS_NORM_EPS: f64 = 1e-5;
/// Flux's attention head size; the IP processors normalise over it.
pub const FLUX_HEAD_DIM: usize = 128;

/// Sizes read off an IP-Adapter checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpAdapterDims {
    /// Width of the image encoder's pooled output (1152 for SigLIP so400m).
    pub id_dim: usize,
    /// Hidden width of the projection MLP (2 × id_dim in InstantX's model).
    pub proj_hidden: usize,
    /// Number of image prompt tokens (128).
    pub num_tokens: usize,
    /// Width of each image prompt token (Flux's joint attention dim, 4096).
    pub cross_dim: usize,
    /// Number of IP processors (19 double + 38 single blocks = 57).
    pub num_processors: usize,
    /// Flux's hidden size (3072): the width of K and V.
    pub hidden: usize,
}

fn dims_of(store: &TensorStore, name: &str, rank: usize) -> Option<Vec<usize>> {
    store.shape(name).map(<[usize]>::to_vec).filter(|d| d.len() == rank)
}

impl IpAdapterDims {
    /// Infers the dimensions from tensor shapes (names as in [`Self::expected_tensors`]).
    pub fn infer(store: &TensorStore) -> Result<Self> {
        let missing = |name: &str| Error::Checkpoint {
            source_name: store.source_name.clone(),
            problems: vec![TensorProblem::Missing { name: name.into(), expected: vec![] }],
        };
        let p0 = dims_of(store, "image_proj.proj.0.weight", 2).ok_or_else(|| missing("image_proj.proj.0.weight"))?;
        let p2 = dims_of(store, "image_proj.proj.2.weight", 2).ok_or_else(|| missing("image_proj.proj.2.weight"))?;
        let norm = dims_of(store, "image_proj.norm.weight", 1).ok_or_else(|| missing("image_proj.norm.weight"))?;
        let k0 =
            dims_of(store, "ip_adapter.0.to_k_ip.weight", 2).ok_or_else(|| missing("ip_adapter.0.to_k_ip.weight"))?;
        let cross_dim = norm[0];
        if cross_dim == 0 || p2[0] % cross_dim != 0 {
            return Err(Error::Checkpoint {
                source_name: store.source_name.clone(),
                problems: vec![TensorProblem::WrongShape {
                    name: "image_proj.proj.2.weight".into(),
                    expected: vec![cross_dim, p0[0]],
                    found: p2,
                }],
            });
        }
        let indices: BTreeSet<usize> =
            store.names().filter_map(|n| n.strip_prefix("ip_adapter.")?.split('.').next()?.parse().ok()).collect();
        // Processors are numbered 0..n; a gap shows up as missing tensors in validation.
        let num_processors = indices.iter().next_back().map_or(0, |m| m + 1);
        Ok(Self {
            id_dim: p0[1],
            proj_hidden: p0[0],
            num_tokens: p2[0] / cross_dim,
            cross_dim,
            num_processors,
            hidden: k0[0],
        })
    }

    /// Every tensor an adapter of these dimensions has, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![
            ("image_proj.proj.0.weight".to_string(), vec![self.proj_hidden, self.id_dim]),
            ("image_proj.proj.0.bias".to_string(), vec![self.proj_hidden]),
            ("image_proj.proj.2.weight".to_string(), vec![self.num_tokens * self.cross_dim, self.proj_hidden]),
            ("image_proj.proj.2.bias".to_string(), vec![self.num_tokens * self.cross_dim]),
            ("image_proj.norm.weight".to_string(), vec![self.cross_dim]),
            ("image_proj.norm.bias".to_string(), vec![self.cross_dim]),
        ];
        for i in 0..self.num_processors {
            v.push((format!("ip_adapter.{i}.to_k_ip.weight"), vec![self.hidden, self.cross_dim]));
            v.push((format!("ip_adapter.{i}.to_v_ip.weight"), vec![self.hidden, self.cross_dim]));
        }
        v
    }

    /// Bytes of the projection's weights at `dtype`.
    pub fn projection_bytes(&self, dtype: DType) -> usize {
        let n = self.proj_hidden * (self.id_dim + 1)
            + self.num_tokens * self.cross_dim * (self.proj_hidden + 1)
            + 2 * self.cross_dim;
        n * dtype.size_in_bytes()
    }

    /// Bytes of one IP processor's weights at `dtype`.
    pub fn processor_bytes(&self, dtype: DType) -> usize {
        2 * self.hidden * self.cross_dim * dtype.size_in_bytes()
    }
}

/// `Linear(id, 2·id) → GELU(erf) → Linear(2·id, T·C) → reshape [B, T, C] → LayerNorm(C)`.
#[derive(Debug, Clone)]
pub struct MlpProjection {
    proj_0: Linear,
    proj_2: Linear,
    norm: LayerNorm,
    num_tokens: usize,
    cross_dim: usize,
}

impl MlpProjection {
    pub fn new(dims: &IpAdapterDims, vb: candle_nn::VarBuilder) -> Result<Self> {
        let p = vb.pp("proj");
        Ok(Self {
            proj_0: Linear::new(dims.id_dim, dims.proj_hidden, p.pp("0"))?,
            proj_2: Linear::new(dims.proj_hidden, dims.num_tokens * dims.cross_dim, p.pp("2"))?,
            norm: LayerNorm::new(dims.cross_dim, PROJ_LAYER_NORM_EPS, vb.pp("norm"))?,
            num_tokens: dims.num_tokens,
            cross_dim: dims.cross_dim,
        })
    }

    /// `pooled [B, id]` → `image_prompt_embeds [B, T, C]`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let x = pooled.to_dtype(self.proj_0.dtype())?;
        let x = self.proj_0.forward(&x)?;
        let x = Activation::GeluErf.forward(&x)?;
        let x = self.proj_2.forward(&x)?;
        let x = x.reshape((x.dim(0)?, self.num_tokens, self.cross_dim))?;
        self.norm.forward(&x)
    }
}

/// Whether V is RMS-normalised per head like K.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VNorm {
    /// InstantX's reference processor: only K is normalised.
    #[default]
    InstantX,
    /// The ComfyUI-IPAdapter-Flux node: K and V are normalised.
    ComfyUi,
}

impl std::str::FromStr for VNorm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "instantx" | "k" | "off" => Ok(Self::InstantX),
            "comfyui" | "kv" | "on" => Ok(Self::ComfyUi),
            _ => Err(Error::Unsupported(format!("unknown V-norm variant `{s}`; expected `instantx` or `comfyui`"))),
        }
    }
}

/// How IP K/V are computed and attended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IpAttentionConfig {
    /// Size of one attention head (Flux: 128). The RMSNorm runs over it.
    pub head_dim: usize,
    pub v_norm: VNorm,
}

impl Default for IpAttentionConfig {
    fn default() -> Self {
        Self { head_dim: FLUX_HEAD_DIM, v_norm: VNorm::InstantX }
    }
}

/// One block's `to_k_ip` / `to_v_ip`.
#[derive(Debug, Clone)]
pub struct IpProcessor {
    to_k_ip: Linear,
    to_v_ip: Linear,
}

/// A block's image keys and values `[B, H, T, D]`: computed once per image, reused every sampler step.
#[derive(Debug, Clone)]
pub struct IpKv {
    pub k: Tensor,
    pub v: Tensor,
}

impl IpProcessor {
    pub fn new(dims: &IpAdapterDims, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            to_k_ip: Linear::no_bias(dims.cross_dim, dims.hidden, vb.pp("to_k_ip"))?,
            to_v_ip: Linear::no_bias(dims.cross_dim, dims.hidden, vb.pp("to_v_ip"))?,
        })
    }

    /// K and V of `image_prompt_embeds [B, T, C]`, split into heads and RMS-normalised.
    pub fn kv(&self, embeds: &Tensor, cfg: &IpAttentionConfig) -> Result<IpKv> {
        let embeds = embeds.to_dtype(self.to_k_ip.dtype())?;
        let split = |x: Tensor| -> Result<Tensor> {
            let (b, t, hd) = x.dims3()?;
            if cfg.head_dim == 0 || hd % cfg.head_dim != 0 {
                return Err(Error::Shape(format!("K/V width {hd} is not a multiple of head_dim {}", cfg.head_dim)));
            }
            Ok(x.reshape((b, t, hd / cfg.head_dim, cfg.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let k = rms_norm(&split(self.to_k_ip.forward(&embeds)?)?, IP_RMS_NORM_EPS)?;
        let v = split(self.to_v_ip.forward(&embeds)?)?;
        let v = match cfg.v_norm {
            VNorm::InstantX => v,
            VNorm::ComfyUi => rms_norm(&v, IP_RMS_NORM_EPS)?,
        };
        Ok(IpKv { k, v })
    }
}

impl IpKv {
    /// `scale · softmax(q kᵀ/√D) v` for a block's query `q [B, H, L, D]` (QK-normed, pre-RoPE),
    /// returned as `[B, L, H·D]` — the term the block adds to its attention output.
    pub fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        self.attend_with(q, scale, &crate::nn::Attention::reference())
    }

    /// [`Self::attend`] with the given attention implementation.
    pub fn attend_with(&self, q: &Tensor, scale: f64, attention: &crate::nn::Attention) -> Result<Tensor> {
        let (k, v) = self.kv_for(q)?;
        let out = attention.sdpa_merged(&q.to_dtype(k.dtype())?, &k, &v)?.to_dtype(q.dtype())?;
        Ok((out * scale)?)
    }

    /// `base + ` [`Self::attend`]: the attention output `base [B, L, H·D]`
    /// with this image's term added, in one pass where `attention` has a
    /// fused kernel that takes it (the same values as `base + attend(..)`
    /// on the reference path).
    pub fn attend_add(
        &self,
        q: &Tensor,
        scale: f64,
        base: &Tensor,
        attention: &crate::nn::Attention,
    ) -> Result<Tensor> {
        let (k, v) = self.kv_for(q)?;
        if q.dtype() != k.dtype() || base.dtype() != q.dtype() {
            return Ok((base + self.attend_with(q, scale, attention)?)?);
        }
        attention.sdpa_merged_add(q, &k, &v, base, scale)
    }

    /// K and V for query `q`, broadcast over its batch if cached for one item.
    pub fn kv_for(&self, q: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, l, d) = q.dims4()?;
        let (kb, kh, _, kd) = self.k.dims4()?;
        if (h, d) != (kh, kd) || (kb != b && kb != 1) {
            return Err(Error::Shape(format!("query [{b}, {h}, {l}, {d}] does not fit IP keys {:?}", self.k.dims())));
        }
        Ok(if kb == b {
            (self.k.clone(), self.v.clone())
        } else {
            (self.k.broadcast_as((b, h, self.k.dim(2)?, d))?, self.v.broadcast_as((b, h, self.v.dim(2)?, d))?)
        })
    }

    /// Bytes held by K and V.
    pub fn nbytes(&self) -> usize {
        (self.k.elem_count() + self.v.elem_count()) * self.k.dtype().size_in_bytes()
    }
}

/// A loaded IP-Adapter: the projection and every block's processor.
#[derive(Debug, Clone)]
pub struct IpAdapter {
    pub dims: IpAdapterDims,
    pub image_proj: MlpProjection,
    pub processors: Vec<IpProcessor>,
}

impl IpAdapter {
    /// Validates the checkpoint against its inferred dimensions, then builds at `dtype` on `device`.
    pub fn from_store(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
        let dims = IpAdapterDims::infer(store)?;
        store.validate(&dims.expected_tensors())?;
        let vb = store.var_builder(dtype, device);
        let image_proj = MlpProjection::new(&dims, vb.pp("image_proj"))?;
        let processors = (0..dims.num_processors)
            .map(|i| IpProcessor::new(&dims, vb.pp("ip_adapter").pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { dims, image_proj, processors })
    }

    /// K/V for every processor, in block order (double blocks first, then single).
    pub fn kv_all(&self, embeds: &Tensor, cfg: &IpAttentionConfig) -> Result<Vec<IpKv>> {
        self.processors.iter().map(|p| p.kv(embeds, cfg)).collect()
    }
}
