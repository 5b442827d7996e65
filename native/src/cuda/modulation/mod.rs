//! Fused LayerNorm + modulation, gated residuals and bias + GELU-tanh on CUDA
//! ([`modulation.cu`](modulation.cu)) as core's [`FusedModulation`]: bf16/f16
//! activations `[B, L, H]` with per-item rows `[B, 1, H]`, f32 arithmetic,
//! one rounding per output. Other dtypes and devices are declined (`None`)
//! and the model runs candle's separate ops. Checked on the GPU by
//! `ipaflux gpu-check` (the Flux fixture through the whole model against
//! diffusers, and in the benchmarks).
//!
//! With [`KernelSet::Fast`] also the attention inputs from a QKV
//! projection in one kernel (`qkv_rope`: bias, split, QK RMSNorm, the double
//! blocks' concatenation, RoPE) and the linear layers' biases added inside
//! the gated residual. Those are checked on the GPU by `gpu-check` (first
//! run in session 11, H200), and without one on the host under an emulation
//! of the CUDA execution model (`host_emulation.cpp` beside the kernels,
//! `scripts/kernel-emulation.sh`); the seams they plug into by core's
//! `flux::mirror` tests.

use std::sync::Arc;

use ipaflux_core::candle_core::backend::BackendStorage;
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::{
    self as candle, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};
use ipaflux_core::nn::{FusedModulation, QkvOut, QkvStreams};

use super::linear_lt::{Act, LinearLt, Request};
use crate::KernelSet;

/// The PTX nvcc made of `modulation.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/modulation.ptx"));
const MODULE: &str = "ipaflux_modulation";
/// Threads per block of both kernels.
const THREADS: u32 = 256;
/// Most blocks `gated_add` launches (it loops over the rest).
const MAX_BLOCKS: usize = 132 * 16;

/// Warps per block of `qkv_rope` (one (row, head) each).
const QKV_WARPS: u32 = 8;
/// Largest head size `qkv_rope` takes (4 pairs per lane).
const QKV_MAX_HEAD_DIM: usize = 256;

/// The CUDA kernels as core's [`FusedModulation`].
#[derive(Debug, Default, Clone)]
pub struct CudaModulation {
    pub set: KernelSet,
    /// The MLP products with GELU in their epilogue by cuBLASLt
    /// ([`LinearLt`]); `None`: the product, then the GELU kernel.
    pub linear: Option<Arc<LinearLt>>,
}

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
        match self.linear {
            None => "cuda-fused modulation",
            Some(_) => "cuda-fused modulation; MLP products with bias + GELU in their cuBLASLt epilogue",
        }
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
        gelu(x, bias, None)
    }

    fn gelu_tanh_after(
        &self,
        head: &Tensor,
        x: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        let (b, l, _) = x.dims3().ok()?;
        let (hb, hl, _) = head.dims3().ok()?;
        let ok = (hb, hl) == (b, l) && head.dtype() == x.dtype() && head.device().same_device(x.device());
        ok.then(|| gelu(x, bias, Some(head))).flatten()
    }

    fn gated_add(
        &self,
        x: &Tensor,
        y: &Tensor,
        bias: Option<&Tensor>,
        gate: &Tensor,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        takes(x, &[gate], Some(y)).then(|| {
            let (y, bias) = match (bias, self.set) {
                (None, _) => (y.contiguous()?, None),
                // The baseline set adds the bias as its own op.
                (Some(b), KernelSet::Baseline) => (ipaflux_core::nn::add_bias(y, Some(b))?.contiguous()?, None),
                (Some(b), KernelSet::Fast) => (y.contiguous()?, Some(b.to_dtype(x.dtype())?.contiguous()?)),
            };
            if let Some(b) = &bias {
                if b.dims() != [x.dim(2)?] {
                    return Err(ipaflux_core::Error::Shape(format!(
                        "gated residual: bias {:?} for {:?}",
                        b.dims(),
                        x.dims()
                    )));
                }
            }
            Ok(x.contiguous()?.apply_op3_no_bwd(&y, &gate.contiguous()?, &Op::GatedAdd { bias })?)
        })
    }

    fn takes_linear_gelu(&self, x: &Tensor) -> bool {
        self.linear.is_some() && LinearLt::takes(x)
    }

    fn linear_gelu_tanh(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        let req = Request { head: None, x, weight, bias, act: Act::GeluTanh, residual: None };
        self.linear.as_ref()?.product(&req)
    }

    fn linear_gelu_tanh_after(
        &self,
        head: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        let req = Request { head: Some(head), x, weight, bias, act: Act::GeluTanh, residual: None };
        self.linear.as_ref()?.product(&req)
    }

    fn qkv_rope(&self, s: &QkvStreams<'_>) -> Option<ipaflux_core::Result<QkvOut>> {
        if self.set != KernelSet::Fast {
            return None;
        }
        let op = QkvRopeOp::new(s)?;
        Some(op.and_then(|op| op.run(s.sin)))
    }
}

enum Op {
    /// Inputs x, scale, shift.
    LnModulate { eps: f32 },
    /// Inputs x, y, gate; the bias `[H]` of y's layer, if added here.
    GatedAdd { bias: Option<Tensor> },
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

/// The contiguous elements of a CUDA tensor held by an op (not one of its
/// candle inputs), from its storage guard.
fn view<'a, T: CudaDType>(st: &'a Storage, l: &Layout) -> candle::Result<CudaView<'a, T>> {
    match st {
        Storage::Cuda(s) => slice::<T>(s, l),
        _ => Err(candle::Error::Msg("a fused kernel's operand is not on the CUDA device".into())),
    }
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
            Op::GatedAdd { bias } => {
                let func = dev.get_or_load_custom_func(&format!("ipaflux_gated_add_{suffix}"), MODULE, PTX)?;
                let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
                let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
                let (hh, per_item) = (to_i32(h)?, len * h);
                let guard = bias.as_ref().map(Tensor::storage_and_layout);
                let bias_view = guard.as_ref().map(|(st, l)| view::<T>(st, l)).transpose()?;
                let has_bias = i32::from(bias_view.is_some());
                let mut builder = func.builder();
                builder.arg(&a).arg(&b);
                match &bias_view {
                    Some(bv) => builder.arg(bv),
                    None => builder.arg(&a), // not read
                };
                builder.arg(&c).arg(&out).arg(&n).arg(&hh).arg(&per_item).arg(&has_bias);
                // SAFETY: arguments match `ipaflux_gated_add_*`; x, y and out hold n = B·L·H elements,
                // gate B·H (checked by `takes`), bias H when read (checked by the caller); the loop
                // stays below n.
                unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), la.shape().clone()))
    }
}

/// One stream's operands of `qkv_rope`, each in the activations' dtype.
struct QkvArgs {
    /// `[B, L, 3·H·D]`, rows evenly strided.
    qkv: Tensor,
    bias: Option<Tensor>,
    q_scale: Tensor,
    k_scale: Tensor,
}

/// Attention inputs from the QKV projections of one or more token streams
/// (`qkv_rope` in modulation.cu): a `CustomOp1` on the RoPE `sin` table that
/// holds its other operands. Output `[P, B, H, L_total, D]`, P = 3 or 4.
struct QkvRopeOp {
    streams: Vec<QkvArgs>,
    cos: Tensor,
    batch: usize,
    heads: usize,
    head_dim: usize,
    l_total: usize,
    eps: f32,
    keep_q: bool,
}

impl QkvRopeOp {
    /// `None` when the kernel does not take these inputs (device, dtype,
    /// shapes); operands in other dtypes are converted.
    fn new(s: &QkvStreams<'_>) -> Option<ipaflux_core::Result<Self>> {
        let first = s.streams.first()?;
        let dtype = first.qkv.dtype();
        let (batch, _, width) = first.qkv.dims3().ok()?;
        let heads = s.heads;
        let head_dim = width / (3 * heads.max(1));
        let l_total: usize = s.streams.iter().map(|st| st.qkv.dim(1).unwrap_or(0)).sum();
        let ok = first.qkv.device().is_cuda()
            && matches!(dtype, DType::BF16 | DType::F16)
            && heads > 0
            && 3 * heads * head_dim == width
            && head_dim % 2 == 0
            && (2..=QKV_MAX_HEAD_DIM).contains(&head_dim)
            && s.streams.iter().all(|st| {
                st.qkv.dtype() == dtype
                    && st.qkv.dims3().is_ok_and(|(b, _, w)| b == batch && w == width)
                    && st.bias.is_none_or(|b| b.dims() == [width])
                    && st.q_scale.dims() == [head_dim]
                    && st.k_scale.dims() == [head_dim]
            })
            && [s.cos, s.sin].iter().all(|t| t.dtype() == DType::F32 && t.dims() == [l_total, head_dim / 2]);
        if !ok {
            return None;
        }
        let cast = |t: &Tensor| -> ipaflux_core::Result<Tensor> { Ok(t.to_dtype(dtype)?.contiguous()?) };
        let build = || -> ipaflux_core::Result<Self> {
            let streams = s
                .streams
                .iter()
                .map(|st| {
                    // Rows a constant stride apart are read in place; anything else is copied first.
                    let qkv = if GeluOp::rows_of(st.qkv.layout()).is_some() {
                        st.qkv.clone()
                    } else {
                        st.qkv.contiguous()?
                    };
                    Ok(QkvArgs {
                        qkv,
                        bias: st.bias.map(cast).transpose()?,
                        q_scale: cast(st.q_scale)?,
                        k_scale: cast(st.k_scale)?,
                    })
                })
                .collect::<ipaflux_core::Result<Vec<_>>>()?;
            Ok(Self {
                streams,
                cos: s.cos.contiguous()?,
                batch,
                heads,
                head_dim,
                l_total,
                eps: s.eps as f32,
                keep_q: s.keep_q,
            })
        };
        Some(build())
    }

    fn run(self, sin: &Tensor) -> ipaflux_core::Result<QkvOut> {
        let all = sin.contiguous()?.apply_op1_no_bwd(&self)?;
        let get = |p: usize| -> ipaflux_core::Result<Tensor> { Ok(all.get(p)?) };
        let q_pre_rope = if self.keep_q { Some(get(3)?) } else { None };
        Ok(QkvOut { q: get(0)?, k: get(1)?, v: get(2)?, q_pre_rope })
    }

    fn parts(&self) -> usize {
        if self.keep_q {
            4
        } else {
            3
        }
    }

    fn launch<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        dev: &CudaDevice,
        sin: CudaView<'_, f32>,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let (b, h, d, lt) = (self.batch, self.heads, self.head_dim, self.l_total);
        let cos_guard = self.cos.storage_and_layout();
        let cos = view::<f32>(&cos_guard.0, cos_guard.1)?;
        let suffix = if T::DTYPE == DType::F16 { "f16" } else { "bf16" };
        let func = dev.get_or_load_custom_func(&format!("ipaflux_qkv_rope_{suffix}"), MODULE, PTX)?;
        let to_i32 = |x: usize| i32::try_from(x).map_err(|_| candle::Error::Msg("qkv_rope: size over i32".into()));
        let n = self.parts() * b * h * lt * d;
        // SAFETY: the launches below write every element: the streams' rows cover all L_total
        // tokens of every batch item, each warp all D values of its head in each part.
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n) }?;
        let mut offset = 0usize;
        for st in &self.streams {
            let (_, len, width) = st.qkv.dims3()?;
            let g = st.qkv.storage_and_layout();
            let Storage::Cuda(cs) = &*g.0 else {
                return Err(candle::Error::Msg("qkv_rope: input not on the CUDA device".into()));
            };
            let (rows, w, row_stride, start) = GeluOp::rows_of(g.1)
                .ok_or_else(|| candle::Error::Msg("qkv_rope: rows are not evenly strided".into()))?;
            debug_assert_eq!(w, width);
            let x = cs.as_cuda_slice::<T>()?.slice(start..start + (rows.max(1) - 1) * row_stride + w);
            let bias_guard = st.bias.as_ref().map(Tensor::storage_and_layout);
            let bias = bias_guard.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
            let qs_guard = st.q_scale.storage_and_layout();
            let ks_guard = st.k_scale.storage_and_layout();
            let (qs, ks) = (view::<T>(&qs_guard.0, qs_guard.1)?, view::<T>(&ks_guard.0, ks_guard.1)?);
            let tasks = rows * h;
            let blocks = u32::try_from(tasks.div_ceil(QKV_WARPS as usize))
                .map_err(|_| candle::Error::Msg("qkv_rope: too many rows".into()))?;
            let cfg = LaunchConfig {
                grid_dim: (blocks.max(1), 1, 1),
                block_dim: (QKV_WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (r32, l32, h32, d32) = (to_i32(rows)?, to_i32(len)?, to_i32(h)?, to_i32(d)?);
            let (has_bias, off32, lt32, b32) = (i32::from(bias.is_some()), to_i32(offset)?, to_i32(lt)?, to_i32(b)?);
            let keep_q = i32::from(self.keep_q);
            let mut builder = func.builder();
            builder.arg(&x);
            match &bias {
                Some(bv) => builder.arg(bv),
                None => builder.arg(&x), // not read
            };
            builder.arg(&qs).arg(&ks).arg(&cos).arg(&sin).arg(&out);
            builder.arg(&r32).arg(&l32).arg(&h32).arg(&d32).arg(&row_stride).arg(&has_bias);
            builder.arg(&off32).arg(&lt32).arg(&b32).arg(&keep_q).arg(&self.eps);
            // SAFETY: arguments match `ipaflux_qkv_rope_*`; x covers rows × row_stride (last row
            // 3·H·D), bias 3·H·D and the scales D elements (checked in `new`), cos/sin
            // L_total × D/2 f32, out P·B·H·L_total·D; warps past rows × H return at once.
            unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
            offset += len;
        }
        if offset != lt {
            return Err(candle::Error::Msg(format!("qkv_rope: streams cover {offset} of {lt} tokens")));
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((self.parts(), b, h, lt, d))))
    }
}

impl CustomOp1 for QkvRopeOp {
    fn name(&self) -> &'static str {
        "ipaflux-qkv-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        Err(candle::Error::Msg("the fused QKV kernel runs on CUDA only; the CPU uses the reference ops".into()))
    }

    fn cuda_fwd(&self, sin: &CudaStorage, l: &Layout) -> candle::Result<(CudaStorage, Shape)> {
        let dev = sin.device().clone();
        let sin = slice::<f32>(sin, l)?;
        match self.streams.first().map(|s| s.qkv.dtype()) {
            Some(DType::BF16) => self.launch::<half::bf16>(&dev, sin),
            Some(DType::F16) => self.launch::<half::f16>(&dev, sin),
            other => Err(candle::Error::Msg(format!("the fused QKV kernel takes bf16 or f16, not {other:?}"))),
        }
    }
}

/// GELU-tanh of `x (+ bias)` with [`GeluOp`], after `head`'s values in each
/// row when given; `None` where the kernel does not take the inputs.
fn gelu(x: &Tensor, bias: Option<&Tensor>, head: Option<&Tensor>) -> Option<ipaflux_core::Result<Tensor>> {
    let dtype = x.dtype();
    let w = x.dims3().ok()?.2;
    let ok = x.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && bias.is_none_or(|b| b.dtype() == dtype && b.dims() == [w]);
    ok.then(|| {
        // Rows evenly spaced (a narrow of the last dimension is); else made contiguous first.
        let x = if GeluOp::rows_of(x.layout()).is_some() { x.clone() } else { x.contiguous()? };
        let op = GeluOp { has_bias: bias.is_some(), head: head.map(Tensor::contiguous).transpose()? };
        let b = match bias {
            Some(b) => b.contiguous()?,
            None => x.clone(), // not read
        };
        Ok(x.apply_op2_no_bwd(&b, &op)?)
    })
}

/// GELU-tanh of `x (+ bias)`; `x` rows may be strided (module docs). With
/// `head` (`[B, L, A]`, contiguous) each output row is head's row, then the
/// GELU's.
struct GeluOp {
    has_bias: bool,
    head: Option<Tensor>,
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
        let guard = self.head.as_ref().map(Tensor::storage_and_layout);
        let head = guard.as_ref().map(|(st, l)| view::<T>(st, l)).transpose()?;
        let a = match &self.head {
            Some(h) => {
                let (hb, hl, a) = h.dims3()?;
                if hb * hl != rows || h.dtype() != T::DTYPE {
                    return Err(candle::Error::Msg("fused GELU: the head's rows are not x's".into()));
                }
                a
            }
            None => 0,
        };
        let n = rows * (a + w);
        // SAFETY: the kernel writes all n elements (grid-stride loop below n).
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n) }?;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let to_i32 = |v: usize| i32::try_from(v).map_err(|_| candle::Error::Msg("fused GELU: width over i32".into()));
        let (w32, a32) = (to_i32(w)?, to_i32(a)?);
        let has_bias = i32::from(self.has_bias);
        let mut builder = func.builder();
        builder.arg(&x).arg(&b).arg(&out).arg(&rows).arg(&w32).arg(&stride).arg(&has_bias);
        match &head {
            Some(h) => builder.arg(h),
            None => builder.arg(&x), // not read (A = 0)
        };
        builder.arg(&a32);
        // SAFETY: arguments match `ipaflux_gelu_tanh_*`; x covers rows × stride (last row W),
        // bias W elements when read (checked shape), head rows × A elements (checked above),
        // out n = rows × (A + W) elements.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        let (bb, l, _) = lx.shape().dims3()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((bb, l, a + w))))
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
            Op::GatedAdd { .. } => "ipaflux-gated-add",
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
        for k in ["ln_modulate", "gated_add", "gelu_tanh", "qkv_rope"] {
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
        let lt = Some(Arc::new(LinearLt::default()));
        for m in [
            CudaModulation { set: KernelSet::Baseline, linear: None },
            CudaModulation { set: KernelSet::Fast, linear: None },
            CudaModulation { set: KernelSet::Fast, linear: lt },
        ] {
            assert!(m.ln_modulate(&x, &r, &r, 1e-6).is_none());
            assert!(m.gated_add(&x, &x, None, &r).is_none());
            assert!(m.gelu_tanh(&x, None).is_none());
            assert!(m.gelu_tanh_after(&x, &x, None).is_none());
            let w = Tensor::zeros((8, 8), DType::BF16, &cpu).unwrap();
            assert!(!m.takes_linear_gelu(&x));
            assert!(m.linear_gelu_tanh(&x, &w, None).is_none());
            assert!(m.linear_gelu_tanh_after(&x, &x, &w, None).is_none());
        }
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
