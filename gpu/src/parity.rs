//! Every kernel against candle on the CPU, on seeded random inputs: one
//! harness for the native tests (`cargo test`, lavapipe in CI), the browser
//! tests (wasm-bindgen-test in headless Chromium) and the demo page's
//! self-check. Each case is written once over [`LoadOps`], so candle and
//! WebGPU run the very same calls.
//!
//! Tolerances (relative max error `max|a−b| / max|b|` against candle on the
//! same weights): [`F32_TOL`] for every f32 kernel (only summation order
//! differs). Quantized matmuls are compared to candle on the *dequantized*
//! weight (the value the shader computes, so also [`F32_TOL`]) and, with the
//! bound of each format, to the original f32 weight.

use candle_core::{Device, Tensor};
use ipaflux_core::nn::Activation;
use ipaflux_core::ops::{CandleOps, LoadOps, VisionOps};

use crate::context::GpuContext;
use crate::error::Result;
use crate::ops::WgpuOps;
use crate::quant::{QuantizedMatrix, WeightFormat};
use crate::tensor::GpuTensor;

/// Bound for f32 kernels vs candle.
pub const F32_TOL: f32 = 1e-4;

/// One comparison's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub rel_err: f32,
    pub tol: f32,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// Seeded uniform values in ±`scale` (SplitMix64; no RNG crate needed in wasm).
pub fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `max|a−b| / max|b|`; infinite when lengths differ or `a` is not finite.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let diff = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let peak = b.iter().fold(0.0f32, |m, y| m.max(y.abs()));
    diff / peak.max(1e-12)
}

fn t(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// One kernel case, as host tensors.
enum Case {
    Linear { x: Tensor, w: Tensor, b: Tensor },
    Norm { x: Tensor, g: Tensor, b: Tensor },
    Act { x: Tensor, act: Activation },
    Add { x: Tensor, y: Tensor },
    AddRows { x: Tensor, rows: Tensor },
    Attention { q: Tensor, k: Tensor, v: Tensor, heads: usize },
    Patchify { x: Tensor, patch: usize },
}

fn run<O: LoadOps>(ops: &O, case: &Case) -> std::result::Result<O::T, O::Error> {
    match case {
        Case::Linear { x, w, b } => ops.linear(&ops.load_tensor(x.clone())?, &ops.load_linear(w.clone(), b.clone())?),
        Case::Norm { x, g, b } => {
            ops.layer_norm(&ops.load_tensor(x.clone())?, &ops.load_norm(g.clone(), b.clone(), 1e-6)?)
        }
        Case::Act { x, act } => ops.activation(&ops.load_tensor(x.clone())?, *act),
        Case::Add { x, y } => ops.add(&ops.load_tensor(x.clone())?, &ops.load_tensor(y.clone())?),
        Case::AddRows { x, rows } => ops.add_rows(&ops.load_tensor(x.clone())?, &ops.load_tensor(rows.clone())?),
        Case::Attention { q, k, v, heads } => ops.attention(
            &ops.load_tensor(q.clone())?,
            &ops.load_tensor(k.clone())?,
            &ops.load_tensor(v.clone())?,
            *heads,
        ),
        Case::Patchify { x, patch } => ops.patchify(&ops.load_tensor(x.clone())?, *patch),
    }
}

fn cases() -> Result<Vec<(String, Case)>> {
    let mut out = Vec::new();
    // Odd sizes: partial tiles in M, N and K.
    let (bt, m, k, n) = (2, 37, 70, 131);
    out.push((
        "matmul f32".into(),
        Case::Linear {
            x: t(random(1, bt * m * k, 1.0), &[bt, m, k])?,
            w: t(random(2, n * k, 0.5), &[n, k])?,
            b: t(random(3, n, 0.1), &[n])?,
        },
    ));
    let (b, l, c) = (2, 29, 300); // c > 256: several values per invocation
    let x = t(random(4, b * l * c, 3.0), &[b, l, c])?;
    out.push((
        "layer_norm".into(),
        Case::Norm { x: x.clone(), g: t(random(5, c, 1.0), &[c])?, b: t(random(6, c, 0.5), &[c])? },
    ));
    out.push(("gelu_tanh".into(), Case::Act { x: x.clone(), act: Activation::GeluTanh }));
    out.push(("gelu_erf".into(), Case::Act { x: x.clone(), act: Activation::GeluErf }));
    out.push(("add".into(), Case::Add { x: x.clone(), y: t(random(7, b * l * c, 1.0), &[b, l, c])? }));
    out.push(("add_rows".into(), Case::AddRows { x, rows: t(random(8, l * c, 1.0), &[1, l, c])? }));
    // SigLIP's head size 72, the pooling head's single query, many small heads.
    for (i, (b, lq, lk, heads, d)) in
        [(1, 100, 100, 2, 72), (2, 1, 77, 3, 72), (1, 65, 33, 8, 4)].into_iter().enumerate()
    {
        let w = heads * d;
        let s = 10 + 3 * i as u64;
        out.push((
            format!("attention b{b} lq{lq} lk{lk} h{heads} d{d}"),
            Case::Attention {
                q: t(random(s, b * lq * w, 2.0), &[b, lq, w])?,
                k: t(random(s + 1, b * lk * w, 2.0), &[b, lk, w])?,
                v: t(random(s + 2, b * lk * w, 1.0), &[b, lk, w])?,
                heads,
            },
        ));
    }
    let (b, c, h, w, p) = (2, 3, 30, 44, 14); // ragged pixels past the last patch
    out.push(("patchify".into(), Case::Patchify { x: t(random(20, b * c * h * w, 1.0), &[b, c, h, w])?, patch: p }));
    Ok(out)
}

/// Error bound of each weight format vs the f32 weight (relative to the output's peak).
pub fn format_bound(format: WeightFormat) -> f32 {
    match format {
        WeightFormat::F32 => F32_TOL,
        WeightFormat::F16 => 2e-3,
        WeightFormat::Q8 => 2e-2,
        WeightFormat::Q4 => 0.2,
    }
}

/// Runs every case on `ctx` and on candle's CPU, and the matmul in every
/// weight format; returns one [`Check`] per comparison.
pub async fn check_all(ctx: std::rc::Rc<GpuContext>) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let gpu = WgpuOps::new(ctx.clone(), WeightFormat::F32);
    for (name, case) in cases()? {
        let want = run(&CandleOps::default(), &case)?.flatten_all()?.to_vec1::<f32>()?;
        let got = run(&gpu, &case)?.to_vec(&ctx).await?;
        checks.push(Check { name, rel_err: rel_err(&got, &want), tol: F32_TOL });
    }
    let (bt, m, k, n) = (2, 37, 70, 131);
    let (x, w, b) = (random(30, bt * m * k, 1.0), random(31, n * k, 0.5), random(32, n, 0.1));
    let linear = |w: Vec<f32>| -> Result<Vec<f32>> {
        let layer = CandleOps::default().load_linear(t(w, &[n, k])?, t(b.clone(), &[n])?)?;
        Ok(CandleOps::default().linear(&t(x.clone(), &[bt, m, k])?, &layer)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let exact = linear(w.clone())?;
    for format in [WeightFormat::F16, WeightFormat::Q8, WeightFormat::Q4] {
        let reference = linear(QuantizedMatrix::new(&w, n, k, format)?.dequantize())?;
        let layer = crate::GpuLinear::new(&ctx, &w, &b, n, k, format)?;
        let got = crate::kernels::matmul::linear(&ctx, &GpuTensor::from_slice(&ctx, &x, &[bt, m, k])?, &layer)?
            .to_vec(&ctx)
            .await?;
        checks.push(Check {
            name: format!("matmul {format} vs dequantized"),
            rel_err: rel_err(&got, &reference),
            tol: F32_TOL,
        });
        checks.push(Check {
            name: format!("matmul {format} vs f32 weights"),
            rel_err: rel_err(&got, &exact),
            tol: format_bound(format),
        });
    }
    Ok(checks)
}
