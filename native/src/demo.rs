//! The bundled demo: a tiny random SigLIP and IP-Adapter in the real
//! checkpoint layouts (the test fixtures), compiled into the binary, encode a
//! bundled sample image. Shows the whole encoder path with no downloads.

use ipaflux_core::{IpAttentionConfig, Precision, PreprocessConfig, SiglipVisionConfig, TensorStore};

use crate::encode::{Encoded, Encoder};
use crate::Result;

const CONFIG: &str = include_str!("../../tests/fixtures/siglip-vision/config.json");
const SIGLIP: &[u8] = include_bytes!("../../tests/fixtures/siglip-vision/model.safetensors");
const ADAPTER: &[u8] = include_bytes!("../../tests/fixtures/ip-adapter.bin");
/// The sample image the demo encodes.
pub const SAMPLE: &[u8] = include_bytes!("../../tests/fixtures/images/photo.jpg");

/// Builds the bundled tiny encoder.
pub fn tiny_encoder(precision: Precision) -> Result<Encoder> {
    let cfg = SiglipVisionConfig::from_hf_json(CONFIG, "bundled siglip config.json")?;
    let siglip = TensorStore::from_safetensors(SIGLIP, "bundled siglip model.safetensors")?;
    let adapter = TensorStore::from_torch_zip(ADAPTER, "bundled ip-adapter.bin")?;
    Encoder::new(
        &cfg,
        PreprocessConfig::siglip(cfg.image_size),
        siglip,
        &adapter,
        precision,
        ipaflux_core::candle_core::Device::Cpu,
    )
}

/// Encodes the bundled sample and computes the IP K/V of every block.
pub fn run(precision: Precision) -> Result<(Encoded, Vec<ipaflux_core::IpKv>, Encoder)> {
    let enc = tiny_encoder(precision)?;
    let out = enc.encode(SAMPLE, "bundled sample photo.jpg")?;
    // The tiny adapter's Flux hidden size is 48: three heads of 16.
    let head_dim = 16;
    let kv = enc
        .adapter
        .kv_all(&out.image_prompt_embeds.to_dtype(enc.dtype)?, &IpAttentionConfig { head_dim, ..Default::default() })?;
    Ok((out, kv, enc))
}
