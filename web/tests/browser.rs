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
    store.get("pooled.photo_jpg").unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap()
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

fn message(e: wasm_bindgen::JsError) -> String {
    JsValue::from(e).dyn_into::<js_sys::Error>().unwrap().message().as_string().unwrap()
}

/// The fixture as `ipaflux quantize --format <format>` writes it.
fn quantized_weights(format: ipaflux_core::quant::WeightFormat) -> Vec<u8> {
    use ipaflux_core::siglip::{linear_weights, siglip_tensor_name};
    let cfg = ipaflux_core::SiglipVisionConfig::from_hf_json(CONFIG, "config.json").unwrap();
    let store = ipaflux_core::weights::TensorStore::from_safetensors(WEIGHTS, "model.safetensors")
        .unwrap()
        .filter_rename(siglip_tensor_name);
    let named: Vec<_> = store.names().map(|n| (n, store.get(n).unwrap().unwrap())).collect();
    ipaflux_core::quant::quantize_checkpoint(named, &linear_weights(&cfg), format, |_, _| {}).unwrap()
}

/// A pre-quantized q8 file (smaller download) loads on WebGPU in its own
/// format without being told, and on the CPU fallback (dequantized); both
/// within the q8 tolerance of transformers on the original.
#[wasm_bindgen_test]
async fn pre_quantized_weights_load_on_both_devices() {
    let bytes = quantized_weights(ipaflux_core::quant::WeightFormat::Q8);
    assert!(bytes.len() < WEIGHTS.len());
    let gold = golden_pooled();
    let mut outs = Vec::new();
    for device in ["webgpu", "cpu"] {
        let o = js_sys::Object::new();
        js_sys::Reflect::set(&o, &"device".into(), &device.into()).unwrap();
        let enc = Encoder::create(CONFIG.into(), bytes.clone(), o.into()).await.unwrap();
        let out = enc.encode(IMAGE.to_vec()).await.unwrap();
        assert_eq!(field(&out, "format").as_string().unwrap(), "q8", "{device}");
        let pooled = field(&out, "pooled").dyn_into::<js_sys::Float32Array>().unwrap().to_vec();
        let err = ipaflux_gpu::parity::rel_err(&pooled, &gold);
        assert!(err <= 3e-2, "{device}: {err}");
        outs.push(pooled);
    }
    // Same weights on both devices: same numbers up to f32 rounding.
    assert!(ipaflux_gpu::parity::rel_err(&outs[0], &outs[1]) <= 1e-4);
    // Asked for another format: the native message.
    let err = Encoder::create(CONFIG.into(), bytes, options("webgpu", "f16")).await.err().unwrap();
    assert!(message(err).contains("pre-quantized to q8"));
}

/// The memory registry guards the WebGPU budget: weights past it are refused
/// before any upload with a message naming the device; an encoder that fits
/// is counted at exactly its GPU bytes, and releasing (twice) returns them.
#[wasm_bindgen_test]
async fn the_gpu_budget_is_enforced_by_the_registry() {
    let with_budget = |bytes: f64| {
        let o = js_sys::Object::new();
        js_sys::Reflect::set(&o, &"device".into(), &"webgpu".into()).unwrap();
        js_sys::Reflect::set(&o, &"format".into(), &"f32".into()).unwrap();
        js_sys::Reflect::set(&o, &"gpuBudget".into(), &bytes.into()).unwrap();
        JsValue::from(o)
    };
    let err = Encoder::create(CONFIG.into(), WEIGHTS.to_vec(), with_budget(1000.0)).await.err().unwrap();
    let msg = message(err);
    assert!(msg.contains("more than the") && msg.contains("budget"), "{msg}");
    let mut enc = Encoder::create(CONFIG.into(), WEIGHTS.to_vec(), with_budget(1e6)).await.unwrap();
    let mem: serde_json::Value = serde_wasm_bindgen::from_value(enc.memory().unwrap()).unwrap();
    assert_eq!(mem["placed"].as_f64(), Some(enc.gpu_bytes()), "{mem}");
    assert_eq!(mem["budget"].as_f64(), Some(1e6));
    enc.release();
    enc.release();
    let mem: serde_json::Value = serde_wasm_bindgen::from_value(enc.memory().unwrap()).unwrap();
    assert_eq!(mem["placed"].as_f64(), Some(0.0), "{mem}");
    assert!(enc.encode(IMAGE.to_vec()).await.is_err());
}
