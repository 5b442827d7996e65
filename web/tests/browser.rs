//! In headless Chromium (wasm-bindgen-test; `cargo xtask web-test`): every WGSL
//! kernel against candle's CPU path compiled to wasm, and the tiny SigLIP
//! fixture encoded through the public JS API on WebGPU (SwiftShader here) and
//! on the CPU fallback, against the transformers golden output.
//! Tolerances (relative max error): f32 1e-4 on both devices; q8 3e-2.
#![cfg(target_arch = "wasm32")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use ipaflux_web::{self_check, Encoder};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const CONFIG: &str = include_str!("../../tests/fixtures/siglip-vision/config.json");
const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/siglip-vision/model.safetensors");
const IMAGE: &[u8] = include_bytes!("../../tests/fixtures/images/photo.jpg");
const GOLDEN: &[u8] = include_bytes!("../../tests/fixtures/golden.safetensors");

fn golden_pooled() -> Vec<f32> {
    let store = ipaflux_core::weights::TensorStore::from_safetensors(GOLDEN, "golden.safetensors").unwrap();
    store.get("pooled.photo_jpg").unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn field(v: &JsValue, k: &str) -> JsValue {
    js_sys::Reflect::get(v, &k.into()).unwrap()
}

fn options(device: &str, format: &str) -> JsValue {
    let o = js_sys::Object::new();
    js_sys::Reflect::set(&o, &"device".into(), &device.into()).unwrap();
    js_sys::Reflect::set(&o, &"format".into(), &format.into()).unwrap();
    o.into()
}

async fn encode(device: &str, format: &str) -> (Vec<f32>, String) {
    let enc = Encoder::create(CONFIG.into(), WEIGHTS.to_vec(), options(device, format)).await.unwrap();
    let out = enc.encode(IMAGE.to_vec()).await.unwrap();
    let pooled = field(&out, "pooled").dyn_into::<js_sys::Float32Array>().unwrap().to_vec();
    (pooled, field(&out, "device").as_string().unwrap())
}

#[wasm_bindgen_test]
async fn every_kernel_matches_candle_in_the_browser() {
    let rows = self_check().await.unwrap();
    let rows: Vec<serde_json::Value> = serde_wasm_bindgen::from_value(rows).unwrap();
    assert!(rows.len() >= 32);
    for r in &rows {
        assert_eq!(r["passed"], true, "{r}");
    }
}

#[wasm_bindgen_test]
async fn tiny_fixture_on_webgpu_matches_transformers() {
    let gold = golden_pooled();
    for (format, tol) in [("f32", 1e-4), ("q8", 3e-2)] {
        let (pooled, device) = encode("webgpu", format).await;
        assert!(device.starts_with("webgpu"), "{device}");
        let err = ipaflux_gpu::parity::rel_err(&pooled, &gold);
        assert!(err <= tol, "webgpu {format}: {err}");
    }
}

#[wasm_bindgen_test]
async fn tiny_fixture_on_the_cpu_fallback_matches_transformers() {
    let (pooled, device) = encode("cpu", "f32").await;
    assert_eq!(device, "cpu (wasm)");
    let err = ipaflux_gpu::parity::rel_err(&pooled, &golden_pooled());
    assert!(err <= 1e-4, "cpu: {err}");
}

#[wasm_bindgen_test]
async fn bad_input_is_an_exception_with_the_native_message() {
    let enc = Encoder::create(CONFIG.into(), WEIGHTS.to_vec(), options("auto", "f16")).await.unwrap();
    let err = enc.encode(b"not an image at all".to_vec()).await.err().unwrap();
    let msg = JsValue::from(err).dyn_into::<js_sys::Error>().unwrap().message().as_string().unwrap();
    assert!(msg.contains("the image"), "{msg}");
    let cut = Encoder::create(CONFIG.into(), WEIGHTS[..WEIGHTS.len() / 3].to_vec(), options("auto", "f16"))
        .await
        .err()
        .unwrap();
    let msg = JsValue::from(cut).dyn_into::<js_sys::Error>().unwrap().message().as_string().unwrap();
    assert!(msg.contains("model.safetensors"), "{msg}");
    let bad = Encoder::create(CONFIG.into(), WEIGHTS.to_vec(), options("auto", "q5")).await.err().unwrap();
    let msg = JsValue::from(bad).dyn_into::<js_sys::Error>().unwrap().message().as_string().unwrap();
    assert!(msg.contains("q5"), "{msg}");
}
