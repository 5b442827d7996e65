//! The encoder pipeline with per-stage timings: image bytes → pixel values →
//! SigLIP pooled embedding → projected image prompt embeddings.

use std::path::Path;
use std::time::{Duration, Instant};

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::preprocess::{decode_rgb, pixel_values};
use ipaflux_core::{IpAdapter, Precision, PreprocessConfig, SiglipVisionConfig, SiglipVisionModel, TensorStore};

use crate::Result;

/// SigLIP + IP-Adapter, ready to encode images.
pub struct Encoder {
    pub siglip: SiglipVisionModel,
    pub adapter: IpAdapter,
    pub preprocess: PreprocessConfig,
    pub dtype: DType,
    pub device: Device,
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
        let dtype = precision.dtype();
        let mut siglip = SiglipVisionModel::from_store(siglip_cfg, siglip_weights, dtype, &device)?;
        siglip.set_attention(crate::attention_for(&device, crate::KernelSet::default()));
        let adapter = IpAdapter::from_store(adapter_weights, dtype, &device)?;
        if adapter.dims.id_dim != siglip_cfg.hidden_size {
            return Err(ipaflux_core::Error::Shape(format!(
                "{}: the IP-Adapter expects {}-wide image embeddings but the SigLIP model gives {}",
                adapter_weights.source_name, adapter.dims.id_dim, siglip_cfg.hidden_size
            ))
            .into());
        }
        Ok(Self { siglip, adapter, preprocess, dtype, device })
    }

    /// Runs every stage and times it.
    pub fn encode(&self, bytes: &[u8], name: &str) -> Result<Encoded> {
        let mut stages = Vec::new();
        let t = Instant::now();
        let img = decode_rgb(bytes, name)?;
        stages.push(("decode", t.elapsed()));
        let t = Instant::now();
        let pixels = pixel_values(&img, &self.preprocess)?.to_device(&self.device)?.to_dtype(self.dtype)?;
        stages.push(("resize+normalize", t.elapsed()));
        tracing::info!(image = name, width = img.width, height = img.height, "encoding image");
        let t = Instant::now();
        let pooled = self.siglip.forward(&pixels)?;
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

/// Writes `pooled` and `image_prompt_embeds` (f32) to a safetensors file.
pub fn write_embeddings(path: &Path, enc: &Encoded) -> Result<()> {
    let map = std::collections::HashMap::from([
        ("pooled".to_string(), enc.pooled.contiguous()?),
        ("image_prompt_embeds".to_string(), enc.image_prompt_embeds.contiguous()?),
    ]);
    ipaflux_core::candle_core::safetensors::save(&map, path)
        .map_err(|e| crate::Error::Io { path: path.to_path_buf(), reason: e.to_string() })
}
