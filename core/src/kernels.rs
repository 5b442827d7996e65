//! CPU kernels for the element-wise work around the matmuls: GELU (tanh
//! approximation) and the row softmax. candle's versions call libm's `tanhf`
//! / `expf` per element; here `exp` is a branch-free polynomial that the
//! compiler vectorises, rows run in parallel, and each kernel is one pass.
//!
//! Used for contiguous f32 tensors on the CPU; anything else takes candle's
//! path. Accuracy: `exp` within 2 ulp on [-87, 88] (tested against `f32::exp`),
//! so results agree with PyTorch's to the golden tolerances.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: big enough to amortise scheduling.
const CHUNK: usize = 16 * 1024;

/// `e^x` for f32 by range reduction to `2^n · e^r`, |r| ≤ ln2/2, and a degree-7
/// Taylor polynomial for `e^r` (Cody–Waite split of ln 2). Inputs below −87.3
/// give 0, above 88.7 give `f32::MAX`-range values, never NaN from overflow.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by the 1.5·2^23 trick, which also leaves n in the low
    // mantissa bits: integer ops only, so the loop vectorises (`as i32` would
    // add saturation checks per lane).
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: i32 = 0x4B40_0000;
    let shifted = x * LOG2E + MAGIC;
    let ni = shifted.to_bits() as i32 - MAGIC_BITS;
    let n = shifted - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n built from its exponent bits; n ∈ [-126, 128] after the clamp, split
    // in two factors so 2^128 (x near 88.7) does not overflow the exponent field.
    let half = ni >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((ni - half + 127) as u32) << 23);
    p * a * b
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`,
/// with `tanh(u) = 1 − 2/(e^{2u} + 1)`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + t)
}

/// `x Wᵀ + bias` on the host in f32, as a fused product's epilogue sees it
/// before its activation or residual: `xs` rows of `k`, `ws` PyTorch's
/// `[N, K]`, `bias` `[N]`; row-major `[rows, N]`. For tests that transcribe
/// such products (the Flux mirror, SigLIP's epilogue seam).
#[cfg(test)]
pub(crate) fn host_linear(xs: &[f32], ws: &[f32], bias: &[f32], k: usize) -> Vec<f32> {
    let n = bias.len();
    xs.chunks_exact(k)
        .flat_map(|xr| {
            (0..n).map(move |c| xr.iter().zip(&ws[c * k..(c + 1) * k]).map(|(a, b)| a * b).sum::<f32>() + bias[c])
        })
        .collect()
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    match storage {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!("{op}: input must be f32"))),
    }
}

struct GeluTanhOp;

impl CustomOp1 for GeluTanhOp {
    fn name(&self) -> &'static str {
        "ipaflux-gelu-tanh"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = gelu_tanh(s);
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

struct SoftmaxLastOp;

impl CustomOp1 for SoftmaxLastOp {
    fn name(&self) -> &'static str {
        "ipaflux-softmax-last"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let row = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (CHUNK / row).max(1) * row;
        dst.par_chunks_mut(rows_per_task).zip(src.par_chunks(rows_per_task)).for_each(|(d, s)| {
            for (d, s) in d.chunks_mut(row).zip(s.chunks(row)) {
                softmax_row(s, d);
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

fn softmax_row(src: &[f32], dst: &mut [f32]) {
    // Eight independent lanes so the reductions vectorise (a single running
    // max or sum is a serial dependency chain).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = src.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    for &v in chunks.remainder() {
        max = if v > max { v } else { max };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = exp(s - max);
    }
    let mut sums = [0f32; 8];
    let mut chunks = dst.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in sums.iter_mut().zip(c) {
            *l += v;
        }
    }
    let sum: f32 = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.is_contiguous()
}

/// GELU (tanh approximation) on contiguous f32 CPU tensors; `None` when `x` does not qualify.
pub fn gelu_tanh_f32(x: &Tensor) -> Option<candle_core::Result<Tensor>> {
    fast_path(x).then(|| x.apply_op1_no_bwd(&GeluTanhOp))
}

/// Softmax over the last dimension on contiguous f32 CPU tensors; `None` when `x` does not qualify.
pub fn softmax_last_f32(x: &Tensor) -> Option<candle_core::Result<Tensor>> {
    fast_path(x).then(|| x.apply_op1_no_bwd(&SoftmaxLastOp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(ulps(ours, libm));
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(200.0).is_finite() && exp(200.0) > 1e38);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_and_softmax_match_candle() -> candle_core::Result<()> {
        let x = (Tensor::randn(0f32, 3.0, (7, 333), &Device::Cpu)? * 2.0)?;
        let ours = gelu_tanh_f32(&x).ok_or_else(|| candle_core::Error::Msg("no fast path".into()))??;
        let theirs = x.gelu()?;
        let err = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 2e-6, "gelu max abs err {err}");
        let ours = softmax_last_f32(&x).ok_or_else(|| candle_core::Error::Msg("no fast path".into()))??;
        let theirs = candle_nn::ops::softmax_last_dim(&x)?;
        let err = (ours - theirs)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "softmax max abs err {err}");
        assert!(gelu_tanh_f32(&x.t()?).is_none(), "non-contiguous takes candle's path");
        Ok(())
    }
}
