//! [`WgpuOps`]: core's [`VisionOps`] on the WGSL kernels, so core's SigLIP
//! model code runs on WebGPU unchanged.

use std::cell::Cell;
use std::rc::Rc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use ipaflux_core::nn::Activation;
use ipaflux_core::ops::{LoadOps, VisionOps};

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::kernels::{attention, elementwise, layer_norm, matmul, patchify};
pub use crate::kernels::{layer_norm::GpuNorm, matmul::GpuLinear};
use crate::quant::WeightFormat;
use crate::tensor::GpuTensor;

/// The WebGPU backend: a device and the format linear weights are loaded in.
#[derive(Debug, Clone)]
pub struct WgpuOps {
    ctx: Rc<GpuContext>,
    format: WeightFormat,
    loaded: Rc<Cell<u64>>,
}

impl WgpuOps {
    pub fn new(ctx: Rc<GpuContext>, format: WeightFormat) -> Self {
        Self { ctx, format, loaded: Rc::new(Cell::new(0)) }
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes of weights this backend has uploaded.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded.get()
    }

    fn count(&self, bytes: u64) {
        self.loaded.set(self.loaded.get() + bytes);
    }
}

/// A host tensor as f32 values and its shape.
fn host_f32(t: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, t.dims().to_vec()))
}

impl VisionOps for WgpuOps {
    type T = GpuTensor;
    type Linear = GpuLinear;
    type Norm = GpuNorm;
    type Error = Error;

    fn linear(&self, x: &GpuTensor, layer: &GpuLinear) -> Result<GpuTensor> {
        matmul::linear(&self.ctx, x, layer)
    }

    fn layer_norm(&self, x: &GpuTensor, norm: &GpuNorm) -> Result<GpuTensor> {
        layer_norm::layer_norm(&self.ctx, x, norm)
    }

    fn activation(&self, x: &GpuTensor, act: Activation) -> Result<GpuTensor> {
        elementwise::activation(&self.ctx, x, act)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        if a.shape != b.shape {
            return Err(Error::Shape { op: "add", detail: format!("{:?} + {:?}", a.shape, b.shape) });
        }
        elementwise::add(&self.ctx, a, b)
    }

    fn add_rows(&self, x: &GpuTensor, rows: &GpuTensor) -> Result<GpuTensor> {
        elementwise::add(&self.ctx, x, rows)
    }

    fn expand_batch(&self, x: &GpuTensor, batch: usize) -> Result<GpuTensor> {
        elementwise::repeat_batch(&self.ctx, x, batch)
    }

    fn attention(&self, q: &GpuTensor, k: &GpuTensor, v: &GpuTensor, heads: usize) -> Result<GpuTensor> {
        attention::attention(&self.ctx, q, k, v, heads)
    }

    fn patchify(&self, pixels: &GpuTensor, patch: usize) -> Result<GpuTensor> {
        patchify::patchify(&self.ctx, pixels, patch)
    }

    fn batch(&self, x: &GpuTensor) -> Result<usize> {
        x.shape.first().copied().ok_or(Error::Shape { op: "batch", detail: "a scalar has no batch".into() })
    }
}

impl WgpuOps {
    fn upload_linear(&self, weight: &Tensor, bias: &Tensor, format: WeightFormat) -> Result<GpuLinear> {
        let (w, dims) = host_f32(weight)?;
        let (b, _) = host_f32(bias)?;
        let &[n, k] = dims.as_slice() else {
            return Err(Error::Shape { op: "load_linear", detail: format!("weight {dims:?}") });
        };
        let layer = GpuLinear::new(&self.ctx, &w, &b, n, k, format)?;
        self.count(layer.bytes());
        Ok(layer)
    }
}

/// The weight format applies to the model's named linear layers
/// ([`ipaflux_core::siglip::linear_weights`], through `load_linear_at`): the
/// ones `ipaflux quantize` stores small, so a pre-quantized checkpoint and
/// quantizing at upload give the same GPU weights. Linear layers built from
/// other tensors — the patch embedding (a reshaped convolution) and the
/// pooling head's packed `in_proj` (≈1 % of so400m's weights) — stay f32.
impl LoadOps for WgpuOps {
    fn load_linear(&self, weight: Tensor, bias: Tensor) -> Result<GpuLinear> {
        self.upload_linear(&weight, &bias, WeightFormat::F32)
    }

    /// A weight stored pre-quantized (`ipaflux quantize`) is uploaded as
    /// stored, without a round trip through f32; others are converted to the
    /// backend's format.
    fn load_linear_at(&self, vb: &VarBuilder, out: usize, inp: usize) -> Result<GpuLinear> {
        // Packed tensors keep their stored dtypes: u32 words, f32 scales.
        let lookup = |name: &str| -> ipaflux_core::Result<Option<Tensor>> {
            if !vb.contains_tensor(name) {
                return Ok(None);
            }
            let dtype = if name.ends_with("_scales") { DType::F32 } else { DType::U32 };
            Ok(Some(vb.get_unchecked_dtype(name, dtype)?))
        };
        let Some(q) = ipaflux_core::quant::find_packed(lookup, "weight", out, inp)? else {
            return self.upload_linear(&vb.get((out, inp), "weight")?, &vb.get(out, "bias")?, self.format);
        };
        let (b, _) = host_f32(&vb.get(out, "bias")?)?;
        let layer = GpuLinear::from_quantized(&self.ctx, &q, &b)?;
        self.count(layer.bytes());
        Ok(layer)
    }

    fn load_norm(&self, weight: Tensor, bias: Tensor, eps: f64) -> Result<GpuNorm> {
        let (w, _) = host_f32(&weight)?;
        let (b, _) = host_f32(&bias)?;
        self.count(8 * w.len() as u64);
        GpuNorm::new(&self.ctx, &w, &b, eps)
    }

    fn load_tensor(&self, t: Tensor) -> Result<GpuTensor> {
        let (v, dims) = host_f32(&t)?;
        self.count(4 * v.len() as u64);
        GpuTensor::from_slice(&self.ctx, &v, &dims)
    }
}
