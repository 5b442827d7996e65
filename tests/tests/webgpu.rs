//! The tiny SigLIP fixture encoded on WebGPU/wgpu (natively: Mesa lavapipe in
//! CI) against the transformers golden output and against candle on the CPU.
//! The model code is core's, run on `WgpuOps`; only the kernels differ.
//!
//! Tolerances (`rel_max_err` of the pooled embedding vs transformers f32):
//! f32 weights ≤ 1e-4; f16 ≤ 5e-3; q8 ≤ 3e-2; q4 ≤ 0.25 (4-bit weights move
//! the output visibly; the figures measured are printed).

use ipaflux::load::load_siglip_dir;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::SiglipVisionModel;
use ipaflux_gpu::{GpuEncoder, WeightFormat};
use ipaflux_tests::*;

fn pixels() -> Tensor {
    let all = ipaflux_core::candle_core::safetensors::load(fixture("pixels_u8.safetensors"), &Device::Cpu).unwrap();
    ((all["photo_jpg"].to_dtype(DType::F32).unwrap() / 127.5).unwrap() - 1.0).unwrap()
}

#[test]
fn pooled_on_webgpu_matches_transformers_in_every_weight_format() {
    let Some(ctx) = ipaflux_gpu::test_context() else { return };
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let gold = &golden()["pooled.photo_jpg"];
    let px = pixels();
    let flat: Vec<f32> = px.flatten_all().unwrap().to_vec1().unwrap();
    for (format, tol) in
        [(WeightFormat::F32, 1e-4), (WeightFormat::F16, 5e-3), (WeightFormat::Q8, 3e-2), (WeightFormat::Q4, 0.25)]
    {
        let store = ipaflux_core::weights::TensorStore::from_safetensors(
            &std::fs::read(fixture("siglip-vision/model.safetensors")).unwrap(),
            "model.safetensors",
        )
        .unwrap();
        let enc = pollster::block_on(GpuEncoder::load(ctx.clone(), &files.config, store, format)).unwrap();
        let pooled = pollster::block_on(enc.pooled(&flat, 1)).unwrap();
        let ours = Tensor::from_vec(pooled, (1, files.config.hidden_size), &Device::Cpu).unwrap();
        let err = rel_max_err(&ours, gold);
        eprintln!(
            "webgpu {format}: rel max err {err:.2e} (tol {tol:.0e}), {} weight bytes on the GPU",
            enc.gpu_bytes()
        );
        assert!(err <= tol, "{format}: {err} > {tol}");
        // What the registry is told before the upload is what the upload made.
        assert_eq!(enc.gpu_bytes(), GpuEncoder::predicted_bytes(&files.config, format), "{format}");
    }
}

#[test]
fn webgpu_and_candle_run_the_same_model_code() {
    let Some(ctx) = ipaflux_gpu::test_context() else { return };
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let bytes = std::fs::read(fixture("siglip-vision/model.safetensors")).unwrap();
    let store = || ipaflux_core::weights::TensorStore::from_safetensors(&bytes, "model.safetensors").unwrap();
    let cpu = SiglipVisionModel::from_store(&files.config, store(), DType::F32, &Device::Cpu).unwrap();
    // Batch of two different images: the batch dimension is handled by both.
    let px = pixels();
    let batch = Tensor::cat(&[&px, &px.flip(&[3]).unwrap()], 0).unwrap();
    let want = cpu.forward(&batch).unwrap();
    let enc = pollster::block_on(GpuEncoder::load(ctx, &files.config, store(), WeightFormat::F32)).unwrap();
    let flat: Vec<f32> = batch.flatten_all().unwrap().to_vec1().unwrap();
    let got = pollster::block_on(enc.pooled(&flat, 2)).unwrap();
    let got = Tensor::from_vec(got, want.dims(), &Device::Cpu).unwrap();
    let err = rel_max_err(&got, &want);
    eprintln!("webgpu vs candle cpu, batch 2: rel max err {err:.2e}");
    assert!(err <= 1e-4, "{err}");
    assert!(rel_max_err(&got.get(0).unwrap(), &got.get(1).unwrap()) > 1e-3, "the two images must differ");
}

#[test]
fn bad_checkpoints_and_pixels_give_the_cpu_paths_messages() {
    let Some(ctx) = ipaflux_gpu::test_context() else { return };
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let bytes = std::fs::read(fixture("siglip-vision/model.safetensors")).unwrap();
    // A truncated file: the same message as natively.
    let cut = ipaflux_core::weights::TensorStore::from_safetensors(&bytes[..bytes.len() / 2], "model.safetensors");
    assert!(cut.unwrap_err().to_string().contains("model.safetensors"));
    // A checkpoint without the pooling head: every missing tensor listed.
    let store = ipaflux_core::weights::TensorStore::from_safetensors(&bytes, "model.safetensors")
        .unwrap()
        .filter_rename(|n| (!n.contains("head.")).then(|| n.to_string()));
    let err = pollster::block_on(GpuEncoder::load(ctx.clone(), &files.config, store, WeightFormat::Q8))
        .unwrap_err()
        .to_string();
    assert!(err.contains("head.probe") && err.contains("head.mlp.fc2.bias"), "{err}");
    let store = ipaflux_core::weights::TensorStore::from_safetensors(&bytes, "model.safetensors").unwrap();
    let enc = pollster::block_on(GpuEncoder::load(ctx, &files.config, store, WeightFormat::F16)).unwrap();
    let err = pollster::block_on(enc.pooled(&[0.0; 12], 1)).unwrap_err().to_string();
    assert!(err.contains("pixel values"), "{err}");
}

/// The fixture quantized as `ipaflux quantize` does it (in memory).
fn quantized_store(format: WeightFormat) -> ipaflux_core::weights::TensorStore {
    use ipaflux_core::siglip::{linear_weights, siglip_tensor_name};
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let store = files.weights.filter_rename(siglip_tensor_name);
    let named: Vec<(&str, &Tensor)> = store.names().map(|n| (n, store.get(n).unwrap().unwrap())).collect();
    let bytes =
        ipaflux_core::quant::quantize_checkpoint(named, &linear_weights(&files.config), format, |_, _| {}).unwrap();
    ipaflux_core::weights::TensorStore::from_safetensors(&bytes, "model.safetensors").unwrap()
}

/// A pre-quantized checkpoint on the GPU gives exactly what quantizing the
/// original at upload gives (same quantizer, weights uploaded as stored), is
/// smaller on the GPU than f32, and refuses another format with a clear message.
#[test]
fn pre_quantized_checkpoints_match_quantizing_at_upload() {
    let Some(ctx) = ipaflux_gpu::test_context() else { return };
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let flat: Vec<f32> = pixels().flatten_all().unwrap().to_vec1().unwrap();
    let original = || {
        ipaflux_core::weights::TensorStore::from_safetensors(
            &std::fs::read(fixture("siglip-vision/model.safetensors")).unwrap(),
            "model.safetensors",
        )
        .unwrap()
    };
    for format in [WeightFormat::F16, WeightFormat::Q8, WeightFormat::Q4] {
        let at_upload = pollster::block_on(GpuEncoder::load(ctx.clone(), &files.config, original(), format)).unwrap();
        let stored =
            pollster::block_on(GpuEncoder::load(ctx.clone(), &files.config, quantized_store(format), format)).unwrap();
        assert_eq!(stored.gpu_bytes(), at_upload.gpu_bytes(), "{format}");
        let a = pollster::block_on(at_upload.pooled(&flat, 1)).unwrap();
        let b = pollster::block_on(stored.pooled(&flat, 1)).unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        eprintln!("pre-quantized {format} vs quantized at upload: max abs diff {diff:e}");
        assert_eq!(a, b, "{format}: the same weights must give the same numbers");
    }
    let err =
        pollster::block_on(GpuEncoder::load(ctx, &files.config, quantized_store(WeightFormat::Q8), WeightFormat::F16))
            .unwrap_err()
            .to_string();
    assert!(err.contains("pre-quantized to q8") && err.contains("load them as q8"), "{err}");
}

/// The CPU path loads a pre-quantized checkpoint by dequantizing it: same
/// numbers as the GPU on those weights, within the format's tolerance of
/// transformers on the original.
#[test]
fn pre_quantized_checkpoints_run_on_the_cpu() {
    let files = load_siglip_dir(&fixture("siglip-vision")).unwrap();
    let gold = &golden()["pooled.photo_jpg"];
    for (format, tol) in [(WeightFormat::Q8, 3e-2), (WeightFormat::Q4, 0.25)] {
        let model =
            SiglipVisionModel::from_store(&files.config, quantized_store(format), DType::F32, &Device::Cpu).unwrap();
        let err = rel_max_err(&model.forward(&pixels()).unwrap(), gold);
        eprintln!("cpu on pre-quantized {format}: rel max err {err:.2e} vs transformers (tol {tol:.0e})");
        assert!(err <= tol && err > 0.0, "{format}: {err}");
        if let Some(ctx) = ipaflux_gpu::test_context() {
            let enc =
                pollster::block_on(GpuEncoder::load(ctx, &files.config, quantized_store(format), format)).unwrap();
            let flat: Vec<f32> = pixels().flatten_all().unwrap().to_vec1().unwrap();
            let gpu = pollster::block_on(enc.pooled(&flat, 1)).unwrap();
            let gpu = Tensor::from_vec(gpu, (1, files.config.hidden_size), &Device::Cpu).unwrap();
            let e = rel_max_err(&gpu, &model.forward(&pixels()).unwrap());
            eprintln!("gpu vs cpu on pre-quantized {format}: rel max err {e:.2e}");
            assert!(e <= 1e-4, "{format}: {e}");
        }
    }
}
