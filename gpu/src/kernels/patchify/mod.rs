//! The patch embedding's unfold: pixels `[B, C, H, W]` → `[B, gh·gw, C·p·p]`.

use crate::context::{grid, GpuContext, Kernel};
use crate::error::{Error, Result};
use crate::tensor::GpuTensor;

use super::u32_of;

const SOURCE: &str = include_str!("patchify.wgsl");

pub fn patchify(ctx: &GpuContext, x: &GpuTensor, patch: usize) -> Result<GpuTensor> {
    let &[b, c, h, w] = x.shape.as_slice() else {
        return Err(Error::Shape { op: "patchify", detail: format!("pixels {:?}: expected [B, C, H, W]", x.shape) });
    };
    if patch == 0 || h < patch || w < patch {
        return Err(Error::Shape { op: "patchify", detail: format!("pixels {:?} with patch {patch}", x.shape) });
    }
    let (gh, gw) = (h / patch, w / patch);
    let y = GpuTensor::empty(ctx, "patches", &[b, gh * gw, c * patch * patch])?;
    let n = y.len();
    let u = |v: usize| u32_of("patchify", v);
    let params = [u(n)?, u(c)?, u(h)?, u(w)?, u(patch)?, u(gh)?, u(gw)?, 0];
    let kernel = Kernel { key: "patchify".into(), source: SOURCE, entry: "main" };
    ctx.dispatch(&kernel, &params, &[(1, &x.buffer), (2, &y.buffer)], grid(u(n.div_ceil(256))?));
    Ok(y)
}
