//! Every kernel against candle on the CPU, on random inputs, on the adapter
//! this machine has (Mesa lavapipe in CI). Tolerances (relative max error,
//! `max|a−b| / max|b|`): f32 kernels 1e-4 (only summation order differs);
//! quantized matmuls are compared to candle on the *dequantized* weight (same
//! tolerance), and to the original f32 weight with the format's own bound.

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use ipaflux_core::ops::{CandleOps, LoadOps, VisionOps};

use crate::quant::{QuantizedMatrix, WeightFormat};
use crate::{GpuContext, GpuTensor, WgpuOps};

type R = Result<(), Box<dyn std::error::Error>>;

use crate::parity::rel_err;

/// A fresh seed per input, so every input differs (the browser's generator, `parity::random`).
struct Seeds(u64);

fn random(seeds: &mut Seeds, n: usize, scale: f32) -> Vec<f32> {
    seeds.0 += 1;
    crate::parity::random(seeds.0, n, scale)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap_or_default()
}

fn read(ctx: &GpuContext, t: &GpuTensor) -> Vec<f32> {
    pollster::block_on(t.to_vec(ctx)).unwrap_or_default()
}

fn setup() -> Option<(Rc<GpuContext>, Seeds)> {
    crate::test_context().map(|c| (c, Seeds(7)))
}

const TOL: f32 = 1e-4;

#[test]
fn split_matmul_matches_candle_in_every_format() -> R {
    let Some((ctx, mut rng)) = setup() else { return Ok(()) };
    // Odd sizes: partial tiles in M, N and K, a partial quantisation block.
    let (b, m, k, n) = (2, 37, 70, 131);
    let x = random(&mut rng, b * m * k, 1.0);
    let w = random(&mut rng, n * k, 0.5);
    let bias = random(&mut rng, n, 0.1);
    let xt = Tensor::from_vec(x.clone(), (b, m, k), &Device::Cpu)?;
    let exact = host(&CandleOps::default().linear(
        &xt,
        &CandleOps::default().load_linear(
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
        let reference =
            host(&CandleOps::default().linear(
                &xt,
                &CandleOps::default().load_linear(wt, Tensor::from_vec(bias.clone(), n, &Device::Cpu)?)?,
            )?);
        for (max_part, direct) in [(u64::MAX, false), (format.bytes(40, k), false), (format.bytes(40, k), true)] {
            ctx.set_direct_kernels(Some(direct));
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
fn every_kernel_matches_candle_with_tiled_and_direct_matmul() {
    let Some((ctx, _)) = setup() else { return };
    for direct in [false, true] {
        ctx.set_direct_kernels(Some(direct));
        let checks = pollster::block_on(crate::parity::check_all(ctx.clone()));
        let checks = checks
            .unwrap_or_else(|e| vec![crate::parity::Check { name: e.to_string(), rel_err: f32::INFINITY, tol: 0.0 }]);
        for c in &checks {
            eprintln!("direct {direct}: {:<40} rel err {:.2e} (tol {:.0e})", c.name, c.rel_err, c.tol);
        }
        assert!(checks.len() >= 16 && checks.iter().all(|c| c.passed()), "direct {direct}: {checks:#?}");
    }
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
