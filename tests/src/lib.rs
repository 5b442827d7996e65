//! # ipaflux-tests
//!
//! Golden parity of ipaflux against the upstream PyTorch code on the tiny
//! fixtures in `tests/fixtures/` (made by `tests/reference/make_fixtures.py`).
//! This library holds the shared helpers: fixture paths and error metrics.

use std::path::PathBuf;

use ipaflux_core::candle_core::{DType, Device, Tensor};

/// f32 tolerance: relative max error (see [`rel_max_err`]).
pub const F32_TOL: f32 = 1e-4;
/// bf16 tolerance: relative max error.
pub const BF16_TOL: f32 = 2e-2;

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// All tensors of `golden.safetensors`.
pub fn golden() -> std::collections::HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("golden.safetensors"), &Device::Cpu).expect("golden fixtures")
}

/// `max |ours − reference| / max |reference|`: the metric all tolerances refer to.
pub fn rel_max_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let a = ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = reference.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    diff / scale
}

/// Asserts `rel_max_err ≤ tol` with a readable message.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let e = rel_max_err(ours, reference);
    assert!(e <= tol, "{what}: relative max error {e:.3e} > tolerance {tol:.0e}");
    eprintln!("{what}: relative max error {e:.3e} (tolerance {tol:.0e})");
}
