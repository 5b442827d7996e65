//! Linear layers: `y = x·Wᵀ + b` with `W [N, K]` in any [`WeightFormat`].
//!
//! A weight larger than one storage binding allows is split by output rows
//! into parts, each dispatched on its own and writing its column range of
//! `y` (WebGPU's `maxStorageBufferBindingSize` is 128 MiB by default).

use crate::context::{GpuContext, Kernel};
use crate::error::{Error, Result};
use crate::quant::{QuantizedMatrix, WeightFormat};
use crate::tensor::GpuTensor;

use super::u32_of;

const SOURCE: &str = include_str!("matmul.wgsl");
const DIRECT: &str = include_str!("matmul_direct.wgsl");
const FORMATS: &str = include_str!("formats.wgsl");

/// The matmul shader (tiled through workgroup memory, or direct for
/// CPU-emulated adapters) with the `w_at` of `format` appended.
fn source(direct: bool, format: WeightFormat) -> String {
    let marker = format!("//! {}\n", format.name());
    let body =
        FORMATS.split_once(&marker).map(|(_, rest)| rest.split("//! ").next().unwrap_or(rest)).unwrap_or_default();
    format!("{}\n{body}", if direct { DIRECT } else { SOURCE })
}

/// One row range of a weight, in one buffer.
#[derive(Debug)]
struct Part {
    words: wgpu::Buffer,
    scales: Option<wgpu::Buffer>,
    bias: wgpu::Buffer,
    n_offset: usize,
    n: usize,
}

/// A linear layer on the GPU.
#[derive(Debug)]
pub struct GpuLinear {
    parts: Vec<Part>,
    format: WeightFormat,
    n: usize,
    k: usize,
    stride: usize,
    bytes: u64,
}

impl GpuLinear {
    /// Uploads `w [n, k]` (row-major f32) in `format` and `bias [n]`.
    pub fn new(ctx: &GpuContext, w: &[f32], bias: &[f32], n: usize, k: usize, format: WeightFormat) -> Result<Self> {
        Self::with_max_part_bytes(ctx, w, bias, n, k, format, ctx.max_binding())
    }

    /// As [`GpuLinear::new`], splitting the weight into parts of at most
    /// `max_part` bytes (capped by the adapter's binding limit).
    pub fn with_max_part_bytes(
        ctx: &GpuContext,
        w: &[f32],
        bias: &[f32],
        n: usize,
        k: usize,
        format: WeightFormat,
        max_part: u64,
    ) -> Result<Self> {
        let q = QuantizedMatrix::new(w, n, k, format)?;
        Self::from_quantized_with_max_part_bytes(ctx, &q, bias, max_part)
    }

    /// Uploads a weight already in its GPU format (e.g. read from a
    /// pre-quantized checkpoint) and `bias [n]`.
    pub fn from_quantized(ctx: &GpuContext, q: &QuantizedMatrix, bias: &[f32]) -> Result<Self> {
        Self::from_quantized_with_max_part_bytes(ctx, q, bias, ctx.max_binding())
    }

    fn from_quantized_with_max_part_bytes(
        ctx: &GpuContext,
        q: &QuantizedMatrix,
        bias: &[f32],
        max_part: u64,
    ) -> Result<Self> {
        let (n, k) = (q.n, q.k);
        if bias.len() != n {
            return Err(Error::Shape {
                op: "linear",
                detail: format!("bias has {} values for {n} outputs", bias.len()),
            });
        }
        let row_bytes = (q.word_bytes() / n.max(1) as u64).max(1);
        let rows_per_part = usize::try_from(max_part.min(ctx.max_binding()) / row_bytes).unwrap_or(usize::MAX).max(1);
        let mut parts = Vec::new();
        for start in (0..n).step_by(rows_per_part) {
            let len = rows_per_part.min(n - start);
            // One part (the usual case) uploads the matrix as it is, without a copy.
            let split;
            let part = if len == n {
                q
            } else {
                split = q.rows(start, len);
                &split
            };
            let scales = if part.scales.is_empty() {
                None
            } else {
                Some(ctx.upload("linear scales", bytemuck::cast_slice(&part.scales))?)
            };
            let words = ctx.upload("linear weight", &part.words)?;
            let bias = ctx.upload("linear bias", bytemuck::cast_slice(&bias[start..start + len]))?;
            parts.push(Part { words, scales, bias, n_offset: start, n: len });
        }
        let bytes = q.format.bytes(n, k) + 4 * n as u64;
        Ok(Self { parts, format: q.format, n, k, stride: q.stride, bytes })
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes on the GPU (weights, scales, bias).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many buffers the weight was split into.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }
}

/// `x [.., K] → [.., N]`.
pub fn linear(ctx: &GpuContext, x: &GpuTensor, l: &GpuLinear) -> Result<GpuTensor> {
    let k = x.shape.last().copied().unwrap_or(0);
    if k != l.k {
        return Err(Error::Shape { op: "linear", detail: format!("input {:?}, weight [{}, {}]", x.shape, l.n, l.k) });
    }
    let m = x.len() / k.max(1);
    let mut shape = x.shape.clone();
    if let Some(last) = shape.last_mut() {
        *last = l.n;
    }
    let y = GpuTensor::empty(ctx, "linear out", &shape)?;
    let direct = ctx.prefers_direct_kernels();
    let key = format!("matmul-{}-{}", if direct { "direct" } else { "tiled" }, l.format.name());
    let src = source(direct, l.format);
    let kernel = Kernel { key, source: &src, entry: "main" };
    for part in &l.parts {
        let params = [
            u32_of("linear", m)?,
            u32_of("linear", part.n)?,
            u32_of("linear", k)?,
            u32_of("linear", l.stride)?,
            u32_of("linear", l.n)?,
            u32_of("linear", part.n_offset)?,
            u32_of("linear", l.stride / crate::quant::BLOCK)?,
            0,
        ];
        let mut buffers = vec![(1, &x.buffer), (2, &part.words), (4, &part.bias), (5, &y.buffer)];
        if let Some(s) = &part.scales {
            buffers.push((3, s));
        }
        let tile = if direct { 32 } else { 64 };
        let groups = (u32_of("linear", part.n.div_ceil(tile))?, u32_of("linear", m.div_ceil(tile))?, 1);
        ctx.dispatch(&kernel, &params, &buffers, groups);
    }
    Ok(y)
}
