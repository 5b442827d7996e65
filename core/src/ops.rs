//! The primitive operations the SigLIP encoder is written in, implemented once
//! per compute backend.
//!
//! The encoder's math ([`crate::siglip`]) is generic over [`VisionOps`], so it
//! exists once: candle (CPU, CUDA, CPU in wasm) implements the trait here with
//! [`CandleOps`]; the WebGPU/wgpu backend (`ipaflux-gpu`) implements it with
//! WGSL kernels. A backend chooses its own activation handle, its own weight
//! formats (candle tensors; f32, f16 or block-quantized GPU buffers) and its
//! own error type. Parity tests compare backends on the same weights.
//!
//! What this is not: a general tensor library. It has exactly the operations
//! SigLIP needs, at the shapes it needs them (`[B, L, C]` activations).

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{Activation, FusedLinear, LayerNorm, Linear, LinearEpilogue};

/// Operations on activations `[B, L, C]` (row-major).
pub trait VisionOps {
    /// An activation on the backend's device.
    type T;
    /// A linear layer `y = x·Wᵀ + b`, in whatever format the backend stores it.
    type Linear;
    /// LayerNorm over the last dimension (weight, bias, eps).
    type Norm;
    /// The backend's error; generic code reports its own problems as [`crate::Error`].
    type Error: From<crate::Error>;

    /// `x [B, L, in] → [B, L, out]`.
    fn linear(&self, x: &Self::T, layer: &Self::Linear) -> Result<Self::T, Self::Error>;
    /// LayerNorm over the last dimension.
    fn layer_norm(&self, x: &Self::T, norm: &Self::Norm) -> Result<Self::T, Self::Error>;
    /// An elementwise activation.
    fn activation(&self, x: &Self::T, act: Activation) -> Result<Self::T, Self::Error>;
    /// `a + b`, same shapes.
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    /// `act(linear(x))`; a backend may apply `act` as the product is written.
    fn linear_act(&self, x: &Self::T, layer: &Self::Linear, act: Activation) -> Result<Self::T, Self::Error> {
        self.activation(&self.linear(x, layer)?, act)
    }
    /// `residual + linear(x)`; a backend may add `residual` as the product is written.
    fn linear_add(&self, x: &Self::T, layer: &Self::Linear, residual: &Self::T) -> Result<Self::T, Self::Error> {
        self.add(residual, &self.linear(x, layer)?)
    }
    /// `x [B, L, C] + rows [1, L, C]`, broadcast over the batch.
    fn add_rows(&self, x: &Self::T, rows: &Self::T) -> Result<Self::T, Self::Error>;
    /// `x [1, L, C]` repeated to `[batch, L, C]`.
    fn expand_batch(&self, x: &Self::T, batch: usize) -> Result<Self::T, Self::Error>;
    /// Multi-head softmax attention, scale 1/√D, no mask: `q [B, Lq, H·D]`
    /// over `k, v [B, Lk, H·D]` → `[B, Lq, H·D]`.
    fn attention(&self, q: &Self::T, k: &Self::T, v: &Self::T, heads: usize) -> Result<Self::T, Self::Error>;
    /// Pixels `[B, C, H, W]` → non-overlapping patches `[B, (H/p)·(W/p), C·p·p]`
    /// (channel-major inside a patch, as a stride-p convolution reads them;
    /// pixels past the last whole patch are ignored).
    fn patchify(&self, pixels: &Self::T, patch: usize) -> Result<Self::T, Self::Error>;
    /// The batch size of an activation.
    fn batch(&self, x: &Self::T) -> Result<usize, Self::Error>;
}

/// Builds a backend's weights from host tensors (a checkpoint read by
/// [`crate::weights::TensorStore`]): the same loader code serves every backend.
pub trait LoadOps: VisionOps {
    /// `weight [out, in]`, `bias [out]`.
    fn load_linear(&self, weight: Tensor, bias: Tensor) -> Result<Self::Linear, Self::Error>;
    /// The linear layer stored under `vb` (`weight [out, in]`, `bias [out]`).
    /// By default through [`LoadOps::load_linear`] (a pre-quantized weight
    /// arrives dequantized); a backend that can use packed weights as stored
    /// overrides this ([`crate::quant::find_packed`]).
    fn load_linear_at(&self, vb: &VarBuilder, out: usize, inp: usize) -> Result<Self::Linear, Self::Error> {
        let w = vb.get((out, inp), "weight").map_err(crate::Error::from)?;
        let b = vb.get(out, "bias").map_err(crate::Error::from)?;
        self.load_linear(w, b)
    }
    fn load_norm(&self, weight: Tensor, bias: Tensor, eps: f64) -> Result<Self::Norm, Self::Error>;
    /// A constant activation-shaped tensor (position embeddings, the probe).
    fn load_tensor(&self, t: Tensor) -> Result<Self::T, Self::Error>;
}

/// candle's implementation: any candle device and dtype (the tensors of the
/// `VarBuilder` decide). Uses the f32 kernels of [`crate::kernels`] on the CPU.
#[derive(Debug, Clone, Default)]
pub struct CandleOps {
    /// Reference attention unless a fused kernel is set.
    pub attention: crate::nn::Attention,
    /// Linear layers with their bias, activation or residual in the
    /// product where set and it takes them; else candle's ops.
    pub linear: Option<Arc<dyn FusedLinear>>,
}

impl CandleOps {
    fn fused_linear(&self, x: &Tensor, layer: &Linear, epilogue: LinearEpilogue<'_>) -> Option<crate::Result<Tensor>> {
        self.linear.as_ref().and_then(|f| f.linear(x, layer, epilogue))
    }
}

/// Splits `[B, L, H*D]` into heads `[B, H, L, D]`.
fn heads(x: &Tensor, n: usize) -> crate::Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    Ok(x.reshape((b, l, n, hd / n))?.transpose(1, 2)?)
}

/// Merges heads `[B, H, L, D]` back to `[B, L, H*D]`.
fn merge_heads(x: &Tensor) -> crate::Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, l, h * d))?)
}

impl VisionOps for CandleOps {
    type T = Tensor;
    type Linear = Linear;
    type Norm = LayerNorm;
    type Error = crate::Error;

    fn linear(&self, x: &Tensor, layer: &Linear) -> crate::Result<Tensor> {
        self.fused_linear(x, layer, LinearEpilogue::Bias).unwrap_or_else(|| layer.forward(x))
    }

    fn linear_act(&self, x: &Tensor, layer: &Linear, act: Activation) -> crate::Result<Tensor> {
        if act == Activation::GeluTanh {
            if let Some(out) = self.fused_linear(x, layer, LinearEpilogue::GeluTanh) {
                return out;
            }
        }
        self.activation(&self.linear(x, layer)?, act)
    }

    fn linear_add(&self, x: &Tensor, layer: &Linear, residual: &Tensor) -> crate::Result<Tensor> {
        if let Some(out) = self.fused_linear(x, layer, LinearEpilogue::Residual(residual)) {
            return out;
        }
        self.add(residual, &self.linear(x, layer)?)
    }

    fn layer_norm(&self, x: &Tensor, norm: &LayerNorm) -> crate::Result<Tensor> {
        norm.forward(x)
    }

    fn activation(&self, x: &Tensor, act: Activation) -> crate::Result<Tensor> {
        Ok(candle_core::Module::forward(&act, x)?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> crate::Result<Tensor> {
        Ok((a + b)?)
    }

    fn add_rows(&self, x: &Tensor, rows: &Tensor) -> crate::Result<Tensor> {
        Ok(x.broadcast_add(rows)?)
    }

    fn expand_batch(&self, x: &Tensor, batch: usize) -> crate::Result<Tensor> {
        let (_, l, c) = x.dims3()?;
        Ok(x.broadcast_as((batch, l, c))?.contiguous()?)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, n: usize) -> crate::Result<Tensor> {
        let out = self.attention.sdpa(&heads(q, n)?, &heads(k, n)?, &heads(v, n)?)?;
        merge_heads(&out)
    }

    fn patchify(&self, pixels: &Tensor, p: usize) -> crate::Result<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let (gh, gw) = (hh / p, ww / p);
        let pixels = pixels.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        // [B, C, gh, p, gw, p] → [B, gh, gw, C, p, p] → [B, gh*gw, C*p*p]
        let patches = pixels.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?;
        Ok(patches.reshape((b, gh * gw, c * p * p))?)
    }

    fn batch(&self, x: &Tensor) -> crate::Result<usize> {
        Ok(x.dim(0)?)
    }
}

impl LoadOps for CandleOps {
    fn load_linear(&self, weight: Tensor, bias: Tensor) -> crate::Result<Linear> {
        Linear::from_parts(weight, Some(bias))
    }

    fn load_norm(&self, weight: Tensor, bias: Tensor, eps: f64) -> crate::Result<LayerNorm> {
        Ok(LayerNorm { weight, bias, eps, affine: true })
    }

    fn load_tensor(&self, t: Tensor) -> crate::Result<Tensor> {
        Ok(t)
    }
}
