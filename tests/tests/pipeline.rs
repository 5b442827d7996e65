//! Text encoders and VAE decoder against transformers / diffusers on tiny
//! random checkpoints (tests/reference/make_pipeline_fixtures.py): token ids
//! exactly, T5 hidden states, CLIP pooled output and VAE decode within
//! relative max error 1e-4 (f32).

use std::collections::HashMap;

use ipaflux::text::{ClipEncoder, T5Encoder};
use ipaflux::vae::VaeDecoder;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::TensorStore;
use ipaflux_tests::*;

fn gold() -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("pipeline/golden.safetensors"), &Device::Cpu).unwrap()
}

fn store(rel: &str) -> TensorStore {
    TensorStore::from_safetensors(&std::fs::read(fixture(rel)).unwrap(), rel).unwrap()
}

fn text(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

const PROMPTS: [&str; 2] =
    ["a cat on a sofa, watercolor", "portrait of an astronaut with a very long prompt that gets truncated here"];

#[test]
fn t5_matches_transformers() {
    let g = gold();
    let tok = std::fs::read(fixture("pipeline/t5/tokenizer.json")).unwrap();
    let mut t5 = T5Encoder::new(
        &text("pipeline/t5/config.json"),
        &store("pipeline/t5/model.safetensors"),
        &tok,
        16,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (i, p) in PROMPTS.iter().enumerate() {
        let (got_ids, out) = t5.encode(p).unwrap();
        assert_eq!(got_ids, ids(&g[&format!("t5.ids.{i}")]), "T5 token ids of {p:?}");
        assert_close(&format!("T5 {i}"), &out, &g[&format!("t5.out.{i}")], F32_TOL);
    }
}

#[test]
fn clip_matches_transformers() {
    let g = gold();
    let tok = std::fs::read(fixture("pipeline/clip/tokenizer.json")).unwrap();
    let clip = ClipEncoder::new(
        &text("pipeline/clip/config.json"),
        &store("pipeline/clip/model.safetensors"),
        &tok,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (i, p) in PROMPTS.iter().enumerate() {
        let (got_ids, pooled) = clip.encode(p).unwrap();
        assert_eq!(got_ids, ids(&g[&format!("clip.ids.{i}")]), "CLIP token ids of {p:?}");
        assert_close(&format!("CLIP pooled {i}"), &pooled, &g[&format!("clip.pooled.{i}")], F32_TOL);
    }
}

#[test]
fn vae_decoder_matches_diffusers() {
    let g = gold();
    let vae = VaeDecoder::new(&store("pipeline/ae.safetensors"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        (vae.cfg.ch, vae.cfg.ch_mult.clone(), vae.cfg.num_res_blocks, vae.cfg.z_channels),
        (32, vec![1, 1, 1, 2], 0, 16)
    );
    assert_close("VAE decode", &vae.decode(&g["vae.latents"]).unwrap(), &g["vae.decoded"], F32_TOL);
}

#[test]
fn a_diffusers_vae_folder_decodes_as_ae_safetensors_does() {
    let g = gold();
    let dir = fixture("pipeline/vae");
    let file = ipaflux::load::vae_file(&dir).unwrap();
    assert!(file.ends_with("vae/diffusion_pytorch_model.safetensors"), "{}", file.display());
    let converted = ipaflux::load::load_vae(&file).unwrap();
    // Every tensor of BFL's decoder, none left over; the encoder (this file's
    // is diffusers' own initialisation) under BFL's names too.
    let bfl = ipaflux::load::load_store(&fixture("pipeline/ae.safetensors")).unwrap();
    let mut names: Vec<&str> = converted.names().filter(|n| n.starts_with("decoder.")).collect();
    let mut want: Vec<&str> = bfl.names().filter(|n| n.starts_with("decoder.")).collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want);
    assert!(converted.names().all(|n| n.starts_with("decoder.") || n.starts_with("encoder.")));
    assert!(converted.contains("encoder.conv_in.weight") && !converted.names().any(|n| n.contains("_blocks.")));
    let vae = VaeDecoder::new(&converted, DType::F32, &Device::Cpu).unwrap();
    let ours = vae.decode(&g["vae.latents"]).unwrap();
    assert_close("diffusers VAE decode", &ours, &g["vae.decoded"], F32_TOL);
    let ae = VaeDecoder::new(&store("pipeline/ae.safetensors"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(rel_max_err(&ours, &ae.decode(&g["vae.latents"]).unwrap()), 0.0, "the two layouts must agree exactly");
    // A diffusers VAE that is not FLUX.1's (another latent scale) is refused by its config.
    let other = std::env::temp_dir().join(format!("ipaflux-sdxl-vae-{}", std::process::id()));
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&file, other.join("diffusion_pytorch_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("0.3611", "0.13025");
    std::fs::write(other.join("config.json"), cfg).unwrap();
    let e = ipaflux::load::vae_file(&other).unwrap_err().to_string();
    assert!(e.contains("scaling_factor") && e.contains("not a FLUX.1 VAE"), "{e}");
}

#[test]
fn wrong_files_give_clear_errors() {
    let tok = std::fs::read(fixture("pipeline/t5/tokenizer.json")).unwrap();
    let e = T5Encoder::new(
        &text("pipeline/t5/config.json"),
        &store("pipeline/ae.safetensors"),
        &tok,
        16,
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not a T5 encoder checkpoint"), "{e}");
    let e =
        VaeDecoder::new(&store("pipeline/t5/model.safetensors"), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("not a Flux VAE"), "{e}");
    let e = ClipEncoder::new(
        &text("pipeline/clip/config.json"),
        &store("pipeline/clip/model.safetensors"),
        b"{}",
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
