//! ipaflux in the browser: the SigLIP image encoder behind a small
//! wasm-bindgen API, on WebGPU when the browser has an adapter and on candle's
//! CPU path (compiled to wasm, simd128) when it does not. The picture never
//! leaves the page: what a native server would receive is the pooled
//! embedding (4.6 KB for so400m) or, with an adapter's projection loaded, the
//! image-prompt embeddings.
//!
//! JS API (see `www/app.js` for a user):
//! - `await Encoder.create(configJson, weights, {device, format, adapter, gpuBudget})`:
//!   `device` is `"auto"` (WebGPU, else CPU), `"webgpu"` or `"cpu"`;
//!   `format` is `f32`, `f16`, `q8` or `q4` (WebGPU only; the CPU runs f32;
//!   default f32, or the file's own format for weights written by `ipaflux
//!   quantize`, which both devices load); `adapter` optionally holds
//!   IP-Adapter bytes for the projection; `gpuBudget` is the bytes of GPU
//!   memory the memory registry may place (default 4 GiB: WebGPU cannot
//!   report free memory) — weights past it are refused before any upload.
//! - `await enc.encode(imageBytes)` → `{pooled: Float32Array, embeds?,
//!   embedsShape?, device, format, timings: {decodeMs, encodeMs, projectMs}}`.
//! - `enc.device`, `enc.gpuBytes`, `enc.memory()` (the registry's view: budget,
//!   placed bytes, events), `enc.release()` (frees the GPU buffers now and
//!   tells the registry; again is harmless).
//! - `webgpuAvailable()`, `selfCheck()` (every kernel vs the CPU),
//!   `plan(scenario, vramGiB)` (the registry's timeline as JSON).
//!
//! Errors become JS exceptions carrying the same messages as the native CLI.
//! What it does not do: fetch or cache files (the page does), run Flux.

use std::rc::Rc;

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::config::{PreprocessConfig, SiglipVisionConfig};
use ipaflux_core::preprocess::{decode_rgb, pixel_values};
use ipaflux_core::registry::{ModelHandle, Registry};
use ipaflux_core::weights::TensorStore;
use ipaflux_core::SiglipVisionModel;
use ipaflux_gpu::{
    reserve_encoder, webgpu_registry, GpuContext, GpuEncoder, GpuOptions, WeightFormat, DEFAULT_WEBGPU_BUDGET,
};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

/// Milliseconds from the page's clock.
fn now_ms() -> f64 {
    js_sys::Date::now()
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// `Encoder.create`'s options (the `adapter` bytes are read apart, as a `Uint8Array`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct CreateOptions {
    device: Option<String>,
    format: Option<String>,
    preprocessor_config: Option<String>,
    gpu_budget: Option<f64>,
}

/// The options object's `adapter` field: absent, or the IP-Adapter file's bytes.
fn adapter_bytes(options: &JsValue) -> Result<Option<Vec<u8>>, JsError> {
    if !options.is_object() {
        return Ok(None);
    }
    let v = js_sys::Reflect::get(options, &"adapter".into()).map_err(|_| JsError::new("options.adapter"))?;
    if v.is_undefined() || v.is_null() {
        return Ok(None);
    }
    v.dyn_into::<js_sys::Uint8Array>()
        .map(|a| Some(a.to_vec()))
        .map_err(|_| JsError::new("options.adapter must be a Uint8Array of the IP-Adapter file's bytes"))
}

enum Backend {
    Gpu(Box<GpuEncoder>),
    Cpu(Box<SiglipVisionModel>),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Timings {
    decode_ms: f64,
    encode_ms: f64,
    project_ms: f64,
}

/// The image encoder (SigLIP + pooling head), optionally with the IP-Adapter's projection.
#[wasm_bindgen]
pub struct Encoder {
    backend: Option<Backend>,
    preprocess: PreprocessConfig,
    projection: Option<ipaflux_core::ip_adapter::MlpProjection>,
    device: String,
    format: WeightFormat,
    /// The memory registry of the WebGPU path (none on the CPU path).
    memory: Option<(Registry, ModelHandle)>,
}

async fn gpu_context() -> Result<Rc<GpuContext>, ipaflux_gpu::Error> {
    GpuContext::new(&GpuOptions::default()).await.map(Rc::new)
}

/// Whether this browser gives us a WebGPU adapter.
#[wasm_bindgen(js_name = webgpuAvailable)]
pub async fn webgpu_available() -> bool {
    gpu_context().await.is_ok()
}

#[wasm_bindgen]
impl Encoder {
    /// Builds an encoder from a SigLIP `config.json` and its safetensors bytes.
    pub async fn create(config_json: String, weights: Vec<u8>, options: JsValue) -> Result<Encoder, JsError> {
        let adapter = adapter_bytes(&options)?;
        let opts: CreateOptions = if options.is_undefined() || options.is_null() {
            CreateOptions::default()
        } else {
            serde_wasm_bindgen::from_value(options)?
        };
        let cfg = SiglipVisionConfig::from_hf_json(&config_json, "config.json").map_err(js_err)?;
        let preprocess = match &opts.preprocessor_config {
            Some(json) => PreprocessConfig::from_hf_json(json, "preprocessor_config.json").map_err(js_err)?,
            None => PreprocessConfig::siglip(cfg.image_size),
        };
        let store = TensorStore::from_safetensors(&weights, "model.safetensors").map_err(js_err)?;
        drop(weights);
        let stored = store.quantized_format();
        let format: WeightFormat = match opts.format.as_deref() {
            Some(name) => name.parse().map_err(js_err)?,
            None => stored.unwrap_or(WeightFormat::F32),
        };
        let want = opts.device.as_deref().unwrap_or("auto");
        let gpu = match want {
            "cpu" => None,
            "webgpu" => Some(gpu_context().await.map_err(js_err)?),
            "auto" => gpu_context().await.ok(),
            other => return Err(JsError::new(&format!("unknown device `{other}`; expected auto, webgpu or cpu"))),
        };
        let (backend, device, format, memory) = match gpu {
            Some(ctx) => {
                let name = format!("webgpu: {}", ctx.adapter());
                let budget = match opts.gpu_budget {
                    Some(b) if b.is_finite() && b >= 0.0 => b as u64,
                    Some(b) => return Err(JsError::new(&format!("gpuBudget must be a number of bytes ≥ 0, not {b}"))),
                    None => DEFAULT_WEBGPU_BUDGET,
                };
                let mut registry = webgpu_registry(budget, ctx.max_binding()).map_err(js_err)?;
                let handle = reserve_encoder(&mut registry, &cfg, format).map_err(js_err)?;
                let enc = match GpuEncoder::load(ctx, &cfg, store, format).await {
                    Ok(enc) => enc,
                    Err(e) => {
                        registry.release(handle);
                        return Err(js_err(e));
                    }
                };
                (Backend::Gpu(Box::new(enc)), name, format, Some((registry, handle)))
            }
            None => {
                let model = SiglipVisionModel::from_store(&cfg, store, DType::F32, &Device::Cpu).map_err(js_err)?;
                // A pre-quantized file runs dequantized: its weights are still the q8/q4 values.
                (Backend::Cpu(Box::new(model)), "cpu (wasm)".to_string(), stored.unwrap_or(WeightFormat::F32), None)
            }
        };
        let projection = match adapter {
            Some(bytes) => Some(load_projection(&bytes).map_err(js_err)?),
            None => None,
        };
        Ok(Encoder { backend: Some(backend), preprocess, projection, device, format, memory })
    }

    /// Encodes image bytes (PNG, JPEG, WebP).
    pub async fn encode(&self, image: Vec<u8>) -> Result<JsValue, JsError> {
        let backend = self.backend.as_ref().ok_or_else(|| JsError::new("this encoder was freed"))?;
        let t0 = now_ms();
        let rgb = decode_rgb(&image, "the image").map_err(js_err)?;
        let pixels = pixel_values(&rgb, &self.preprocess).map_err(js_err)?;
        let t1 = now_ms();
        let pooled: Vec<f32> = match backend {
            Backend::Gpu(enc) => {
                let flat = pixels.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(js_err)?;
                enc.pooled(&flat, 1).await.map_err(js_err)?
            }
            Backend::Cpu(model) => {
                model.forward(&pixels).and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?)).map_err(js_err)?
            }
        };
        let t2 = now_ms();
        let result = js_sys::Object::new();
        let set = |k: &str, v: &JsValue| js_sys::Reflect::set(&result, &k.into(), v).map(|_| ());
        if let Some(proj) = &self.projection {
            let p = Tensor::from_vec(pooled.clone(), (1, pooled.len()), &Device::Cpu).map_err(js_err)?;
            let embeds = proj.forward(&p).map_err(js_err)?;
            let shape: Vec<u32> = embeds.dims().iter().map(|d| *d as u32).collect();
            let flat = embeds.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(js_err)?;
            set("embeds", &js_sys::Float32Array::from(flat.as_slice()).into()).map_err(|_| JsError::new("result"))?;
            set("embedsShape", &serde_wasm_bindgen::to_value(&shape)?).map_err(|_| JsError::new("result"))?;
        }
        let t3 = now_ms();
        let timings = Timings { decode_ms: t1 - t0, encode_ms: t2 - t1, project_ms: t3 - t2 };
        set("pooled", &js_sys::Float32Array::from(pooled.as_slice()).into()).map_err(|_| JsError::new("result"))?;
        set("device", &self.device.clone().into()).map_err(|_| JsError::new("result"))?;
        set("format", &self.format.name().into()).map_err(|_| JsError::new("result"))?;
        set("timings", &serde_wasm_bindgen::to_value(&timings)?).map_err(|_| JsError::new("result"))?;
        Ok(result.into())
    }

    /// Which device runs the encoder, e.g. `webgpu: SwiftShader Device (...)` or `cpu (wasm)`.
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.device.clone()
    }

    /// Bytes of weights on the GPU (0 on the CPU path or once released).
    #[wasm_bindgen(getter, js_name = gpuBytes)]
    pub fn gpu_bytes(&self) -> f64 {
        match &self.backend {
            Some(Backend::Gpu(g)) => g.gpu_bytes() as f64,
            _ => 0.0,
        }
    }

    /// The memory registry's view of the GPU: `{budget, placed, events:
    /// [{stage, op, model, bytes, device, reason}]}` (`null` on the CPU path).
    pub fn memory(&self) -> Result<JsValue, JsError> {
        let Some((registry, _)) = &self.memory else { return Ok(JsValue::NULL) };
        let dev = ipaflux_core::DeviceSpec::WebGpu(0);
        let report = serde_json::json!({
            "budget": registry.usable_bytes(dev),
            "placed": registry.placed_bytes(dev),
            "events": registry.events(),
        });
        Ok(report.serialize(&serde_wasm_bindgen::Serializer::json_compatible())?)
    }

    /// Drops the weights (GPU buffers are destroyed now, not at garbage
    /// collection) and tells the registry; later `encode` calls fail with a
    /// clear message. Releasing twice changes nothing.
    pub fn release(&mut self) {
        self.backend = None;
        self.projection = None;
        if let Some((registry, handle)) = &mut self.memory {
            registry.release(*handle);
        }
    }
}

fn load_projection(bytes: &[u8]) -> ipaflux_core::Result<ipaflux_core::ip_adapter::MlpProjection> {
    let store = if bytes.starts_with(b"PK") {
        TensorStore::from_torch_zip(bytes, "ip-adapter.bin")?
    } else {
        TensorStore::from_safetensors(bytes, "ip-adapter.safetensors")?
    };
    let adapter = ipaflux_core::IpAdapter::from_store(&store, DType::F32, &Device::Cpu)?;
    Ok(adapter.image_proj)
}

/// Runs every WGSL kernel against candle's CPU path on random inputs;
/// resolves to `[{name, relErr, tol, passed}]`.
#[wasm_bindgen(js_name = selfCheck)]
pub async fn self_check() -> Result<JsValue, JsError> {
    let ctx = gpu_context().await.map_err(js_err)?;
    // Both matmul variants: tiled (workgroup memory) and direct.
    let mut checks = Vec::new();
    for direct in [false, true] {
        ctx.set_direct_kernels(Some(direct));
        for mut c in ipaflux_gpu::parity::check_all(ctx.clone()).await.map_err(js_err)? {
            c.name = format!("{} ({})", c.name, if direct { "direct" } else { "tiled" });
            checks.push(c);
        }
    }
    let rows: Vec<serde_json::Value> = checks
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "relErr": c.rel_err, "tol": c.tol, "passed": c.passed()}))
        .collect();
    Ok(serde_wasm_bindgen::to_value(&rows)?)
}

/// The memory registry's plan of a job (a built-in scenario name or scenario
/// JSON) on a device with `vram_gib`: the `ipaflux plan --json` report.
#[wasm_bindgen]
pub fn plan(scenario: &str, vram_gib: f64) -> Result<String, JsError> {
    use ipaflux_core::registry::scenario::{run, PlanOptions, Scenario};
    let s = if scenario.trim_start().starts_with('{') {
        Scenario::from_json("scenario.json", scenario)
    } else {
        Scenario::builtin(scenario)
    }
    .map_err(js_err)?;
    let options = PlanOptions {
        vram_bytes: (vram_gib * (1u64 << 30) as f64) as u64,
        config: Default::default(),
        steps: ipaflux_core::registry::scenario::DEFAULT_STEPS,
    };
    let report = run(&s, &options).map_err(js_err)?;
    serde_json::to_string(&report).map_err(js_err)
}

/// Median milliseconds of one encode at the real so400m shapes with random
/// weights and `layers` of the 27 encoder layers, on `device` (`webgpu` or
/// `cpu`), over `runs` runs after a warm-up. For the bench page.
#[wasm_bindgen(js_name = benchEncoder)]
pub async fn bench_encoder(layers: usize, format: String, device: String, runs: usize) -> Result<f64, JsError> {
    use ipaflux_gpu::bench::{random_pixels, random_store, so400m_with_layers};
    let cfg = so400m_with_layers(layers);
    let store = random_store(&cfg).map_err(js_err)?;
    let px = random_pixels(&cfg);
    let mut times = Vec::new();
    match device.as_str() {
        "webgpu" => {
            let ctx = gpu_context().await.map_err(js_err)?;
            let enc = GpuEncoder::load(ctx, &cfg, store, format.parse().map_err(js_err)?).await.map_err(js_err)?;
            for i in 0..=runs {
                let t = now_ms();
                enc.pooled(&px, 1).await.map_err(js_err)?;
                if i > 0 {
                    times.push(now_ms() - t);
                }
            }
        }
        "cpu" => {
            let model = SiglipVisionModel::from_store(&cfg, store, DType::F32, &Device::Cpu).map_err(js_err)?;
            let x = Tensor::from_vec(px, (1, 3, cfg.image_size, cfg.image_size), &Device::Cpu).map_err(js_err)?;
            for i in 0..=runs {
                let t = now_ms();
                model.forward(&x).map_err(js_err)?;
                if i > 0 {
                    times.push(now_ms() - t);
                }
            }
        }
        other => return Err(JsError::new(&format!("unknown device `{other}`; expected webgpu or cpu"))),
    }
    times.sort_by(f64::total_cmp);
    Ok(times.get(times.len() / 2).copied().unwrap_or(f64::NAN))
}

/// GFLOP/s of the WGSL matmul at `n`³ with weights in `format`.
#[wasm_bindgen(js_name = benchMatmul)]
pub async fn bench_matmul(n: usize, format: String, reps: usize) -> Result<f64, JsError> {
    let ctx = gpu_context().await.map_err(js_err)?;
    ipaflux_gpu::bench::matmul_gflops(&ctx, n, format.parse().map_err(js_err)?, reps, now_ms).await.map_err(js_err)
}

/// GFLOP/s of candle's CPU matmul (wasm) at `n`³, for comparison.
#[wasm_bindgen(js_name = benchCpuMatmul)]
pub fn bench_cpu_matmul(n: usize, reps: usize) -> Result<f64, JsError> {
    let a = Tensor::from_vec(ipaflux_gpu::parity::random(1, n * n, 1.0), (n, n), &Device::Cpu).map_err(js_err)?;
    let t = now_ms();
    for _ in 0..reps.max(1) {
        a.matmul(&a.t().map_err(js_err)?).map_err(js_err)?;
    }
    Ok(2.0 * (n as f64).powi(3) * reps.max(1) as f64 / ((now_ms() - t) / 1e3) / 1e9)
}
