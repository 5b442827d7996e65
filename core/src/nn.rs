//! Small building blocks shared by the models: linear layers and norms that
//! compute in f32 whatever the storage dtype (as PyTorch's CPU kernels do for
//! half types), so bf16/f16 runs stay close to the f32 reference.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;

/// `y = x Wᵀ + b` over the last dimension, any number of leading dimensions.
///
/// A dense weight is kept transposed (`[in, out]`, contiguous), made once at
/// load: the CPU matmul is faster on a contiguous right-hand side than on a
/// strided one. A GGML-quantized weight (a GGUF checkpoint's, [`Self::quantized`])
/// stays in its blocks and is dequantized each time the layer runs.
///
/// A layer may also carry a [`LowRank`] change (a LoRA's, on a weight kept
/// fp8 or as GGML blocks, which cannot take it merged): it is added to the
/// weight, in f32, each time the weight is materialised.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// A change `up · down` added to the weight when it is materialised, and
    /// the dtype the sum is rounded to.
    delta: Option<(LowRank, DType)>,
}

/// A low-rank change `up · down` of a weight `[out, in]`: `down` `[rank, in]`,
/// `up` `[out, rank]`, both f32 on the weight's device, scales folded into `up`.
#[derive(Debug, Clone)]
pub struct LowRank {
    down: Tensor,
    up: Tensor,
}

impl LowRank {
    pub fn new(down: Tensor, up: Tensor) -> Result<Self> {
        let (rank, _) = down.dims2()?;
        let (_, up_rank) = up.dims2()?;
        if rank != up_rank || down.dtype() != DType::F32 || up.dtype() != DType::F32 {
            return Err(crate::Error::Shape(format!(
                "a low-rank change needs f32 down [rank, in] and up [out, rank], got {:?} {:?} and {:?} {:?}",
                down.dims(),
                down.dtype(),
                up.dims(),
                up.dtype()
            )));
        }
        Ok(Self { down, up })
    }

    /// The weight's columns it changes (`in`).
    pub fn in_dim(&self) -> usize {
        self.down.dims().get(1).copied().unwrap_or(0)
    }

    /// `up · down`, `[out, in]` f32.
    pub fn delta(&self) -> Result<Tensor> {
        Ok(self.up.matmul(&self.down)?)
    }

    /// `weight + up · down`, computed in f32 and rounded to `dtype`.
    pub fn merged(&self, weight: &Tensor, dtype: DType) -> Result<Tensor> {
        let delta = self.delta()?;
        if delta.dims() != weight.dims() {
            return Err(crate::Error::Shape(format!(
                "a low-rank change of shape {:?} on a weight of shape {:?}",
                delta.dims(),
                weight.dims()
            )));
        }
        Ok((weight.to_dtype(DType::F32)? + delta.to_device(weight.device())?)?.to_dtype(dtype)?)
    }

    /// The change of output rows `[start, start + len)`.
    fn narrow_out(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self { down: self.down.clone(), up: self.up.narrow(0, start, len)? })
    }
}

/// `weight` `[out, in]` as a dense [`Linear`] keeps it: transposed, made
/// contiguous on the CPU, a view on GPUs ([`Linear::from_parts`]).
fn transposed(weight: &Tensor) -> Result<Tensor> {
    Ok(if weight.device().is_cpu() { weight.t()?.contiguous()? } else { weight.t()? })
}

/// How a [`Linear`] holds its weight.
#[derive(Clone)]
enum Weight {
    /// Transposed, `[in, out]`.
    Dense(Tensor),
    /// GGML blocks `[out, in]` as stored, of which the layer is rows `rows`,
    /// dequantized to `dtype` when it runs.
    Quantized { blocks: Arc<QTensor>, rows: std::ops::Range<usize>, dtype: DType },
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dense(t) => f.debug_tuple("Dense").field(t).finish(),
            Self::Quantized { blocks, rows, dtype } => f
                .debug_struct("Quantized")
                .field("ggml", &blocks.dtype())
                .field("shape", blocks.shape())
                .field("rows", rows)
                .field("dtype", dtype)
                .finish(),
        }
    }
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::from_parts(vb.get((out_dim, in_dim), "weight")?, Some(vb.get(out_dim, "bias")?))
    }

    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::from_parts(vb.get((out_dim, in_dim), "weight")?, None)
    }

    /// From a PyTorch-layout weight `[out, in]` and optional bias `[out]`.
    ///
    /// On the CPU the transpose is made contiguous once (its matmul is faster
    /// so); on a GPU it stays a view of `weight` (cuBLAS takes the transposed
    /// operand as is), so the layer holds exactly the checkpoint's bytes and
    /// shares them with whoever else holds `weight`.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: Weight::Dense(transposed(&weight)?), bias, delta: None })
    }

    /// From GGML blocks `[out, in]` kept as they are (on their device) and
    /// dequantized to `dtype` each time the layer runs, as ComfyUI-GGUF does.
    pub fn quantized(blocks: QTensor, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out, _) = blocks.shape().dims2()?;
        Ok(Self { weight: Weight::Quantized { blocks: Arc::new(blocks), rows: 0..out, dtype }, bias, delta: None })
    }

    /// The layer with `delta` added to its weight each time the weight is
    /// materialised, the sum rounded to `dtype` (for weights that stay fp8 or
    /// quantized; a dense weight in the compute dtype takes
    /// [`LowRank::merged`] once instead). Replaces an earlier change.
    pub fn with_delta(self, delta: LowRank, dtype: DType) -> Result<Self> {
        let (out, inp) = (self.out_dim()?, self.in_dim()?);
        if delta.up.dim(0)? != out || delta.down.dim(1)? != inp {
            return Err(crate::Error::Shape(format!(
                "a low-rank change with up {:?} and down {:?} on a [{out}, {inp}] layer",
                delta.up.dims(),
                delta.down.dims()
            )));
        }
        Ok(Self { delta: Some((delta, dtype)), ..self })
    }

    fn out_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Dense(t) => t.dim(1)?,
            Weight::Quantized { rows, .. } => rows.len(),
        })
    }

    fn in_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Dense(t) => t.dim(0)?,
            Weight::Quantized { blocks, .. } => blocks.shape().dims2()?.1,
        })
    }

    /// Whether the weight is held as GGML blocks ([`Self::quantized`]).
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized { .. })
    }

    /// The layer with a dense weight: itself (a cheap clone) if it has one,
    /// else its weight dequantized once, for a caller that uses the weight
    /// more than once in a step (its halves, or a fused product with a fallback).
    pub fn dense(&self) -> Result<Self> {
        match (&self.weight, &self.delta) {
            (Weight::Dense(_), None) => Ok(self.clone()),
            _ => Self::from_parts(self.weight()?, self.bias.clone()),
        }
    }

    /// The weight in PyTorch's layout `[out, in]`: a view of a dense weight,
    /// a dequantized copy of a quantized one; with its [`LowRank`] change
    /// added (a new tensor) where the layer carries one.
    pub fn weight(&self) -> Result<Tensor> {
        let w = match &self.weight {
            Weight::Dense(t) => t.t()?,
            Weight::Quantized { blocks, rows, dtype } => {
                let device = blocks.device();
                let f16 = *dtype == DType::F16 && self.delta.is_none();
                let w = if f16 { blocks.dequantize_f16(&device)? } else { blocks.dequantize(&device)? };
                let w = if rows.len() == w.dim(0)? { w } else { w.narrow(0, rows.start, rows.len())? };
                if self.delta.is_some() {
                    w
                } else {
                    w.to_dtype(*dtype)?
                }
            }
        };
        match &self.delta {
            None => Ok(w),
            Some((delta, dtype)) => delta.merged(&w, *dtype),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer of output features `[start, start + len)`: views of the
    /// weight's rows (of the blocks, for a quantized weight) and the bias, no copy.
    pub fn narrow_out(&self, start: usize, len: usize) -> Result<Self> {
        let bias = self.bias.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
        let weight = match &self.weight {
            Weight::Dense(t) => Weight::Dense(t.narrow(1, start, len)?),
            Weight::Quantized { blocks, rows, dtype } => {
                if start + len > rows.len() {
                    return Err(crate::Error::Shape(format!(
                        "rows {start}..{} of a {}-row layer",
                        start + len,
                        rows.len()
                    )));
                }
                let rows = rows.start + start..rows.start + start + len;
                Weight::Quantized { blocks: blocks.clone(), rows, dtype: *dtype }
            }
        };
        let delta =
            self.delta.as_ref().map(|(d, dt)| Ok::<_, crate::Error>((d.narrow_out(start, len)?, *dt))).transpose()?;
        Ok(Self { weight, bias, delta })
    }

    /// The dtype the weights are stored in (a quantized weight's: the one it is dequantized to).
    pub fn dtype(&self) -> DType {
        match (&self.weight, &self.delta) {
            (_, Some((_, dtype))) => *dtype,
            (Weight::Dense(t), None) => t.dtype(),
            (Weight::Quantized { dtype, .. }, None) => *dtype,
        }
    }

    /// Weights stored in another dtype than `x` (fp8 checkpoints) are converted for this call only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// `x Wᵀ` without the bias (for a caller that fuses the bias into what follows).
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    fn apply(&self, x: &Tensor, with_bias: bool) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, in_dim))?;
        let weight_t = match (&self.weight, &self.delta) {
            (Weight::Dense(t), None) => t.clone(),
            // Laid out as a dense weight is, so both compute the same.
            _ => transposed(&self.weight()?)?,
        };
        let mut y = if weight_t.dtype() == x.dtype() {
            x2.matmul(&weight_t)?
        } else {
            x2.matmul(&weight_t.to_dtype(x.dtype())?)?
        };
        if let (Some(b), true) = (&self.bias, with_bias) {
            y = if b.dtype() == y.dtype() { y.broadcast_add(b)? } else { y.broadcast_add(&b.to_dtype(y.dtype())?)? };
        }
        let mut out_shape = dims[..dims.len() - 1].to_vec();
        out_shape.push(weight_t.dim(1)?);
        Ok(y.reshape(out_shape)?)
    }
}

/// LayerNorm over the last dimension with affine weight and bias, computed in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    /// False for [`Self::no_affine`] (weight 1, bias 0): only then may a fused
    /// kernel that ignores the weights replace it ([`modulate`]).
    pub affine: bool,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps, affine: true })
    }

    /// Without learned weight and bias (`elementwise_affine=False`): weight 1, bias 0, in f32.
    pub fn no_affine(dim: usize, eps: f64, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, DType::F32, device)?,
            bias: Tensor::zeros(dim, DType::F32, device)?,
            eps,
            affine: false,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if !x.device().is_cpu() {
            // candle's fused kernel (f32 accumulation for every dtype): one pass instead of ~10.
            let (w, b) = (self.weight.to_dtype(dtype)?, self.bias.to_dtype(dtype)?);
            return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, self.eps as f32)?);
        }
        if dtype == DType::F32 && self.weight.dtype() == DType::F32 {
            // Fused kernel, same formula: (x − mean) / √(var + eps) · w + b.
            return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)?);
        }
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?.broadcast_add(&self.bias.to_dtype(DType::F32)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// RMSNorm without weights over the last dimension (diffusers' `RMSNorm(elementwise_affine=False)`), in f32.
pub fn rms_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    if !x.device().is_cpu() {
        let ones = Tensor::ones(x.dim(D::Minus1)?, dtype, x.device())?;
        return rms_norm_scaled(x, &ones, eps);
    }
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?)
}

/// `rms_norm(x) · scale`. On a GPU one fused kernel (candle's, f32
/// accumulation); on the CPU the f32 path of [`rms_norm`], then the scale.
pub fn rms_norm_scaled(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    if !x.device().is_cpu() {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &scale.to_dtype(dtype)?, eps as f32)?);
    }
    Ok(rms_norm(x, eps)?.broadcast_mul(&scale.to_dtype(dtype)?)?)
}

/// Softmax over the last dimension, computed in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::kernels::softmax_last_f32(x) {
        return Ok(y?);
    }
    let dtype = x.dtype();
    Ok(candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
}

/// Scaled dot-product attention of `q [B,H,L,D]` over `k, v [B,H,S,D]` (no mask), scale 1/√D.
///
/// The score matrix is materialised, a group of heads at a time so that each
/// group's scores stay under [`SCORES_CHUNK_BYTES`]: allocations that size are
/// recycled by the allocator instead of being fresh pages each call (zeroing
/// 34 MB of new pages per SigLIP layer cost more than the softmax itself).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let s = k.dim(2)?;
    let per_head = b * l * s * q.dtype().size_in_bytes();
    let limit = if q.device().is_cpu() { SCORES_CHUNK_BYTES } else { DEVICE_SCORES_CHUNK_BYTES };
    let group = (limit / per_head.max(1)).clamp(1, h.max(1));
    if group >= h {
        return sdpa_all(q, k, v, d);
    }
    let mut outs = Vec::with_capacity(h.div_ceil(group));
    for start in (0..h).step_by(group) {
        let n = group.min(h - start);
        outs.push(sdpa_all(&q.narrow(1, start, n)?, &k.narrow(1, start, n)?, &v.narrow(1, start, n)?, d)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// Largest score matrix [`sdpa`] materialises at once on the CPU.
pub const SCORES_CHUNK_BYTES: usize = 8 << 20;

/// Largest score matrix [`sdpa`] materialises at once on a GPU: all heads of
/// a Flux 1024² block in bf16 (1 GiB, as candle's own attention would), so the
/// reference path is one batched product per call there. [`Attention`] with a
/// fused kernel never materialises it.
pub const DEVICE_SCORES_CHUNK_BYTES: usize = 2 << 30;

/// A fused attention kernel for some devices and dtypes (the CUDA one lives
/// in the `ipaflux` crate, which may use `unsafe`; core may not).
pub trait FusedAttention: std::fmt::Debug + Send + Sync {
    /// Short name for reports.
    fn name(&self) -> &'static str;
    /// Attention of `q [B,H,L,D]` over `k, v [B,H,S,D]`, scale 1/√D, no mask;
    /// `None` when this kernel does not take these inputs (device, dtype, head
    /// size), so the caller uses the reference path instead.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Result<Tensor>>;
    /// [`Self::attend`] with the heads merged, `[B, L, H·D]`, and, with `add =
    /// Some((base, s))`, `base + s · attention` (`base [B, L, H·D]`), written
    /// in one pass instead of a transpose copy (and a scale and an add).
    /// `None` where not taken (the default): [`Attention`] composes it.
    fn attend_merged(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _add: Option<(&Tensor, f64)>,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// [`Self::attend_merged`] (no `add`) with `extra`'s attention added to its
    /// rows in the same launch (the IP-Adapter's term fused into a block's
    /// attention). `None` where not taken (the default): the caller runs the
    /// attention, then the term.
    fn attend_merged_extra(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _extra: &ExtraAttention<'_>,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// Whether [`Self::attend_merged_extra`] can take any input at all, so a
    /// caller need not prepare an extra term for a kernel that never takes
    /// one (the default: no).
    fn takes_extra(&self) -> bool {
        false
    }
}

/// A second attention added to rows of a main attention's output, for
/// [`FusedAttention::attend_merged_extra`]: rows `row0..` of the `[B, L, H·D]`
/// output get `scale · softmax(q kᵀ/√D) v` of that row, with `q [B, H, L, D]`
/// (the same rows as the main query; rows before `row0` are not read),
/// `k, v [B, H, S, D]`. The IP-Adapter's term: `q` is the block's pre-RoPE
/// query, `row0` the first image token in a double block.
#[derive(Debug, Clone, Copy)]
pub struct ExtraAttention<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub row0: usize,
    pub scale: f64,
}

/// Which attention a model runs: the reference [`sdpa`] (scores
/// materialised), or a fused kernel wherever it applies. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Attention {
    fused: Option<Arc<dyn FusedAttention>>,
}

impl Attention {
    /// The reference path everywhere.
    pub fn reference() -> Self {
        Self::default()
    }

    /// `kernel` where it takes the inputs, the reference path elsewhere.
    pub fn fused(kernel: Arc<dyn FusedAttention>) -> Self {
        Self { fused: Some(kernel) }
    }

    /// The fused kernel's name, or `"reference"`.
    pub fn name(&self) -> &'static str {
        self.fused.as_ref().map_or("reference", |k| k.name())
    }

    /// Scaled dot-product attention as [`sdpa`].
    pub fn sdpa(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Some(out) = self.fused.as_ref().and_then(|f| f.attend(q, k, v)) {
            return out;
        }
        sdpa(q, k, v)
    }

    /// [`Self::sdpa`] with the heads merged: `[B, L, H·D]`.
    pub fn sdpa_merged(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Some(out) = self.fused.as_ref().and_then(|f| f.attend_merged(q, k, v, None)) {
            return out;
        }
        merge_heads(&self.sdpa(q, k, v)?)
    }

    /// `base + scale · sdpa_merged(q, k, v)` (`base [B, L, H·D]`): the
    /// reference rounds the scaled term to `base`'s dtype before the add.
    pub fn sdpa_merged_add(&self, q: &Tensor, k: &Tensor, v: &Tensor, base: &Tensor, scale: f64) -> Result<Tensor> {
        if let Some(out) = self.fused.as_ref().and_then(|f| f.attend_merged(q, k, v, Some((base, scale)))) {
            return out;
        }
        let term = (merge_heads(&self.sdpa(q, k, v)?)?.to_dtype(base.dtype())? * scale)?;
        Ok((base + term)?)
    }

    /// Whether [`Self::sdpa_merged_extra`] may be taken (a fused kernel that
    /// takes extra terms); when not, it is always `None`.
    pub fn takes_extra(&self) -> bool {
        self.fused.as_ref().is_some_and(|f| f.takes_extra())
    }

    /// [`Self::sdpa_merged`] with `extra` added in one fused launch, or `None`
    /// where no fused kernel takes it (then the caller runs the attention and
    /// the term apart: this has no reference composition of its own).
    pub fn sdpa_merged_extra(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        extra: &ExtraAttention<'_>,
    ) -> Option<Result<Tensor>> {
        self.fused.as_ref().and_then(|f| f.attend_merged_extra(q, k, v, extra))
    }
}

/// `[B, H, L, D]` → `[B, L, H·D]` (a copy).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

/// Fused elementwise kernels for the modulated sub-layers of DiT blocks (Flux),
/// for some devices and dtypes; the CUDA ones live in the `ipaflux` crate.
/// Each method returns `None` for inputs it does not take, and the caller
/// runs the reference ops ([`modulate`], [`gated_add`]).
pub trait FusedModulation: std::fmt::Debug + Send + Sync {
    /// Short name for reports.
    fn name(&self) -> &'static str;
    /// `LayerNorm(x) · (1 + scale) + shift`: LayerNorm without affine over
    /// the last dimension of `x [B, L, H]`, `scale`, `shift` `[B, 1, H]`.
    fn ln_modulate(&self, x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f64) -> Option<Result<Tensor>>;
    /// `x + (y + bias) · gate`: `x`, `y` `[B, L, H]`, `bias` `[H]` if any
    /// (the bias of the linear layer that made `y`), `gate` `[B, 1, H]`.
    fn gated_add(&self, x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: &Tensor) -> Option<Result<Tensor>>;
    /// GELU (tanh approximation) of `x + bias` (`bias` `[W]` over the last
    /// dimension, if any), contiguous; `x [B, L, W]` may be a narrow of a
    /// wider tensor's last dimension (the single blocks' MLP half).
    fn gelu_tanh(&self, _x: &Tensor, _bias: Option<&Tensor>) -> Option<Result<Tensor>> {
        None
    }
    /// `[head, GELU-tanh(x + bias)]` joined over the last dimension: `head
    /// [B, L, A]`, `x` and `bias` as [`Self::gelu_tanh`]. The single blocks'
    /// input to `linear2` made without a separate concatenation pass;
    /// `None` where not taken (the default).
    fn gelu_tanh_after(&self, _head: &Tensor, _x: &Tensor, _bias: Option<&Tensor>) -> Option<Result<Tensor>> {
        None
    }
    /// Whether [`Self::linear_gelu_tanh_after`] may take a layer applied to
    /// `x`. Where it may, Flux's single blocks make their first linear
    /// layer's QKV and MLP halves as two products (the second joined to the
    /// attention by that method) instead of one; default: no.
    fn takes_linear_gelu(&self, _x: &Tensor) -> bool {
        false
    }
    /// GELU-tanh(x Wᵀ + bias) with the activation applied as the product
    /// is written (no separate pass): `x [B, L, K]`, `weight [N, K]`
    /// (PyTorch's layout, rows may be a narrow of a larger weight), `bias
    /// [N]` if any. `None` where not taken (the default).
    fn linear_gelu_tanh(&self, _x: &Tensor, _weight: &Tensor, _bias: Option<&Tensor>) -> Option<Result<Tensor>> {
        None
    }
    /// `[head, GELU-tanh(x Wᵀ + bias)]` joined over the last dimension,
    /// the product written in place beside `head [B, L, A]` (arguments as
    /// [`Self::linear_gelu_tanh`]); `None` where not taken (the default).
    fn linear_gelu_tanh_after(
        &self,
        _head: &Tensor,
        _x: &Tensor,
        _weight: &Tensor,
        _bias: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// Attention inputs from QKV projections made *without* their bias, as
    /// [`QkvStreams`] describes; `None` where not taken (the default).
    fn qkv_rope(&self, _streams: &QkvStreams<'_>) -> Option<Result<QkvOut>> {
        None
    }
}

/// What a [`FusedLinear`] applies to `x Wᵀ + bias` as the product is written.
#[derive(Debug, Clone, Copy)]
pub enum LinearEpilogue<'a> {
    /// The bias only.
    Bias,
    /// GELU (tanh approximation) of the biased product.
    GeluTanh,
    /// `residual + (x Wᵀ + bias)`, `residual` shaped like the output.
    Residual(&'a Tensor),
}

/// Linear layers whose product also applies what follows it
/// ([`LinearEpilogue`]): one launch instead of a product and one or two
/// elementwise passes (SigLIP's layers; the CUDA one, by cuBLASLt's
/// epilogues, lives in the `ipaflux` crate). `None` for inputs it does not
/// take; the caller then runs [`Linear::forward`] and the ops after it.
pub trait FusedLinear: std::fmt::Debug + Send + Sync {
    /// Short name for reports.
    fn name(&self) -> &'static str;
    /// `layer(x)` with `epilogue`, `x [B, L, in]`.
    fn linear(&self, x: &Tensor, layer: &Linear, epilogue: LinearEpilogue<'_>) -> Option<Result<Tensor>>;
}

/// One token stream's QKV projection for [`FusedModulation::qkv_rope`].
#[derive(Debug, Clone, Copy)]
pub struct QkvInput<'a> {
    /// `[B, L, 3·H·D]` before the bias (q, k, v, each head after head); rows
    /// may be a narrow of a wider tensor's last dimension.
    pub qkv: &'a Tensor,
    /// `[3·H·D]`, if the projection has one.
    pub bias: Option<&'a Tensor>,
    /// RMSNorm scales over the head size, `[D]`.
    pub q_scale: &'a Tensor,
    pub k_scale: &'a Tensor,
}

/// Everything [`FusedModulation::qkv_rope`] takes: the streams whose tokens
/// are concatenated in this order (Flux's double blocks: text, then image),
/// and the RoPE tables of the concatenation.
#[derive(Debug, Clone, Copy)]
pub struct QkvStreams<'a> {
    pub streams: &'a [QkvInput<'a>],
    pub heads: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Rotation of each consecutive pair of a head, `[L_total, D/2]` f32 each.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Also return q after the norm and before RoPE (for attention hooks).
    pub keep_q: bool,
}

/// Q, K, V `[B, H, L_total, D]`, q and k normed and rotated, and q normed
/// but not rotated when asked.
#[derive(Debug, Clone)]
pub struct QkvOut {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub q_pre_rope: Option<Tensor>,
}

/// GELU-tanh of `x + bias` with `fused` where it applies, else as separate ops
/// (the bias added in `x`'s dtype, then [`Activation::GeluTanh`]).
pub fn bias_gelu(fused: Option<&dyn FusedModulation>, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(out) = fused.and_then(|f| f.gelu_tanh(x, bias)) {
        return out;
    }
    Ok(Activation::GeluTanh.forward(&add_bias(x, bias)?.contiguous()?)?)
}

/// `[head, GELU-tanh(x + bias)]` over the last dimension with `fused` where
/// it takes it ([`FusedModulation::gelu_tanh_after`]), else [`bias_gelu`]
/// then a concatenation.
pub fn cat_bias_gelu(
    fused: Option<&dyn FusedModulation>,
    head: &Tensor,
    x: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(out) = fused.and_then(|f| f.gelu_tanh_after(head, x, bias)) {
        return out;
    }
    Ok(Tensor::cat(&[head, &bias_gelu(fused, x, bias)?], D::Minus1)?)
}

/// GELU-tanh of `lin(x)`: one product with the activation in its epilogue
/// where `fused` takes it ([`FusedModulation::linear_gelu_tanh`]), else the
/// product without its bias, then [`bias_gelu`].
pub fn linear_gelu(fused: Option<&dyn FusedModulation>, lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let lin = &lin.dense()?;
    if let Some(f) = fused {
        if let Some(out) = f.linear_gelu_tanh(x, &lin.weight()?, lin.bias()) {
            return out;
        }
    }
    bias_gelu(fused, &lin.forward_no_bias(x)?, lin.bias())
}

/// `[head, GELU-tanh(lin(x))]` over the last dimension: the product written
/// beside `head` where `fused` takes it
/// ([`FusedModulation::linear_gelu_tanh_after`]), else the product, then
/// [`cat_bias_gelu`].
pub fn cat_linear_gelu(fused: Option<&dyn FusedModulation>, head: &Tensor, lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let lin = &lin.dense()?;
    if let Some(f) = fused {
        if let Some(out) = f.linear_gelu_tanh_after(head, x, &lin.weight()?, lin.bias()) {
            return out;
        }
    }
    cat_bias_gelu(fused, head, &lin.forward_no_bias(x)?, lin.bias())
}

/// `ln(x) · (1 + scale) + shift` with `fused` where it applies, else as separate ops.
pub fn modulate(
    fused: Option<&dyn FusedModulation>,
    ln: &LayerNorm,
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
) -> Result<Tensor> {
    // The fused kernels' LayerNorm has no weights: an affine one runs as separate ops.
    if let Some(out) = fused.filter(|_| !ln.affine).and_then(|f| f.ln_modulate(x, scale, shift, ln.eps)) {
        return out;
    }
    Ok(ln.forward(x)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

/// `x + (y + bias) · gate` with `fused` where it applies, else as separate ops
/// (the bias added in `y`'s dtype first, as [`Linear::forward`] does).
pub fn gated_add(
    fused: Option<&dyn FusedModulation>,
    x: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
    gate: &Tensor,
) -> Result<Tensor> {
    if let Some(out) = fused.and_then(|f| f.gated_add(x, y, bias, gate)) {
        return out;
    }
    let y = add_bias(y, bias)?;
    Ok((x + y.broadcast_mul(gate)?)?)
}

/// `x + bias` over the last dimension in `x`'s dtype (as [`Linear::forward`]).
pub fn add_bias(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) if b.dtype() == x.dtype() => x.broadcast_add(b)?,
        Some(b) => x.broadcast_add(&b.to_dtype(x.dtype())?)?,
        None => x.clone(),
    })
}

fn sdpa_all(q: &Tensor, k: &Tensor, v: &Tensor, d: usize) -> Result<Tensor> {
    let scale = 1.0 / (d as f64).sqrt();
    // Scaling q (L×D) instead of the scores (L×S) touches fewer elements.
    let scores = (q * scale)?.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    let probs = softmax_last(&scores)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// An activation selected by its Hugging Face name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh` / `gelu_new` / `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// Exact erf GELU (`torch.nn.GELU()`).
    GeluErf,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if *self == Self::GeluTanh {
            if let Some(y) = crate::kernels::gelu_tanh_f32(x) {
                return y;
            }
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let y = match self {
            Self::GeluTanh => x32.gelu()?,
            Self::GeluErf => x32.gelu_erf()?,
        };
        y.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_of_constant_is_sign() {
        let x = Tensor::new(&[[3f32, 3., 3., 3.], [-2., -2., -2., -2.]], &Device::Cpu).unwrap();
        let y = rms_norm(&x, 0.0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.0; 4], vec![-1.0; 4]]);
    }

    #[test]
    fn sdpa_with_equal_keys_averages_values() {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 1, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::ones((1, 1, 3, 4), DType::F32, &dev).unwrap();
        let v = Tensor::new(&[1f32, 2., 3.], &dev).unwrap().reshape((1, 1, 3, 1)).unwrap();
        let v = v.broadcast_as((1, 1, 3, 4)).unwrap().contiguous().unwrap();
        let o = sdpa(&q, &k, &v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(o.iter().all(|x| (x - 2.0).abs() < 1e-6));
    }
}
