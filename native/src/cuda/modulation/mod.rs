//! Fused LayerNorm + modulation, gated residuals and bias + GELU-tanh on CUDA
//! ([`modulation.cu`](modulation.cu)) as core's [`FusedModulation`]: bf16/f16
//! activations `[B, L, H]` with per-item rows `[B, 1, H]`, f32 arithmetic,
//! one rounding per output. Other dtypes and devices are declined (`None`)
//! and the model runs candle's separate ops. Checked on the GPU by
//! `ipaflux gpu-check` (the Flux fixture through the whole model against
//! diffusers, and in the benchmarks).

use ipaflux_core::candle_core::backend::BackendStorage;
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::{self as candle, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use ipaflux_core::nn::FusedModulation;

/// The PTX nvcc made of `modulation.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/modulation.ptx"));
const MODULE: &str = "ipaflux_modulation";
/// Threads per block of both kernels.
const THREADS: u32 = 256;
/// Most blocks `gated_add` launches (it loops over the rest).
const MAX_BLOCKS: usize = 132 * 16;

/// The CUDA kernels as core's [`FusedModulation`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaModulation;

/// Whether these kernels take `x [B, L, H]` with rows `r [B, 1, H]` (and `y` like `x`).
fn takes(x: &Tensor, rows: &[&Tensor], y: Option<&Tensor>) -> bool {
    let dtype = x.dtype();
    let Ok((b, _, h)) = x.dims3() else { return false };
    x.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && rows.iter().all(|r| r.dtype() == dtype && r.dims() == [b, 1, h])
        && y.is_none_or(|y| y.dtype() == dtype && y.dims() == x.dims())
}

impl FusedModulation for CudaModulation {
    fn name(&self) -> &'static str {
        "cuda-fused modulation"
    }

    fn ln_modulate(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        eps: f64,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        takes(x, &[scale, shift], None).then(|| {
            let op = Op::LnModulate { eps: eps as f32 };
            Ok(x.contiguous()?.apply_op3_no_bwd(&scale.contiguous()?, &shift.contiguous()?, &op)?)
        })
    }

    fn gelu_tanh(&self, x: &Tensor, bias: Option<&Tensor>) -> Option<ipaflux_core::Result<Tensor>> {
        let dtype = x.dtype();
        let w = x.dims3().ok()?.2;
        let ok = x.device().is_cuda()
            && matches!(dtype, DType::BF16 | DType::F16)
            && bias.is_none_or(|b| b.dtype() == dtype && b.dims() == [w]);
        ok.then(|| {
            // Rows evenly spaced (a narrow of the last dimension is); else made contiguous first.
            let x = if GeluOp::rows_of(x.layout()).is_some() { x.clone() } else { x.contiguous()? };
            let op = GeluOp { has_bias: bias.is_some() };
            let b = match bias {
                Some(b) => b.contiguous()?,
                None => x.clone(), // not read
            };
            Ok(x.apply_op2_no_bwd(&b, &op)?)
        })
    }

    fn gated_add(&self, x: &Tensor, y: &Tensor, gate: &Tensor) -> Option<ipaflux_core::Result<Tensor>> {
        takes(x, &[gate], Some(y))
            .then(|| Ok(x.contiguous()?.apply_op3_no_bwd(&y.contiguous()?, &gate.contiguous()?, &Op::GatedAdd)?))
    }
}

enum Op {
    /// Inputs x, scale, shift.
    LnModulate { eps: f32 },
    /// Inputs x, y, gate.
    GatedAdd,
}

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle::Error {
    candle::Error::Cuda(Box::new(e))
}

fn slice<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle::Result<ipaflux_core::candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle::Error::Msg("fused modulation needs contiguous inputs".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

impl Op {
    fn launch<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        dev: &CudaDevice,
        (a, la): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
        (c, lc): (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let (items, len, h) = la.shape().dims3()?;
        let n = items * len * h;
        let (a, b, c) = (slice::<T>(a, la)?, slice::<T>(b, lb)?, slice::<T>(c, lc)?);
        let suffix = if T::DTYPE == DType::F16 { "f16" } else { "bf16" };
        let to_i32 =
            |x: usize| i32::try_from(x).map_err(|_| candle::Error::Msg("fused modulation: size over i32".into()));
        // SAFETY: every element is written by the kernel (one block per row / a grid-stride loop over all n).
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n) }?;
        match self {
            Op::LnModulate { eps } => {
                let func = dev.get_or_load_custom_func(&format!("ipaflux_ln_modulate_{suffix}"), MODULE, PTX)?;
                let rows =
                    u32::try_from(items * len).map_err(|_| candle::Error::Msg("fused modulation: rows".into()))?;
                let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                let (h, per_item) = (to_i32(h)?, to_i32(len)?);
                let mut builder = func.builder();
                builder.arg(&a).arg(&b).arg(&c).arg(&out).arg(&h).arg(&per_item).arg(eps);
                // SAFETY: arguments match `ipaflux_ln_modulate_*` in modulation.cu; x and out hold
                // B·L·H elements, scale and shift B·H (shapes checked by `takes`), one block per row.
                unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
            }
            Op::GatedAdd => {
                let func = dev.get_or_load_custom_func(&format!("ipaflux_gated_add_{suffix}"), MODULE, PTX)?;
                let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
                let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                let (hh, per_item) = (to_i32(h)?, len * h);
                let mut builder = func.builder();
                builder.arg(&a).arg(&b).arg(&c).arg(&out).arg(&n).arg(&hh).arg(&per_item);
                // SAFETY: arguments match `ipaflux_gated_add_*`; x, y and out hold n = B·L·H elements,
                // gate B·H (checked by `takes`); the loop stays below n.
                unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), la.shape().clone()))
    }
}

/// GELU-tanh of `x (+ bias)`; `x` rows may be strided (module docs).
struct GeluOp {
    has_bias: bool,
}

impl GeluOp {
    /// (rows, width, row stride, first element) when `x [B, L, W]` is rows of
    /// W contiguous elements at a constant stride.
    fn rows_of(l: &Layout) -> Option<(usize, usize, usize, usize)> {
        let (b, len, w) = l.shape().dims3().ok()?;
        let st = l.stride();
        let even = st[2] == 1 && (b == 1 || st[0] == len * st[1]) && (len == 1 || st[1] >= w);
        even.then_some((b * len, w, if len == 1 { w } else { st[1] }, l.start_offset()))
    }

    fn launch<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        dev: &CudaDevice,
        (x, lx): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let (rows, w, stride, start) =
            Self::rows_of(lx).ok_or_else(|| candle::Error::Msg("fused GELU: rows are not evenly strided".into()))?;
        let end = start + (rows.max(1) - 1) * stride + w;
        let x = x.as_cuda_slice::<T>()?.slice(start..end);
        let b = if self.has_bias { slice::<T>(b, lb)? } else { x.slice(0..) };
        let suffix = if T::DTYPE == DType::F16 { "f16" } else { "bf16" };
        let func = dev.get_or_load_custom_func(&format!("ipaflux_gelu_tanh_{suffix}"), MODULE, PTX)?;
        let n = rows * w;
        // SAFETY: the kernel writes all n elements (grid-stride loop below n).
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n) }?;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let w32 = i32::try_from(w).map_err(|_| candle::Error::Msg("fused GELU: width over i32".into()))?;
        let has_bias = i32::from(self.has_bias);
        let mut builder = func.builder();
        builder.arg(&x).arg(&b).arg(&out).arg(&rows).arg(&w32).arg(&stride).arg(&has_bias);
        // SAFETY: arguments match `ipaflux_gelu_tanh_*`; x covers rows × stride (last row W),
        // bias W elements when read (checked shape), out n elements.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), lx.shape().clone()))
    }
}

impl candle::CustomOp2 for GeluOp {
    fn name(&self) -> &'static str {
        "ipaflux-gelu-tanh"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        Err(candle::Error::Msg("the fused GELU runs on CUDA only; the CPU uses the reference ops".into()))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        match x.dtype() {
            DType::BF16 => self.launch::<half::bf16>(&dev, (x, lx), (b, lb)),
            DType::F16 => self.launch::<half::f16>(&dev, (x, lx), (b, lb)),
            other => Err(candle::Error::Msg(format!("the fused GELU takes bf16 or f16, not {other:?}"))),
        }
    }
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        match self {
            Op::LnModulate { .. } => "ipaflux-ln-modulate",
            Op::GatedAdd => "ipaflux-gated-add",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        Err(candle::Error::Msg("the fused modulation runs on CUDA only; the CPU uses the reference ops".into()))
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        c: &CudaStorage,
        lc: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = a.device().clone();
        match a.dtype() {
            DType::BF16 => self.launch::<half::bf16>(&dev, (a, la), (b, lb), (c, lc)),
            DType::F16 => self.launch::<half::f16>(&dev, (a, la), (b, lb), (c, lc)),
            other => Err(candle::Error::Msg(format!("the fused modulation takes bf16 or f16, not {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_in_the_ptx() {
        for k in ["ln_modulate", "gated_add", "gelu_tanh"] {
            for t in ["bf16", "f16"] {
                assert!(PTX.contains(&format!(".entry ipaflux_{k}_{t}(")), "ipaflux_{k}_{t} missing");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_take() {
        let cpu = candle::Device::Cpu;
        let x = Tensor::zeros((1, 4, 8), DType::BF16, &cpu).unwrap();
        let r = Tensor::zeros((1, 1, 8), DType::BF16, &cpu).unwrap();
        // CPU tensors: the reference ops run instead.
        assert!(CudaModulation.ln_modulate(&x, &r, &r, 1e-6).is_none());
        assert!(CudaModulation.gated_add(&x, &x, &r).is_none());
        assert!(CudaModulation.gelu_tanh(&x, None).is_none());
    }

    #[test]
    fn gelu_rows_of_a_narrow_are_evenly_strided() {
        let cpu = candle::Device::Cpu;
        let wide = Tensor::zeros((1, 5, 12), DType::BF16, &cpu).unwrap();
        let half = wide.narrow(2, 4, 8).unwrap();
        assert_eq!(GeluOp::rows_of(half.layout()), Some((5, 8, 12, 4)));
        assert_eq!(GeluOp::rows_of(wide.layout()), Some((5, 12, 12, 0)));
        let two = Tensor::zeros((2, 5, 12), DType::BF16, &cpu).unwrap().narrow(2, 0, 8).unwrap();
        assert_eq!(GeluOp::rows_of(two.layout()), Some((10, 8, 12, 0)));
        let t = Tensor::zeros((1, 8, 5), DType::BF16, &cpu).unwrap().transpose(1, 2).unwrap();
        assert_eq!(GeluOp::rows_of(t.layout()), None);
    }
}
