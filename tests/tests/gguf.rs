//! GGUF checkpoints (ComfyUI-GGUF / llama.cpp) against gguf-py reading the
//! same files (tests/reference/make_gguf_fixtures.py): every GGML type we
//! read dequantizes to gguf-py's f32 values exactly (tolerance 0), and the
//! tiny Flux (city96's converter's names) and T5 encoder (llama.cpp's names)
//! load to the same models as their weights given directly.

use std::collections::{BTreeMap, HashMap};

use ipaflux::load::load_flux;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::hooks::Hooks;
use ipaflux_core::flux::sampler::img_ids;
use ipaflux_core::flux::{Conditioning, FluxModel};
use ipaflux_core::weights::ggml::GgmlType;
use ipaflux_core::TensorStore;
use ipaflux_tests::*;

fn load(rel: &str) -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn every_ggml_type_dequantizes_to_gguf_py_values_exactly() {
    let gold = load("gguf/ggml-types.safetensors");
    let store = ipaflux::load::load_store(&fixture("gguf/ggml-types.gguf")).unwrap();
    assert_eq!(store.len(), 13);
    for (name, want) in &gold {
        let got = store.get(name).unwrap().unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (got, want) = (bits(got), bits(want));
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: not the values gguf-py reads from element {first:?} on");
        let quantized = store.ggml_type(name).map(GgmlType::name);
        assert_eq!(quantized.is_some(), !["F32", "F16", "BF16"].contains(&name.as_str()), "{name}");
        assert!(quantized.is_none_or(|q| q == name), "{name} stored as {quantized:?}");
    }
    // The values vary (not all zero or one scale), so equality means something.
    for want in gold.values() {
        let v = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().any(|&x| x > 0.0) && v.iter().any(|&x| x < 0.0));
    }
}

#[test]
fn a_flux_gguf_loads_as_its_dequantized_weights() {
    let path = fixture("flux/flux-tiny-bfl.gguf");
    let gguf = load_flux(&path).unwrap().weights;
    let original = load("flux/flux-tiny-bfl.safetensors");
    let dequantized = load("flux/flux-tiny-bfl-gguf.safetensors");
    // What the file should read as: gguf-py's values for quantized tensors,
    // the original rounded to the stored type (F32 or F16) for the others.
    let mut expected = BTreeMap::new();
    for name in gguf.names() {
        let want = match dequantized.get(name) {
            Some(t) => t.clone(),
            None => original[name].to_dtype(gguf.dtype(name).unwrap()).unwrap(),
        };
        let got = gguf.get(name).unwrap().unwrap();
        assert_eq!((got.dtype(), bits(got)), (want.dtype(), bits(&want)), "{name}");
        expected.insert(name.to_string(), want);
    }
    assert_eq!(expected.len(), original.len());
    let quantized = gguf.names().filter(|n| gguf.ggml_type(n).is_some()).count();
    assert_eq!(quantized, dequantized.len());
    assert!(quantized >= 9, "the fixture quantizes every matrix whose rows are whole blocks");

    let axes = Some(vec![4, 6, 6]);
    let from_gguf = FluxModel::from_store(gguf, axes.clone(), DType::F32, &Device::Cpu).unwrap();
    let direct = TensorStore::from_tensors("expected", expected);
    let direct = FluxModel::from_store(direct, axes, DType::F32, &Device::Cpu).unwrap();
    let g = load("flux/golden.safetensors");
    let cond = Conditioning { txt: g["in.txt"].clone(), y: g["in.y"].clone(), guidance: Some(3.5) };
    let run = |m: &FluxModel| m.forward(&g["in.img"], &img_ids(4, 6), &cond, 0.75, 0, Hooks::new(&[])).unwrap();
    let (a, b) = (run(&from_gguf), run(&direct));
    assert_eq!(bits(&a), bits(&b), "the GGUF model must equal its weights given directly");
    // The quantized weights changed the output (the comparison above is not between two unquantized models).
    assert!(rel_max_err(&a, &g["out.plain"]) > 1e-3);
}

/// The tiny T5 encoder built from `weights` (its own config, not T5-XXL's), and its output for one prompt.
fn t5_output(weights: &TensorStore) -> Tensor {
    let config = std::fs::read_to_string(fixture("pipeline/t5/config.json")).unwrap();
    let tok = std::fs::read(fixture("pipeline/t5/tokenizer.json")).unwrap();
    let mut t5 = ipaflux::text::T5Encoder::new(&config, weights, &tok, 16, DType::F32, &Device::Cpu).unwrap();
    t5.encode("a cat on a sofa, watercolor").unwrap().1
}

#[test]
fn a_llama_cpp_t5_encoder_gguf_loads_under_hugging_face_names() {
    let path = fixture("pipeline/t5-encoder.gguf");
    let tok = fixture("pipeline/t5/tokenizer.json");
    // As `generate --t5 FILE.gguf --t5-tokenizer ...` reads it (with T5-XXL's config, which the tiny weights do not fit).
    let files = ipaflux::load::load_text_encoder(&path, "text_encoder_2", Some(&tok)).unwrap();
    let gold = load("pipeline/t5-encoder-gguf.safetensors");
    let names: std::collections::BTreeSet<&str> = files.weights.names().collect();
    assert_eq!(
        names,
        gold.keys().map(String::as_str).collect(),
        "every llama.cpp name mapped to its Hugging Face name"
    );
    for (name, want) in &gold {
        assert_eq!(bits(files.weights.get(name).unwrap().unwrap()), bits(want), "{name}");
    }
    assert!(files.weights.ggml_type("encoder.block.1.layer.1.DenseReluDense.wo.weight").is_some());

    let from_gguf = t5_output(&files.weights);
    let direct = t5_output(&TensorStore::from_tensors("expected", gold.into_iter().collect()));
    assert_eq!(bits(&from_gguf), bits(&direct), "the GGUF T5 must equal its weights given directly");
    // No closeness check against the f32 model: the tiny random T5 amplifies weight noise
    // (relative noise of 1e-3 on its matrices moved its output by 4 %; Q8_0's is ≈ 4e-3).

    let e = ipaflux::load::load_text_encoder(&fixture("flux/flux-tiny-bfl.gguf"), "text_encoder_2", Some(&tok));
    let e = e.err().unwrap().to_string();
    assert!(e.contains("holds a `flux` model, not T5"), "{e}");
}

#[test]
fn a_flux_gguf_kept_quantized_computes_what_the_dequantized_one_does() {
    use ipaflux_core::flux::{FluxLoad, GgufWeights};
    let g = load("flux/golden.safetensors");
    let cond = Conditioning { txt: g["in.txt"].clone(), y: g["in.y"].clone(), guidance: Some(3.5) };
    for dtype in [DType::F32, DType::BF16] {
        let model = |gguf| {
            let store = load_flux(&fixture("flux/flux-tiny-bfl.gguf")).unwrap().weights;
            let load = FluxLoad { dtype, device: &Device::Cpu, streamed: &[], gguf, loras: &[] };
            FluxModel::from_store_with(store, Some(vec![4, 6, 6]), &load).unwrap().0
        };
        let run = |m: &FluxModel| {
            let x = g["in.img"].to_dtype(dtype).unwrap();
            m.forward(&x, &img_ids(4, 6), &cond, 0.75, 0, Hooks::new(&[])).unwrap()
        };
        let (kept, dequantized) = (run(&model(GgufWeights::Quantized)), run(&model(GgufWeights::Dequantized)));
        assert_eq!(bits(&kept), bits(&dequantized), "{dtype:?}");

        // Streamed blocks arrive dequantized; the resident ones stay quantized.
        use ipaflux_core::flux::{BlockId, HostBlocks};
        let streamed = [BlockId::Double(1), BlockId::Single(0)];
        let store = load_flux(&fixture("flux/flux-tiny-bfl.gguf")).unwrap().weights;
        let load =
            FluxLoad { dtype, device: &Device::Cpu, streamed: &streamed, gguf: GgufWeights::Quantized, loras: &[] };
        let (mut m, host) = FluxModel::from_store_with(store, Some(vec![4, 6, 6]), &load).unwrap();
        assert!(host.values().all(|t| t.dtype() == dtype), "streamed tensors in the model dtype");
        m.set_block_source(std::sync::Arc::new(HostBlocks::new(host, &streamed, &Device::Cpu, &Device::Cpu).unwrap()));
        assert_eq!(bits(&run(&m)), bits(&dequantized), "{dtype:?}, two blocks streamed");
    }
}

#[test]
fn every_quantized_type_kept_as_blocks_dequantizes_to_gguf_py_values_exactly() {
    // candle's dequantization (what a layer kept quantized runs), not ours.
    let gold = load("gguf/ggml-types.safetensors");
    let mut store = ipaflux::load::load_store(&fixture("gguf/ggml-types.gguf")).unwrap();
    let mut seen = 0;
    for (name, want) in &gold {
        let Some(blocks) = store.take_quantized(name, &Device::Cpu).unwrap() else { continue };
        let layer = ipaflux_core::nn::Linear::quantized(blocks, None, DType::F32).unwrap();
        assert!(layer.is_quantized());
        assert_eq!(bits(&layer.weight().unwrap()), bits(want), "{name}");
        let rows = layer.narrow_out(1, 2).unwrap().weight().unwrap();
        assert_eq!(bits(&rows), bits(&want.narrow(0, 1, 2).unwrap()), "{name}, rows 1..3");
        seen += 1;
    }
    assert_eq!(seen, 10, "every quantized type; F32, F16 and BF16 are read as tensors");
    assert!(store.take_quantized("F16", &Device::Cpu).unwrap().is_none());
}
