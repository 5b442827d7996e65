//! Flux LoRAs against diffusers' own LoRA loading (PEFT layers, unmerged) on
//! the tiny Flux (tests/reference/make_lora_fixtures.py): a kohya/sd-scripts
//! file over BFL's fused layers and a diffusers/PEFT file over the separate
//! Q/K/V projections, each alone and both together, in both checkpoint
//! layouts. Tolerances: f32 relative max error ≤ 1e-4, bf16 ≤ 2e-2.
//! Then the storages that keep a LoRA's factors (fp8, GGUF kept quantized)
//! and streamed blocks against the merged path, exactly.

use std::collections::HashMap;
use std::sync::Arc;

use ipaflux::load::{flux_config, load_flux, load_lora, load_text_encoder};
use ipaflux::text::{ClipEncoder, T5Encoder};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::lora::apply_to_text_encoder;
use ipaflux_core::flux::sampler::img_ids;
use ipaflux_core::flux::{
    BlockId, Conditioning, FluxLoad, FluxLora, FluxModel, GgufWeights, Hooks, HostBlocks, TextEncoder,
};
use ipaflux_core::weights::TensorStore;
use ipaflux_tests::*;

const AXES: [usize; 3] = [4, 6, 6];

fn inputs() -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("flux/golden.safetensors"), &Device::Cpu).unwrap()
}

fn gold() -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("flux/lora-golden.safetensors"), &Device::Cpu).unwrap()
}

fn lora(file: &str, strength: f64) -> FluxLora {
    let cfg = flux_config(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    load_lora(&fixture(file), &cfg, strength).unwrap()
}

fn load(store: TensorStore, dtype: DType, gguf: GgufWeights, streamed: &[BlockId], loras: &[FluxLora]) -> FluxModel {
    let load = FluxLoad { dtype, device: &Device::Cpu, streamed, gguf, loras };
    let (mut model, kept) = FluxModel::from_store_with(store, Some(AXES.to_vec()), &load).unwrap();
    if !streamed.is_empty() {
        model.set_block_source(Arc::new(HostBlocks::new(kept, streamed, &Device::Cpu, &Device::Cpu).unwrap()));
    }
    model
}

fn model(path: &str, dtype: DType, loras: &[FluxLora]) -> FluxModel {
    load(load_flux(&fixture(path)).unwrap().weights, dtype, GgufWeights::Quantized, &[], loras)
}

fn forward(m: &FluxModel, g: &HashMap<String, Tensor>) -> Tensor {
    let cond = Conditioning { txt: g["in.txt"].clone(), y: g["in.y"].clone(), guidance: Some(3.5) };
    m.forward(&g["in.img"], &img_ids(4, 6), &cond, 0.75, 0, Hooks::none()).unwrap()
}

#[test]
fn kohya_and_peft_loras_match_diffusers_alone_and_together_in_both_layouts() {
    let (x, g) = (inputs(), gold());
    let kohya = lora("flux/lora-kohya.safetensors", 0.8);
    let peft = lora("flux/lora-peft.safetensors", 1.0);
    // The kohya file's text-encoder modules are kept for the encoders.
    assert_eq!((kohya.text_encoder_modules(TextEncoder::Clip), kohya.text_encoder_modules(TextEncoder::T5)), (4, 4));
    assert_eq!((peft.text_encoder_modules(TextEncoder::Clip), peft.text_encoder_modules(TextEncoder::T5)), (0, 0));
    assert_eq!((kohya.modules(), peft.modules()), (2 * 7 + 3 * 3 + 7, 2 * 6 + 3 * 4 + 3));
    let cases = [("kohya 0.8", vec![kohya.clone()], "out.kohya_0.8"), ("peft", vec![peft.clone()], "out.peft")];
    let both = ("both", vec![kohya, peft], "out.both");
    for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
        for layout in ["flux/transformer", "flux/flux-tiny-bfl.safetensors"] {
            for (what, loras, key) in cases.iter().chain(std::iter::once(&both)) {
                let out = forward(&model(layout, dtype, loras), &x);
                assert_close(&format!("{dtype:?} {layout} {what}"), &out, &g[*key], tol);
            }
        }
    }
    // Each LoRA must matter at these tolerances, or the test proves nothing.
    let plain = forward(&model("flux/flux-tiny-bfl.safetensors", DType::F32, &[]), &x);
    for key in ["out.kohya_0.8", "out.peft", "out.both"] {
        let change = rel_max_err(&plain, &g[key]);
        println!("{key}: {change:.3e} from no LoRA");
        assert!(change > 5.0 * BF16_TOL, "{key} barely differs from no LoRA");
    }
}

#[test]
fn strength_zero_changes_nothing_and_strength_scales_the_change() {
    let x = inputs();
    let path = "flux/flux-tiny-bfl.safetensors";
    let plain = forward(&model(path, DType::F32, &[]), &x);
    let zero = forward(&model(path, DType::F32, &[lora("flux/lora-kohya.safetensors", 0.0)]), &x);
    assert_eq!(rel_max_err(&zero, &plain), 0.0);
    // Two halves of one LoRA are the LoRA at full strength (up to rounding).
    let half = lora("flux/lora-peft.safetensors", 0.5);
    let full = forward(&model(path, DType::F32, &[lora("flux/lora-peft.safetensors", 1.0)]), &x);
    assert_close("0.5 + 0.5", &forward(&model(path, DType::F32, &[half.clone(), half]), &x), &full, F32_TOL);
}

/// The tiny Flux's tensors as a store, each converted to f32.
fn as_f32(path: &str) -> TensorStore {
    let mut store = load_flux(&fixture(path)).unwrap().weights;
    let names: Vec<String> = store.names().map(str::to_string).collect();
    let map = names.into_iter().map(|n| (n.clone(), store.take(&n).unwrap().unwrap().to_dtype(DType::F32).unwrap()));
    TensorStore::from_tensors(path, map.collect())
}

#[test]
fn fp8_and_gguf_weights_keep_the_factors_and_equal_the_merged_weights_exactly() {
    let x = inputs();
    let loras = [lora("flux/lora-kohya.safetensors", 0.8), lora("flux/lora-peft.safetensors", 1.0)];
    let q = GgufWeights::Quantized;
    // fp8: the LoRA stays beside the fp8 weights, added as each layer upcasts them; the same
    // as merging it into those weights' f32 values.
    let fp8 = "flux/flux-tiny-bfl-fp8.safetensors";
    let kept = load(load_flux(&fixture(fp8)).unwrap().weights, DType::F32, q, &[], &loras);
    let merged = load(as_f32(fp8), DType::F32, q, &[], &loras);
    assert_eq!(rel_max_err(&forward(&kept, &x), &forward(&merged, &x)), 0.0, "fp8");
    // GGUF kept quantized vs dequantized at load, both with the LoRAs; f32 and bf16.
    let gguf = "flux/flux-tiny-bfl.gguf";
    for dtype in [DType::F32, DType::BF16] {
        let kept = load(load_flux(&fixture(gguf)).unwrap().weights, dtype, q, &[], &loras);
        let dense = load(load_flux(&fixture(gguf)).unwrap().weights, dtype, GgufWeights::Dequantized, &[], &loras);
        assert_eq!(rel_max_err(&forward(&kept, &x), &forward(&dense, &x)), 0.0, "GGUF {dtype:?}");
    }
    // And the LoRA is there: without it the output differs.
    let plain = load(load_flux(&fixture(gguf)).unwrap().weights, DType::F32, q, &[], &[]);
    let kept = load(load_flux(&fixture(gguf)).unwrap().weights, DType::F32, q, &[], &loras);
    assert!(rel_max_err(&forward(&plain, &x), &forward(&kept, &x)) > 1e-2);
}

#[test]
fn streamed_blocks_carry_the_lora_merged() {
    let x = inputs();
    let loras = [lora("flux/lora-kohya.safetensors", 0.8)];
    let streamed = [BlockId::Double(1), BlockId::Single(0), BlockId::Single(2)];
    for path in ["flux/flux-tiny-bfl.safetensors", "flux/flux-tiny-bfl-fp8.safetensors", "flux/flux-tiny-bfl.gguf"] {
        let store = || load_flux(&fixture(path)).unwrap().weights;
        let resident = load(store(), DType::F32, GgufWeights::Quantized, &[], &loras);
        let streaming = load(store(), DType::F32, GgufWeights::Quantized, &streamed, &loras);
        assert_eq!(rel_max_err(&forward(&resident, &x), &forward(&streaming, &x)), 0.0, "{path}");
    }
}

#[test]
fn a_lora_for_another_model_or_size_is_refused_with_its_modules_named() {
    // The tiny Flux's LoRA on a Flux of other sizes: FLUX.1-dev's.
    let dev = ipaflux_core::flux::FluxConfig::dev();
    let err = load_lora(&fixture("flux/lora-kohya.safetensors"), &dev, 1.0).unwrap_err().to_string();
    assert!(err.contains("do not fit"), "{err}");
    assert!(err.contains("lora-kohya.safetensors"), "{err}");
    // Not a LoRA at all: the Flux checkpoint itself.
    let cfg = flux_config(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let err = load_lora(&fixture("flux/flux-tiny-bfl.safetensors"), &cfg, 1.0).unwrap_err().to_string();
    assert!(err.contains("not LoRA down/up/alpha tensors"), "{err}");
}

#[test]
fn text_encoder_parts_match_the_merged_encoders() {
    let g = gold();
    let mut kohya = lora("flux/lora-kohya.safetensors", 0.8);
    kohya.text_strength = 0.5;
    let loras = [kohya];
    let prompts =
        ["a cat on a sofa, watercolor", "portrait of an astronaut with a very long prompt that gets truncated here"];
    let t5 = load_text_encoder(&fixture("pipeline/t5"), "text_encoder_2", None).unwrap();
    let weights = apply_to_text_encoder(&loras, TextEncoder::T5, t5.weights).unwrap();
    let mut t5 = T5Encoder::new(&t5.config, &weights, &t5.tokenizer, 16, DType::F32, &Device::Cpu).unwrap();
    let clip = load_text_encoder(&fixture("pipeline/clip"), "text_encoder", None).unwrap();
    let weights = apply_to_text_encoder(&loras, TextEncoder::Clip, clip.weights).unwrap();
    let clip = ClipEncoder::new(&clip.config, &weights, &clip.tokenizer, DType::F32, &Device::Cpu).unwrap();
    let plain: HashMap<String, Tensor> =
        ipaflux_core::candle_core::safetensors::load(fixture("pipeline/golden.safetensors"), &Device::Cpu).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let (_, out) = t5.encode(p).unwrap();
        assert_close(&format!("T5 with LoRA, prompt {i}"), &out, &g[&format!("text.t5.out.{i}")], F32_TOL);
        assert!(rel_max_err(&out, &plain[&format!("t5.out.{i}")]) > 1e-2, "the LoRA barely changes T5");
        let (_, pooled) = clip.encode(p).unwrap();
        assert_close(&format!("CLIP with LoRA, prompt {i}"), &pooled, &g[&format!("text.clip.pooled.{i}")], F32_TOL);
        assert!(rel_max_err(&pooled, &plain[&format!("clip.pooled.{i}")]) > 1e-2, "the LoRA barely changes CLIP");
    }
}

#[test]
fn text_encoder_parts_apply_to_a_gguf_t5_as_to_its_dequantized_weights() {
    let mut kohya = lora("flux/lora-kohya.safetensors", 1.0);
    kohya.text_strength = 0.5;
    let loras = [kohya];
    let tok_path = fixture("pipeline/t5/tokenizer.json");
    let files = load_text_encoder(&fixture("pipeline/t5-encoder.gguf"), "text_encoder_2", Some(&tok_path)).unwrap();
    assert!(files.weights.ggml_type("encoder.block.0.layer.0.SelfAttention.q.weight").is_some(), "a quantized target");
    let dequantized =
        ipaflux_core::candle_core::safetensors::load(fixture("pipeline/t5-encoder-gguf.safetensors"), &Device::Cpu)
            .unwrap();
    let config = std::fs::read_to_string(fixture("pipeline/t5/config.json")).unwrap();
    let tok = std::fs::read(&tok_path).unwrap();
    let run = |weights: TensorStore| {
        let mut t5 = T5Encoder::new(&config, &weights, &tok, 16, DType::F32, &Device::Cpu).unwrap();
        t5.encode("a cat on a sofa, watercolor").unwrap().1
    };
    let direct = || TensorStore::from_tensors("dequantized", dequantized.clone().into_iter().collect());
    let from_gguf = run(apply_to_text_encoder(&loras, TextEncoder::T5, files.weights).unwrap());
    let merged = run(apply_to_text_encoder(&loras, TextEncoder::T5, direct()).unwrap());
    assert_eq!(rel_max_err(&from_gguf, &merged), 0.0);
    assert!(rel_max_err(&from_gguf, &run(direct())) > 1e-2, "the LoRA barely changes the GGUF T5");
}
