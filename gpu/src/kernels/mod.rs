//! The WGSL kernels, one folder each (`<name>/<name>.wgsl` beside its Rust
//! dispatch code). All take and give f32 activations; weights of
//! [`matmul`] may be f16 or block-quantized. Tests comparing each kernel to
//! candle on the CPU are in `tests.rs` and run on every adapter found.

pub mod attention;
pub mod elementwise;
pub mod layer_norm;
pub mod matmul;
pub mod patchify;

// Native only: in the browser the same checks run from web/tests/browser.rs.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;

/// `(a as u32)`, refusing sizes a kernel cannot index.
pub(crate) fn u32_of(op: &'static str, v: usize) -> crate::Result<u32> {
    u32::try_from(v).map_err(|_| crate::Error::Shape { op, detail: format!("{v} exceeds the 32-bit index range") })
}
