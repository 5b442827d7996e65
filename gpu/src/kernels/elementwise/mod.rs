//! Elementwise kernels: GELU (tanh and erf), adds with broadcasting, repeat.

use ipaflux_core::nn::Activation;

use crate::context::{grid, GpuContext, Kernel};
use crate::error::{Error, Result};
use crate::tensor::GpuTensor;

use super::u32_of;

const SOURCE: &str = include_str!("elementwise.wgsl");

fn run(
    ctx: &GpuContext,
    entry: &'static str,
    a: &GpuTensor,
    b: Option<&GpuTensor>,
    nb: usize,
    shape: &[usize],
) -> Result<GpuTensor> {
    let y = GpuTensor::empty(ctx, entry, shape)?;
    let n = y.len();
    let params = [u32_of(entry, n)?, u32_of(entry, nb.max(1))?];
    let kernel = Kernel { key: format!("elementwise-{entry}"), source: SOURCE, entry };
    let mut buffers = vec![(1, &a.buffer), (3, &y.buffer)];
    if let Some(b) = b {
        buffers.push((2, &b.buffer));
    }
    ctx.dispatch(&kernel, &params, &buffers, grid(u32_of(entry, n.div_ceil(256))?));
    Ok(y)
}

pub fn activation(ctx: &GpuContext, x: &GpuTensor, act: Activation) -> Result<GpuTensor> {
    let entry = match act {
        Activation::GeluTanh => "gelu_tanh",
        Activation::GeluErf => "gelu_erf",
    };
    run(ctx, entry, x, None, 0, &x.shape)
}

/// `a + b` where `b`'s values repeat over `a` (same shape, or `a`'s trailing dims).
pub fn add(ctx: &GpuContext, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
    let (na, nb) = (a.len(), b.len());
    if nb == 0
        || na % nb != 0
        || !a.shape.ends_with(b.shape.iter().skip_while(|d| **d == 1).copied().collect::<Vec<_>>().as_slice())
    {
        return Err(Error::Shape { op: "add", detail: format!("{:?} + {:?}", a.shape, b.shape) });
    }
    run(ctx, "add_mod", a, Some(b), nb, &a.shape)
}

/// `x [1, ..]` repeated to `[batch, ..]`.
pub fn repeat_batch(ctx: &GpuContext, x: &GpuTensor, batch: usize) -> Result<GpuTensor> {
    if x.shape.first() != Some(&1) {
        return Err(Error::Shape { op: "repeat_batch", detail: format!("{:?} has no batch of 1", x.shape) });
    }
    let mut shape = x.shape.clone();
    shape[0] = batch;
    run(ctx, "repeat", x, None, x.len(), &shape)
}
