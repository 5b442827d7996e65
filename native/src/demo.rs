//! The bundled demo: the whole pipeline — T5 and CLIP text encoders, SigLIP
//! reference-image encoding, IP-Adapter projection and per-block K/V, Flux
//! sampling with the IP hook, VAE decode — on tiny random models in the real
//! checkpoint layouts (the test fixtures), compiled into the binary. Its PNG is
//! byte-identical from run to run for the default seed.

use ipaflux_core::candle_core::{DType, Device};
use ipaflux_core::flux::ip::IpWeight;
use ipaflux_core::registry::RegistryConfig;
use ipaflux_core::{DeviceSpec, Precision, PreprocessConfig, SiglipVisionConfig, TensorStore, VNorm};

use crate::encode::ImageEncoder;
use crate::generate::{Reference, Settings, Sources, TextFiles};
use crate::load::FluxFiles;
use crate::Result;

const SIGLIP_CONFIG: &str = include_str!("../../tests/fixtures/siglip-vision/config.json");
const SIGLIP: &[u8] = include_bytes!("../../tests/fixtures/siglip-vision/model.safetensors");
const ADAPTER: &[u8] = include_bytes!("../../tests/fixtures/ip-adapter.bin");
const FLUX: &[u8] = include_bytes!("../../tests/fixtures/flux/flux-tiny-bfl.safetensors");
const T5_CONFIG: &str = include_str!("../../tests/fixtures/pipeline/t5/config.json");
const T5: &[u8] = include_bytes!("../../tests/fixtures/pipeline/t5/model.safetensors");
const T5_TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/pipeline/t5/tokenizer.json");
const CLIP_CONFIG: &str = include_str!("../../tests/fixtures/pipeline/clip/config.json");
const CLIP: &[u8] = include_bytes!("../../tests/fixtures/pipeline/clip/model.safetensors");
const CLIP_TOKENIZER: &[u8] = include_bytes!("../../tests/fixtures/pipeline/clip/tokenizer.json");
const VAE: &[u8] = include_bytes!("../../tests/fixtures/pipeline/ae.safetensors");
/// The sample reference image.
pub const SAMPLE: &[u8] = include_bytes!("../../tests/fixtures/images/photo.jpg");
/// The tiny Flux's RoPE axes (head size 16; FLUX.1's are 16, 56, 56 for 128).
const TINY_AXES: [usize; 3] = [4, 6, 6];
/// The tiny Flux's head size.
const TINY_HEAD_DIM: usize = 16;
/// The demo's dtype ([`settings`]), which the registry figures of [`sources`] are for.
const DEMO_DTYPE: DType = DType::F32;

/// Builds the bundled tiny encoder (SigLIP + projection).
pub fn tiny_image_encoder(precision: Precision) -> Result<ImageEncoder> {
    let cfg = SiglipVisionConfig::from_hf_json(SIGLIP_CONFIG, "bundled siglip config.json")?;
    let siglip = TensorStore::from_safetensors(SIGLIP, "bundled siglip model.safetensors")?;
    ImageEncoder::new(&cfg, PreprocessConfig::siglip(cfg.image_size), siglip, precision, Device::Cpu)
}

fn text(config: &'static str, weights: &'static [u8], tokenizer: &'static [u8], name: &str) -> Result<TextFiles> {
    Ok(TextFiles {
        config: config.to_string(),
        weights: TensorStore::from_safetensors(weights, name)?,
        tokenizer: tokenizer.to_vec(),
    })
}

/// Every bundled model, read lazily like files, with the bytes each takes
/// built in the demo's dtype (as `generate`'s figures for files).
pub fn sources() -> Result<Sources> {
    let n = |b: &[u8]| b.len() as u64;
    let t5_bytes = crate::load::text_encoder_bytes(&text(T5_CONFIG, T5, T5_TOKENIZER, "bundled t5")?, DEMO_DTYPE);
    let clip_bytes =
        crate::load::text_encoder_bytes(&text(CLIP_CONFIG, CLIP, CLIP_TOKENIZER, "bundled clip")?, DEMO_DTYPE);
    let siglip_cfg = SiglipVisionConfig::from_hf_json(SIGLIP_CONFIG, "bundled siglip config.json")?;
    let adapter = ipaflux_core::IpAdapterDims::infer(&TensorStore::from_torch_zip(ADAPTER, "bundled ip-adapter.bin")?)?;
    let adapter_bytes = ipaflux_core::weights::loaded_bytes(&adapter.expected_tensors(), DEMO_DTYPE);
    Ok(Sources {
        flux: (
            Box::new(|| {
                Ok(FluxFiles {
                    weights: TensorStore::from_safetensors(FLUX, "bundled flux-tiny-bfl.safetensors")?,
                    axes_dim: Some(TINY_AXES.to_vec()),
                })
            }),
            n(FLUX),
        ),
        t5: (Box::new(|| text(T5_CONFIG, T5, T5_TOKENIZER, "bundled t5")), t5_bytes),
        clip: (Box::new(|| text(CLIP_CONFIG, CLIP, CLIP_TOKENIZER, "bundled clip")), clip_bytes),
        vae: (
            Box::new(|| Ok(TensorStore::from_safetensors(VAE, "bundled ae.safetensors")?)),
            crate::load::vae_half_bytes_in(VAE, crate::load::VaeHalf::Decoder, DEMO_DTYPE).unwrap_or(n(VAE)),
        ),
        vae_encoder_bytes: crate::load::vae_half_bytes_in(VAE, crate::load::VaeHalf::Encoder, DEMO_DTYPE).unwrap_or(0),
        image_encoder: Some((
            Box::new(|| tiny_image_encoder(Precision::F32)),
            crate::encode::siglip_bytes(&siglip_cfg, DEMO_DTYPE),
        )),
        ip_adapter: Some((
            Box::new(|| Ok(TensorStore::from_torch_zip(ADAPTER, "bundled ip-adapter.bin")?)),
            adapter_bytes,
        )),
        ip_is_xlabs: false,
        clip_vision: None,
        redux: None,
        depth: None,
        controlnet: Vec::new(),
        flux_in_channels: 64,
        flux_head_dim: TINY_HEAD_DIM,
        flux_units: crate::load::flux_units_in(&[(FLUX, "bundled flux-tiny-bfl.safetensors".into())])
            .unwrap_or_default(),
        loras: Vec::new(),
    })
}

/// The demo's settings: 128×128, 4 steps, seed 0, f32 on the CPU.
pub fn settings(seed: u64) -> Settings {
    Settings {
        prompt: "a watercolor painting of a cat on a red sofa".into(),
        width: 128,
        height: 128,
        steps: 4,
        guidance: 3.5,
        seed,
        batch: 1,
        dtype: DEMO_DTYPE,
        device: Device::Cpu,
        device_spec: DeviceSpec::Cpu,
        t5_max_len: 16,
        ip_weight: IpWeight::Constant(1.0),
        start_percent: 0.0,
        end_percent: 1.0,
        block_weights: None,
        v_norm: VNorm::InstantX,
        ip_negative: Default::default(),
        registry: RegistryConfig::default(),
        vram_budget: None,
        kernels: crate::KernelSet::default(),
        gguf: ipaflux_core::flux::GgufWeights::default(),
        init: None,
        true_cfg: None,
        kontext: None,
        control: Vec::new(),
        controlnet: Vec::new(),
    }
}

/// The bundled sample as the one reference.
pub fn references() -> Vec<Reference> {
    vec![Reference::Image { bytes: SAMPLE.to_vec(), name: "bundled sample photo.jpg".into(), weight: 1.0 }]
}

#[cfg(test)]
mod tests {
    use ipaflux_core::flux::GgufWeights;
    use ipaflux_core::registry::Op;

    use super::*;

    /// The bundled pipeline with the tiny Flux read from its GGUF fixture.
    fn gguf_sources() -> Sources {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/flux/flux-tiny-bfl.gguf");
        let units = crate::load::flux_units(&path).unwrap();
        let flux: crate::generate::LoadFn<FluxFiles> = Box::new(move || {
            Ok(FluxFiles { weights: crate::load::load_store(&path)?, axes_dim: Some(TINY_AXES.to_vec()) })
        });
        Sources { flux: (flux, 0), flux_units: units, ..sources().unwrap() }
    }

    #[test]
    fn a_gguf_flux_kept_quantized_gives_the_dequantized_pixels_with_fewer_bytes_loaded() {
        let run = |gguf| {
            let s = Settings { width: 64, height: 48, steps: 2, gguf, ..settings(0) };
            crate::generate::generate(&gguf_sources(), &references(), &s, &mut |_| {}).unwrap()
        };
        let (kept, dense) = (run(GgufWeights::Quantized), run(GgufWeights::Dequantized));
        assert_eq!(kept.images[0].rgb, dense.images[0].rgb);
        let flux_bytes = |g: &crate::generate::Generated| {
            g.timeline.iter().filter(|e| e.model == "flux" && e.op == Op::Register).map(|e| e.bytes).sum::<u64>()
        };
        let (k, d) = (flux_bytes(&kept), flux_bytes(&dense));
        assert!(k > 0 && k < d, "Flux registered: {k} B kept quantized, {d} B dequantized");
    }

    /// The demo's registry figures are what its models fetch as they build,
    /// as `generate`'s are for files (`generate::tests`).
    #[test]
    fn the_demo_registers_what_its_models_take() {
        let (src, cpu) = (sources().unwrap(), Device::Cpu);
        let t5 = (src.t5.0)().unwrap();
        crate::text::T5Encoder::new(&t5.config, &t5.weights, &t5.tokenizer, 16, DEMO_DTYPE, &cpu).unwrap();
        assert_eq!(src.t5.1, t5.weights.fetched_bytes(), "T5");
        let clip = (src.clip.0)().unwrap();
        crate::text::ClipEncoder::new(&clip.config, &clip.weights, &clip.tokenizer, DEMO_DTYPE, &cpu).unwrap();
        assert_eq!(src.clip.1, clip.weights.fetched_bytes(), "CLIP");
        let adapter = (src.ip_adapter.as_ref().unwrap().0)().unwrap();
        ipaflux_core::IpAdapter::from_store(&adapter, DEMO_DTYPE, &cpu).unwrap();
        assert_eq!(src.ip_adapter.as_ref().unwrap().1, adapter.fetched_bytes(), "IP-Adapter");
        let cfg = SiglipVisionConfig::from_hf_json(SIGLIP_CONFIG, "config.json").unwrap();
        let weights = TensorStore::from_safetensors(SIGLIP, "siglip").unwrap();
        let preprocess = PreprocessConfig::siglip(cfg.image_size);
        ImageEncoder::new(&cfg, preprocess, weights.clone(), Precision::F32, cpu.clone()).unwrap();
        assert_eq!(src.image_encoder.as_ref().unwrap().1, weights.fetched_bytes(), "SigLIP");
    }
}
