//! Every kernel against candle on the CPU, on random inputs, on the adapter
//! this machine has (Mesa lavapipe in CI). Tolerances (relative max error,
//! `max|a−b| / max|b|`): f32 kernels 1e-4 (only summation order differs);
//! quantized matmuls are compared to candle on the *dequantized* weight (same
//! tolerance), and to the original f32 weight with the format's own bound.

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use ipaflux_core::nn::Activation;
use ipaflux_core::ops::{CandleOps, LoadOps, VisionOps};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::quant::{QuantizedMatrix, WeightFormat};
use crate::{GpuContext, GpuTensor, WgpuOps};

type R = Result<(), Box<dyn std::error::Error>>;

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let peak = b.iter().fold(0.0f32, |m, y| m.max(y.abs()));
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    diff / peak.max(1e-12)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap_or_default()
}

fn read(ctx: &GpuContext, t: &GpuTensor) -> Vec<f32> {
    pollster::block_on(t.to_vec(ctx)).unwrap_or_default()
}

fn setup() -> Option<(Rc<GpuContext>, StdRng)> {
    crate::test_context().map(|c| (c, StdRng::seed_from_u64(7)))
}

const TOL: f32 = 1e-4;

#[test]
fn matmul_matches_candle_in_every_format_and_when_split() -> R {
    let Some((ctx, mut rng)) = setup() else { return Ok(()) };
    // Odd sizes: partial tiles in M, N and K, a partial quantisation block.
    let (b, m, k, n) = (2, 37, 70, 131);
    let x = random(&mut rng, b * m * k, 1.0);
    let w = random(&mut rng, n * k, 0.5);
    let bias = random(&mut rng, n, 0.1);
    let xt = Tensor::from_vec(x.clone(), (b, m, k), &Device::Cpu)?;
    let exact = host(&CandleOps.linear(
        &xt,
        &CandleOps.load_linear(
            Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?,
            Tensor::from_vec(bias.clone(), n, &Device::Cpu)?,
        )?,
    )?);
    // Error of the format itself vs f32 weights, relative to the output's peak.
    let bounds =
        [(WeightFormat::F32, 1e-4), (WeightFormat::F16, 2e-3), (WeightFormat::Q8, 2e-2), (WeightFormat::Q4, 0.2)];
    for (format, bound) in bounds {
        let deq = QuantizedMatrix::new(&w, n, k, format)?.dequantize();
        let wt = Tensor::from_vec(deq, (n, k), &Device::Cpu)?;
        let reference = host(
            &CandleOps.linear(&xt, &CandleOps.load_linear(wt, Tensor::from_vec(bias.clone(), n, &Device::Cpu)?)?)?,
        );
        for max_part in [u64::MAX, format.bytes(40, k)] {
            let layer = super::matmul::GpuLinear::with_max_part_bytes(&ctx, &w, &bias, n, k, format, max_part)?;
            assert_eq!(layer.parts() > 1, max_part != u64::MAX, "{format}: split");
            let gx = GpuTensor::from_slice(&ctx, &x, &[b, m, k])?;
            let y = super::matmul::linear(&ctx, &gx, &layer)?;
            assert_eq!(y.shape(), &[b, m, n]);
            let got = read(&ctx, &y);
            let e = rel_err(&got, &reference);
            assert!(e <= TOL, "{format} (parts {}): {e} vs candle on the dequantized weight", layer.parts());
            let q = rel_err(&got, &exact);
            assert!(q <= bound, "{format}: {q} vs f32 weights, bound {bound}");
        }
    }
    Ok(())
}

#[test]
fn layer_norm_gelu_and_adds_match_candle() -> R {
    let Some((ctx, mut rng)) = setup() else { return Ok(()) };
    let ops = WgpuOps::new(ctx.clone(), WeightFormat::F32);
    let (b, l, c) = (2, 29, 300); // c > 256: several values per invocation
    let x = random(&mut rng, b * l * c, 3.0);
    let (g, beta) = (random(&mut rng, c, 1.0), random(&mut rng, c, 0.5));
    let xt = Tensor::from_vec(x.clone(), (b, l, c), &Device::Cpu)?;
    let gx = GpuTensor::from_slice(&ctx, &x, &[b, l, c])?;
    let to = |v: &Vec<f32>, n| Tensor::from_vec(v.clone(), n, &Device::Cpu);

    let cn = CandleOps.load_norm(to(&g, c)?, to(&beta, c)?, 1e-6)?;
    let gn = ops.load_norm(to(&g, c)?, to(&beta, c)?, 1e-6)?;
    let e = rel_err(&read(&ctx, &ops.layer_norm(&gx, &gn)?), &host(&CandleOps.layer_norm(&xt, &cn)?));
    assert!(e <= TOL, "layer_norm {e}");

    for act in [Activation::GeluTanh, Activation::GeluErf] {
        let e = rel_err(&read(&ctx, &ops.activation(&gx, act)?), &host(&CandleOps.activation(&xt, act)?));
        assert!(e <= TOL, "{act:?} {e}");
    }

    let y = random(&mut rng, b * l * c, 1.0);
    let (yt, gy) = (to(&y, b * l * c)?.reshape((b, l, c))?, GpuTensor::from_slice(&ctx, &y, &[b, l, c])?);
    assert!(rel_err(&read(&ctx, &ops.add(&gx, &gy)?), &host(&(&xt + &yt)?)) <= 1e-6);
    let rows = random(&mut rng, l * c, 1.0);
    let (rt, gr) = (to(&rows, l * c)?.reshape((1, l, c))?, GpuTensor::from_slice(&ctx, &rows, &[1, l, c])?);
    assert!(rel_err(&read(&ctx, &ops.add_rows(&gx, &gr)?), &host(&CandleOps.add_rows(&xt, &rt)?)) <= 1e-6);
    let e = read(&ctx, &ops.expand_batch(&gr, 3)?);
    assert_eq!(e, host(&CandleOps.expand_batch(&rt, 3)?));
    assert!(ops.add(&gx, &gr).is_err(), "add needs equal shapes");
    Ok(())
}

#[test]
fn attention_matches_candle_sdpa() -> R {
    let Some((ctx, mut rng)) = setup() else { return Ok(()) };
    let ops = WgpuOps::new(ctx.clone(), WeightFormat::F32);
    // SigLIP's head size 72 and a pooling-head-like single query; 8 heads of 4.
    for (b, lq, lk, heads, d) in [(1, 100, 100, 2, 72), (2, 1, 77, 3, 72), (1, 65, 33, 8, 4)] {
        let w = heads * d;
        let q = random(&mut rng, b * lq * w, 2.0);
        let k = random(&mut rng, b * lk * w, 2.0);
        let v = random(&mut rng, b * lk * w, 1.0);
        let t = |x: &Vec<f32>, l: usize| Tensor::from_vec(x.clone(), (b, l, w), &Device::Cpu);
        let want = host(&CandleOps.attention(&t(&q, lq)?, &t(&k, lk)?, &t(&v, lk)?, heads)?);
        let g = |x: &Vec<f32>, l: usize| GpuTensor::from_slice(&ctx, x, &[b, l, w]);
        let got = read(&ctx, &ops.attention(&g(&q, lq)?, &g(&k, lk)?, &g(&v, lk)?, heads)?);
        let e = rel_err(&got, &want);
        assert!(e <= TOL, "attention b{b} lq{lq} lk{lk} h{heads} d{d}: {e}");
    }
    Ok(())
}

#[test]
fn patchify_matches_candle_including_ragged_edges() -> R {
    let Some((ctx, mut rng)) = setup() else { return Ok(()) };
    let ops = WgpuOps::new(ctx.clone(), WeightFormat::F32);
    let (b, c, h, w, p) = (2, 3, 30, 44, 14); // 2×3 patches, ragged pixels ignored
    let x = random(&mut rng, b * c * h * w, 1.0);
    let want = host(&CandleOps.patchify(&Tensor::from_vec(x.clone(), (b, c, h, w), &Device::Cpu)?, p)?);
    let got = ops.patchify(&GpuTensor::from_slice(&ctx, &x, &[b, c, h, w])?, p)?;
    assert_eq!(got.shape(), &[b, 6, c * p * p]);
    assert_eq!(read(&ctx, &got), want);
    Ok(())
}

#[test]
fn shape_errors_are_reported_not_dispatched() {
    let Some((ctx, _)) = setup() else { return };
    let ops = WgpuOps::new(ctx.clone(), WeightFormat::F32);
    let x = GpuTensor::from_slice(&ctx, &[0.0; 12], &[1, 3, 4]);
    let Ok(x) = x else { return };
    let w = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)
        .and_then(|w| Ok((w, Tensor::zeros(2, DType::F32, &Device::Cpu)?)));
    let Ok((w, b)) = w else { return };
    let layer = ops.load_linear(w, b);
    assert!(matches!(layer.map(|l| ops.linear(&x, &l)), Ok(Err(crate::Error::Shape { .. }))));
    assert!(ops.attention(&x, &x, &x, 3).is_err(), "4 not divisible by 3 heads");
    assert!(GpuTensor::from_slice(&ctx, &[0.0; 5], &[2, 3]).is_err());
}
