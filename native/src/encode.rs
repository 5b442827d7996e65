//! The encoder pipeline with per-stage timings: image bytes → pixel values →
//! SigLIP pooled embedding → projected image prompt embeddings. SigLIP with
//! its preprocessing alone ([`ImageEncoder`]) is what both the IP-Adapter
//! (pooled) and FLUX.1 Redux (tokens) read images with.

use std::path::Path;
use std::time::{Duration, Instant};

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::preprocess::{decode_rgb, pixel_values, RgbImage};
use ipaflux_core::{IpAdapter, Precision, PreprocessConfig, SiglipVisionConfig, SiglipVisionModel, TensorStore};

use crate::Result;

/// SigLIP and its preprocessing, ready to read images.
pub struct ImageEncoder {
    pub siglip: SiglipVisionModel,
    pub preprocess: PreprocessConfig,
    pub dtype: DType,
    pub device: Device,
}

impl ImageEncoder {
    pub fn new(
        cfg: &SiglipVisionConfig,
        preprocess: PreprocessConfig,
        weights: TensorStore,
        precision: Precision,
        device: Device,
    ) -> Result<Self> {
        let dtype = precision.dtype();
        let mut siglip = SiglipVisionModel::from_store(cfg, weights, dtype, &device)?;
        siglip.set_attention(crate::attention_for(&device, crate::KernelSet::default()));
        Ok(Self { siglip, preprocess, dtype, device })
    }

    /// Image bytes → pixel values on the encoder's device, in its dtype.
    pub fn pixels(&self, bytes: &[u8], name: &str) -> Result<Tensor> {
        self.pixels_of(&decode_rgb(bytes, name)?, name)
    }

    /// A decoded image → pixel values on the encoder's device, in its dtype.
    pub fn pixels_of(&self, img: &RgbImage, name: &str) -> Result<Tensor> {
        tracing::info!(image = name, width = img.width, height = img.height, "encoding image");
        Ok(pixel_values(img, &self.preprocess)?.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// SigLIP's hidden size: the width of what it gives.
    pub fn hidden_size(&self) -> usize {
        self.siglip.config().hidden_size
    }
}

/// The bytes SigLIP's vision tower takes built by [`ImageEncoder::new`] in
/// `dtype` (a whole SigLIP's text tower, which it does not load, not counted).
pub fn siglip_bytes(cfg: &SiglipVisionConfig, dtype: DType) -> u64 {
    ipaflux_core::weights::loaded_bytes(&ipaflux_core::siglip::expected_tensors(cfg), dtype)
}

/// SigLIP + IP-Adapter, ready to encode images.
pub struct Encoder {
    pub image: ImageEncoder,
    pub adapter: IpAdapter,
}

/// What an encode produced, in f32 on the CPU, with stage timings.
pub struct Encoded {
    pub pooled: Tensor,
    pub image_prompt_embeds: Tensor,
    pub stages: Vec<(&'static str, Duration)>,
}

impl Encoder {
    pub fn new(
        siglip_cfg: &SiglipVisionConfig,
        preprocess: PreprocessConfig,
        siglip_weights: TensorStore,
        adapter_weights: &TensorStore,
        precision: Precision,
        device: Device,
    ) -> Result<Self> {
        let image = ImageEncoder::new(siglip_cfg, preprocess, siglip_weights, precision, device)?;
        let adapter = IpAdapter::from_store(adapter_weights, image.dtype, &image.device)?;
        check_adapter_fits(&adapter, &adapter_weights.source_name, image.hidden_size())?;
        Ok(Self { image, adapter })
    }

    /// Runs every stage and times it.
    pub fn encode(&self, bytes: &[u8], name: &str) -> Result<Encoded> {
        let mut stages = Vec::new();
        let t = Instant::now();
        let img = decode_rgb(bytes, name)?;
        stages.push(("decode", t.elapsed()));
        let t = Instant::now();
        let pixels = self.image.pixels_of(&img, name)?;
        stages.push(("resize+normalize", t.elapsed()));
        let t = Instant::now();
        let pooled = self.image.siglip.forward(&pixels)?;
        stages.push(("siglip", t.elapsed()));
        let t = Instant::now();
        let embeds = self.adapter.image_proj.forward(&pooled)?;
        stages.push(("projection", t.elapsed()));
        Ok(Encoded {
            pooled: pooled.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            image_prompt_embeds: embeds.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            stages,
        })
    }
}

/// An IP-Adapter's projection must take SigLIP's pooled width.
pub fn check_adapter_fits(adapter: &IpAdapter, adapter_name: &str, siglip_hidden: usize) -> Result<()> {
    if adapter.dims.id_dim != siglip_hidden {
        return Err(ipaflux_core::Error::Shape(format!(
            "{adapter_name}: the IP-Adapter expects {}-wide image embeddings but the SigLIP model gives {siglip_hidden}",
            adapter.dims.id_dim
        ))
        .into());
    }
    Ok(())
}

/// Writes `pooled` and `image_prompt_embeds` (f32) to a safetensors file.
pub fn write_embeddings(path: &Path, enc: &Encoded) -> Result<()> {
    let map = std::collections::HashMap::from([
        ("pooled".to_string(), enc.pooled.contiguous()?),
        ("image_prompt_embeds".to_string(), enc.image_prompt_embeds.contiguous()?),
    ]);
    ipaflux_core::candle_core::safetensors::save(&map, path)
        .map_err(|e| crate::Error::Io { path: path.to_path_buf(), reason: e.to_string() })
}
