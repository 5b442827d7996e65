//! [`GpuEncoder`]: core's SigLIP model on [`WgpuOps`], from checkpoint bytes
//! to the pooled embedding.

use std::rc::Rc;

use candle_core::{DType, Device};
use ipaflux_core::config::SiglipVisionConfig;
use ipaflux_core::siglip::{expected_tensors, linear_weights, siglip_tensor_name, SiglipVision};
use ipaflux_core::weights::TensorStore;

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::ops::WgpuOps;
use crate::quant::WeightFormat;
use crate::tensor::GpuTensor;

/// The SigLIP vision tower with its pooling head, on a GPU.
pub struct GpuEncoder {
    ops: WgpuOps,
    model: SiglipVision<WgpuOps>,
}

impl std::fmt::Debug for GpuEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEncoder")
            .field("format", &self.ops.format())
            .field("bytes", &self.ops.loaded_bytes())
            .finish()
    }
}

impl GpuEncoder {
    /// Validates the checkpoint (every problem listed, as on the CPU) and
    /// uploads its weights in `format`. A pre-quantized checkpoint (`ipaflux
    /// quantize`) is uploaded as stored and must be loaded in its own format.
    pub async fn load(
        ctx: Rc<GpuContext>,
        cfg: &SiglipVisionConfig,
        store: TensorStore,
        format: WeightFormat,
    ) -> Result<Self> {
        let store = store.filter_rename(siglip_tensor_name);
        store.validate(&expected_tensors(cfg))?;
        if let Some(stored) = store.quantized_format() {
            if stored != format {
                return Err(Error::FormatMismatch { stored, requested: format });
            }
        }
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let ops = WgpuOps::new(ctx.clone(), format);
        let model = ctx.scoped("uploading the SigLIP weights", || SiglipVision::load(&ops, cfg, vb)).await?;
        tracing::info!(format = %format, bytes = ops.loaded_bytes(), "siglip loaded on webgpu");
        Ok(Self { ops, model })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        self.model.config()
    }

    /// The bytes [`GpuEncoder::load`] will put on the GPU for `cfg` in
    /// `format`, known before any upload (what the memory registry is told):
    /// the named linear layers in `format`, the patch embedding and the
    /// head's `in_proj` in f32, biases, norms and constants in f32.
    pub fn predicted_bytes(cfg: &SiglipVisionConfig, format: WeightFormat) -> u64 {
        let linear: std::collections::BTreeSet<String> = linear_weights(cfg).into_iter().collect();
        expected_tensors(cfg)
            .iter()
            .map(|(name, shape)| match shape.as_slice() {
                [n, k] if linear.contains(name) => format.bytes(*n, *k),
                _ => 4 * shape.iter().product::<usize>() as u64,
            })
            .sum()
    }

    pub fn format(&self) -> WeightFormat {
        self.ops.format()
    }

    /// Bytes of weights on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        self.ops.loaded_bytes()
    }

    pub fn context(&self) -> &GpuContext {
        self.ops.context()
    }

    /// Pixel values `[batch, C, S, S]` (row-major) → pooled embeddings `[batch, hidden]`.
    pub async fn pooled(&self, pixels: &[f32], batch: usize) -> Result<Vec<f32>> {
        let cfg = self.model.config();
        let dims = [batch, cfg.num_channels, cfg.image_size, cfg.image_size];
        self.model.check_pixels(&dims)?;
        if pixels.len() != dims.iter().product::<usize>() {
            return Err(ipaflux_core::Error::Shape(format!(
                "pixel values: {} numbers given, the model takes {dims:?} = {}",
                pixels.len(),
                dims.iter().product::<usize>()
            ))
            .into());
        }
        let ctx = self.ops.context();
        let out = ctx
            .scoped("encoding", || {
                let x = GpuTensor::from_slice(ctx, pixels, &dims)?;
                self.model.pooled(&self.ops, &x)
            })
            .await?;
        out.to_vec(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 is every tensor at 4 bytes; smaller formats shrink only the named
    /// linear layers (so400m: 1634 / 828 / 476 / 275 MiB for f32 / f16 / q8 / q4).
    #[test]
    fn predicted_bytes_follow_the_formats() {
        let cfg = SiglipVisionConfig::so400m_patch14_384();
        let all: u64 = expected_tensors(&cfg).iter().map(|(_, s)| 4 * s.iter().product::<usize>() as u64).sum();
        assert_eq!(GpuEncoder::predicted_bytes(&cfg, WeightFormat::F32), all);
        let mib: Vec<u64> =
            WeightFormat::ALL.iter().map(|f| (GpuEncoder::predicted_bytes(&cfg, *f) + (1 << 19)) >> 20).collect();
        assert_eq!(mib, [1634, 828, 476, 275]);
    }
}
