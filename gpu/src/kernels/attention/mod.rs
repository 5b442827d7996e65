//! Multi-head softmax attention (no mask), heads packed in the last dimension.

use crate::context::{grid, GpuContext, Kernel};
use crate::error::{Error, Result};
use crate::tensor::GpuTensor;

use super::u32_of;

const SOURCE: &str = include_str!("attention.wgsl");

/// The largest head size the kernel holds per invocation.
pub const MAX_HEAD_DIM: usize = 128;

/// `q [B, Lq, H·D]` over `k, v [B, Lk, H·D]` → `[B, Lq, H·D]`, scale 1/√D.
pub fn attention(ctx: &GpuContext, q: &GpuTensor, k: &GpuTensor, v: &GpuTensor, heads: usize) -> Result<GpuTensor> {
    let bad = |detail: String| Error::Shape { op: "attention", detail };
    let (&[b, lq, w], &[bk, lk, wk]) = (q.shape.as_slice(), k.shape.as_slice()) else {
        return Err(bad(format!("q {:?}, k {:?}: expected [B, L, H·D]", q.shape, k.shape)));
    };
    if bk != b || wk != w || v.shape != k.shape || heads == 0 || w % heads != 0 {
        return Err(bad(format!("q {:?}, k {:?}, v {:?}, {heads} heads", q.shape, k.shape, v.shape)));
    }
    let d = w / heads;
    if d > MAX_HEAD_DIM {
        return Err(bad(format!("head size {d} > {MAX_HEAD_DIM}")));
    }
    let o = GpuTensor::empty(ctx, "attention out", &q.shape)?;
    let q_blocks = lq.div_ceil(64);
    let params = [
        u32_of("attention", b)?,
        u32_of("attention", lq)?,
        u32_of("attention", lk)?,
        u32_of("attention", heads)?,
        u32_of("attention", d)?,
        (1.0 / (d as f32).sqrt()).to_bits(),
        u32_of("attention", q_blocks)?,
        0,
    ];
    let kernel = Kernel { key: "attention".into(), source: SOURCE, entry: "main" };
    ctx.dispatch(
        &kernel,
        &params,
        &[(1, &q.buffer), (2, &k.buffer), (3, &v.buffer), (4, &o.buffer)],
        grid(u32_of("attention", b * heads * q_blocks)?),
    );
    Ok(o)
}
