//! Benchmark helpers shared by `ipaflux bench --webgpu` (native wgpu vs candle
//! on the CPU) and the browser's bench page (WebGPU vs the wasm CPU path):
//! random weights at the real so400m shapes, and a matmul timer.
//!
//! Timing needs a clock, which core and this crate do not own: callers pass
//! `now_ms` (`Instant` natively, `performance.now()` in the browser).

use candle_core::{Device, Tensor};
use ipaflux_core::config::SiglipVisionConfig;
use ipaflux_core::siglip::expected_tensors;
use ipaflux_core::weights::TensorStore;

use crate::context::GpuContext;
use crate::error::Result;
use crate::parity::random;
use crate::quant::WeightFormat;
use crate::tensor::GpuTensor;

/// so400m-patch14-384 with only `layers` encoder layers (embeddings and the
/// pooling head are whole): the per-layer cost scales to the real 27.
pub fn so400m_with_layers(layers: usize) -> SiglipVisionConfig {
    SiglipVisionConfig { num_hidden_layers: layers, ..SiglipVisionConfig::so400m_patch14_384() }
}

/// Random weights (uniform, ±0.02; LayerNorm weights near 1) for `cfg`, in
/// the checkpoint's own names.
pub fn random_store(cfg: &SiglipVisionConfig) -> Result<TensorStore> {
    let mut store = TensorStore::new("random so400m");
    for (i, (name, shape)) in expected_tensors(cfg).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let scale = if name.contains("norm") && name.ends_with("weight") { 0.0 } else { 0.02 };
        let mut v = random(1000 + i as u64, n, scale);
        if scale == 0.0 {
            v.iter_mut().for_each(|x| *x = 1.0);
        }
        store.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?)?;
    }
    Ok(store)
}

/// Random pixel values for one image of `cfg`.
pub fn random_pixels(cfg: &SiglipVisionConfig) -> Vec<f32> {
    random(7, cfg.num_channels * cfg.image_size * cfg.image_size, 1.0)
}

/// GFLOP/s of the WGSL matmul on `[n, n] · [n, n]ᵀ` in `format`, over `reps`
/// runs after one warm-up (the last readback waits for all of them).
pub async fn matmul_gflops(
    ctx: &GpuContext,
    n: usize,
    format: WeightFormat,
    reps: usize,
    now_ms: impl Fn() -> f64,
) -> Result<f64> {
    let x = GpuTensor::from_slice(ctx, &random(1, n * n, 1.0), &[n, n])?;
    let layer = crate::GpuLinear::new(ctx, &random(2, n * n, 0.05), &vec![0.0; n], n, n, format)?;
    crate::kernels::matmul::linear(ctx, &x, &layer)?.to_vec(ctx).await?;
    let t0 = now_ms();
    let mut last = None;
    for _ in 0..reps.max(1) {
        last = Some(crate::kernels::matmul::linear(ctx, &x, &layer)?);
    }
    if let Some(y) = last {
        y.to_vec(ctx).await?;
    }
    let secs = (now_ms() - t0) / 1000.0;
    Ok(2.0 * (n as f64).powi(3) * reps.max(1) as f64 / secs / 1e9)
}
