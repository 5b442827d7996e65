//! Activations on the GPU: an f32 storage buffer and its shape.

use crate::context::GpuContext;
use crate::error::Result;

/// A row-major f32 tensor in a storage buffer.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) shape: Vec<usize>,
}

impl GpuTensor {
    /// Uploads `data` with `shape`.
    pub fn from_slice(ctx: &GpuContext, data: &[f32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(crate::Error::Shape {
                op: "upload",
                detail: format!("{} values for shape {shape:?}", data.len()),
            });
        }
        let words: &[u32] = bytemuck::cast_slice(data);
        Ok(Self { buffer: ctx.upload("tensor", words)?, shape: shape.to_vec() })
    }

    /// A fresh tensor of `shape` (contents undefined until a kernel writes it).
    pub(crate) fn empty(ctx: &GpuContext, label: &str, shape: &[usize]) -> Result<Self> {
        Ok(Self { buffer: ctx.scratch(label, shape.iter().product())?, shape: shape.to_vec() })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the values back to the host.
    pub async fn to_vec(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.read(&self.buffer, self.len()).await
    }
}
