//! LayerNorm over the last dimension (affine), one workgroup per row.

use crate::context::{grid, GpuContext, Kernel};
use crate::error::{Error, Result};
use crate::tensor::GpuTensor;

use super::u32_of;

const SOURCE: &str = include_str!("layer_norm.wgsl");

/// LayerNorm weight, bias and epsilon on the GPU.
#[derive(Debug)]
pub struct GpuNorm {
    pub(crate) weight: wgpu::Buffer,
    pub(crate) bias: wgpu::Buffer,
    pub(crate) dim: usize,
    pub(crate) eps: f32,
}

impl GpuNorm {
    pub fn new(ctx: &GpuContext, weight: &[f32], bias: &[f32], eps: f64) -> Result<Self> {
        if weight.len() != bias.len() {
            return Err(Error::Shape {
                op: "layer_norm",
                detail: format!("weight has {} values, bias {}", weight.len(), bias.len()),
            });
        }
        Ok(Self {
            weight: ctx.upload("norm weight", bytemuck::cast_slice(weight))?,
            bias: ctx.upload("norm bias", bytemuck::cast_slice(bias))?,
            dim: weight.len(),
            eps: eps as f32,
        })
    }
}

pub fn layer_norm(ctx: &GpuContext, x: &GpuTensor, n: &GpuNorm) -> Result<GpuTensor> {
    let cols = x.shape.last().copied().unwrap_or(0);
    if cols != n.dim {
        return Err(Error::Shape { op: "layer_norm", detail: format!("input {:?}, norm over {}", x.shape, n.dim) });
    }
    let rows = x.len() / cols.max(1);
    let y = GpuTensor::empty(ctx, "layer_norm out", &x.shape)?;
    let params = [u32_of("layer_norm", rows)?, u32_of("layer_norm", cols)?, n.eps.to_bits(), 0];
    let kernel = Kernel { key: "layer_norm".into(), source: SOURCE, entry: "main" };
    ctx.dispatch(
        &kernel,
        &params,
        &[(1, &x.buffer), (2, &n.weight), (3, &n.bias), (4, &y.buffer)],
        grid(u32_of("layer_norm", rows)?),
    );
    Ok(y)
}
