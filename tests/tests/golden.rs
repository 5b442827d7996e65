//! Golden parity against transformers / the InstantX math (see tests/reference/make_fixtures.py).
//! Tolerances: f32 relative max error ≤ 1e-4, bf16 ≤ 2e-2 (metric: `rel_max_err`);
//! pixel values within 2/255 of transformers' SiglipImageProcessor for every format, JPEG
//! included (our JPEG decoder reproduces libjpeg-turbo's output exactly, see tests/jpeg.rs);
//! byte-exact in practice, which the mean bound (0.01/255) holds us to.

use ipaflux::encode::Encoder;
use ipaflux::load::{load_ip_adapter, load_siglip_dir};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::preprocess::{decode_rgb, pixel_values};
use ipaflux_core::{IpAdapter, IpAttentionConfig, Precision, VNorm};
use ipaflux_tests::*;

const IMAGES: [&str; 7] = ["photo.jpg", "wide.png", "alpha.png", "palette.png", "gray.webp", "gray16.png", "rgb16.png"];

fn reference_pixels_u8(name: &str) -> Tensor {
    let all = ipaflux_core::candle_core::safetensors::load(fixture("pixels_u8.safetensors"), &Device::Cpu).unwrap();
    all[&name.replace('.', "_")].clone()
}

fn reference_pixels(name: &str) -> Tensor {
    // Stored as the 8-bit steps the processor produced: p = u8/255·2 − 1 exactly.
    ((reference_pixels_u8(name).to_dtype(DType::F32).unwrap() / 127.5).unwrap() - 1.0).unwrap()
}

fn encoder(layout: &str, adapter: &str, precision: Precision) -> Encoder {
    let files = load_siglip_dir(&fixture(layout)).unwrap();
    let adapter = load_ip_adapter(&fixture(adapter)).unwrap();
    Encoder::new(&files.config, files.preprocess, files.weights, &adapter, precision, Device::Cpu).unwrap()
}

#[test]
fn pixel_values_within_2_of_255_of_transformers() {
    let cfg = ipaflux_core::PreprocessConfig::siglip(384);
    for name in IMAGES {
        let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
        let ours = pixel_values(&decode_rgb(&bytes, name).unwrap(), &cfg).unwrap();
        let ours_u8 = ((ours + 1.0).unwrap() * 127.5).unwrap().round().unwrap();
        let reference = reference_pixels_u8(name).to_dtype(DType::F32).unwrap();
        let diff = (ours_u8 - &reference).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let max = diff.iter().copied().fold(0f32, f32::max);
        let exact = diff.iter().filter(|d| **d == 0.0).count() as f64 / diff.len() as f64;
        eprintln!("{name}: max |Δ| = {max}/255, {:.2}% of values identical", exact * 100.0);
        let mean = diff.iter().sum::<f32>() / diff.len() as f32;
        let (tol, mean_tol) = (2.0, 0.01);
        assert!(max <= tol, "{name}: pixel values differ by {max}/255 (> {tol}/255)");
        assert!(mean <= mean_tol, "{name}: mean difference {mean}/255 (> {mean_tol}/255)");
    }
}

#[test]
fn pooled_matches_transformers_for_both_layouts() {
    let gold = golden();
    for layout in ["siglip-full", "siglip-vision"] {
        let enc = encoder(layout, "ip-adapter.safetensors", Precision::F32);
        for name in IMAGES {
            let pooled = enc.image.siglip.forward(&reference_pixels(name)).unwrap();
            assert_close(
                &format!("{layout} pooled {name}"),
                &pooled,
                &gold[&format!("pooled.{}", name.replace('.', "_"))],
                F32_TOL,
            );
        }
    }
}

#[test]
fn encode_end_to_end_matches_reference_non_square_images() {
    // Whole pipeline from image bytes: PNG/WebP decode identically to Pillow, so
    // pixels are byte-exact and the f32 tolerance holds end to end.
    let gold = golden();
    for (layout, adapter) in [("siglip-full", "ip-adapter.bin"), ("siglip-vision", "ip-adapter.safetensors")] {
        let enc = encoder(layout, adapter, Precision::F32);
        for name in ["wide.png", "alpha.png", "gray.webp"] {
            let bytes = std::fs::read(fixture(&format!("images/{name}"))).unwrap();
            let out = enc.encode(&bytes, name).unwrap();
            assert_close(
                &format!("e2e {layout} {name}"),
                &out.pooled,
                &gold[&format!("pooled.{}", name.replace('.', "_"))],
                F32_TOL,
            );
        }
    }
}

#[test]
fn bf16_pooled_within_tolerance() {
    let gold = golden();
    let enc = encoder("siglip-vision", "ip-adapter.bin", Precision::Bf16);
    let pooled = enc.image.siglip.forward(&reference_pixels("photo.jpg").to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(pooled.dtype(), DType::BF16);
    assert_close("bf16 pooled vs f32 reference", &pooled, &gold["pooled.photo_jpg"], BF16_TOL);
    assert_close("bf16 pooled vs torch bf16", &pooled, &gold["pooled_bf16.photo_jpg"], BF16_TOL);
}

#[test]
fn projection_matches_for_both_adapter_formats_and_dtypes() {
    let gold = golden();
    let pooled = &gold["pooled.photo_jpg"];
    for file in ["ip-adapter.bin", "ip-adapter.safetensors"] {
        let store = load_ip_adapter(&fixture(file)).unwrap();
        for (precision, tol) in [(Precision::F32, F32_TOL), (Precision::Bf16, BF16_TOL), (Precision::F16, BF16_TOL)] {
            let ad = IpAdapter::from_store(&store, precision.dtype(), &Device::Cpu).unwrap();
            let embeds = ad.image_proj.forward(pooled).unwrap();
            assert_close(
                &format!("{file} {precision} image_prompt_embeds"),
                &embeds,
                &gold["image_prompt_embeds.photo_jpg"],
                tol,
            );
        }
    }
}

#[test]
fn dims_are_inferred_from_shapes() {
    let store = load_ip_adapter(&fixture("ip-adapter.bin")).unwrap();
    let d = ipaflux_core::IpAdapterDims::infer(&store).unwrap();
    assert_eq!(
        (d.id_dim, d.proj_hidden, d.num_tokens, d.cross_dim, d.num_processors, d.hidden),
        (32, 64, 8, 64, 5, 48)
    );
}

#[test]
fn ip_kv_and_attention_match_both_variants() {
    let gold = golden();
    let embeds = &gold["image_prompt_embeds.photo_jpg"];
    let q = &gold["query"];
    let store = load_ip_adapter(&fixture("ip-adapter.bin")).unwrap();
    for (precision, tol) in [(Precision::F32, F32_TOL), (Precision::Bf16, BF16_TOL)] {
        let ad = IpAdapter::from_store(&store, precision.dtype(), &Device::Cpu).unwrap();
        for (variant, v_norm) in [("instantx", VNorm::InstantX), ("comfyui", VNorm::ComfyUi)] {
            let kv = ad.kv_all(embeds, &IpAttentionConfig { head_dim: 16, v_norm }).unwrap();
            assert_eq!(kv.len(), 5);
            for (i, kv) in kv.iter().enumerate() {
                assert_close(&format!("{precision} {variant} {i} k"), &kv.k, &gold[&format!("{variant}.{i}.k")], tol);
                assert_close(&format!("{precision} {variant} {i} v"), &kv.v, &gold[&format!("{variant}.{i}.v")], tol);
                let out = kv.attend(q, 0.7).unwrap();
                assert_close(
                    &format!("{precision} {variant} {i} attn"),
                    &out,
                    &gold[&format!("{variant}.{i}.attn")],
                    tol,
                );
            }
        }
    }
    // The variants really differ: V-norm changes the output.
    assert!(rel_max_err(&gold["instantx.0.attn"], &gold["comfyui.0.attn"]) > 1e-2);
}
