//! [`GpuEncoder`]: core's SigLIP model on [`WgpuOps`], from checkpoint bytes
//! to the pooled embedding.

use std::rc::Rc;

use candle_core::{DType, Device};
use ipaflux_core::config::SiglipVisionConfig;
use ipaflux_core::siglip::{expected_tensors, siglip_tensor_name, SiglipVision};
use ipaflux_core::weights::TensorStore;

use crate::context::GpuContext;
use crate::error::Result;
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
    /// uploads its weights in `format`.
    pub async fn load(
        ctx: Rc<GpuContext>,
        cfg: &SiglipVisionConfig,
        store: TensorStore,
        format: WeightFormat,
    ) -> Result<Self> {
        let store = store.filter_rename(siglip_tensor_name);
        store.validate(&expected_tensors(cfg))?;
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let ops = WgpuOps::new(ctx.clone(), format);
        let model = ctx.scoped("uploading the SigLIP weights", || SiglipVision::load(&ops, cfg, vb)).await?;
        tracing::info!(format = %format, bytes = ops.loaded_bytes(), "siglip loaded on webgpu");
        Ok(Self { ops, model })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        self.model.config()
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
