//! The IP-Adapter's term, `base + s · softmax(q kᵀ/√D) v` with heads merged,
//! by two cuBLAS products and a softmax kernel ([`ip_term.cu`](ip_term.cu))
//! where the keys are few (the adapter's 128 image tokens), as
//! [`GemmSmallKeys`]: a [`FusedAttention`] that takes that case and leaves
//! every other call to the kernel it wraps.
//!
//! Why: the fused attention kernels spend 0.19–0.24 ms on this term's
//! launch at 1024² (session 11, H200) for 6.4 GFLOP, most of it loading the
//! query tile and storing the output, not in the two key tiles. Here:
//!
//! 1. `S = q kᵀ / √D` per (item, head), f32 out of bf16/f16 operands
//!    (cuBLAS, f32 accumulation): `[B·H, L, S]`, strided-batched, the query
//!    read where it lies (a double block's image rows are a narrow of the
//!    whole query; no copy);
//! 2. `P = softmax(S)` row by row into the activations' dtype (one rounding,
//!    as a fused kernel rounds its probabilities before `P·V`);
//! 3. `out = base` (one device copy), then `out += s · P v` by cuBLAS with
//!    β = 1, its output matrix for head h the columns `h·D..(h+1)·D` of the
//!    merged rows (`ldc = H·D`): the heads land merged, the scale and the add
//!    in the product's epilogue.
//!
//! Traffic at 1024² (H 24, L 4608, S 128, D 128, bf16): S 57 MB written and
//! read, P 28 MB written and read, q 28 MB, base and out 57 MB; ≈ 0.25 GB,
//! some 60 µs at the H200's bandwidth (expectation, not a measurement).
//! Numerics: the scores in f32 as in a fused kernel; the products accumulate
//! in f32; the output rounds once.
//!
//! Not done: the term fused into the block's attention (the `_ip` entries of
//! the attention kernels do that); f32 activations (declined).

use std::sync::Arc;

use ipaflux_core::candle_core::backend::BackendStorage;
use ipaflux_core::candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as blas};
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaStorage};
use ipaflux_core::candle_core::{self as candle, CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use ipaflux_core::nn::{ExtraAttention, FusedAttention};

use crate::ip_term_plan::{plan, Gemm, QueryLayout};

/// The PTX nvcc made of `ip_term.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ip_term.ptx"));
const MODULE: &str = "ipaflux_ip_term";
/// Threads per block of the softmax (one row a warp).
const THREADS: u32 = 256;
/// Most keys this path takes; longer key sequences go to the wrapped kernel.
pub const MAX_KEYS: usize = 512;

/// A fused attention whose `base + s · attention` over at most
/// [`MAX_KEYS`] keys runs by cuBLAS (module docs); everything else is
/// `inner`'s.
#[derive(Debug)]
pub struct GemmSmallKeys {
    inner: Arc<dyn FusedAttention>,
    name: &'static str,
}

impl GemmSmallKeys {
    /// `name` says which kernel `inner` is, for reports.
    pub fn new(inner: Arc<dyn FusedAttention>, name: &'static str) -> Self {
        Self { inner, name }
    }
}

/// Whether the cuBLAS path takes these inputs.
fn takes(q: &Tensor, k: &Tensor, v: &Tensor, base: &Tensor) -> bool {
    let dtype = q.dtype();
    let (Ok((b, h, l, d)), Ok((kb, kh, s, kd))) = (q.dims4(), k.dims4()) else { return false };
    q.device().is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16)
        && [k.dtype(), v.dtype(), base.dtype()].iter().all(|&t| t == dtype)
        && (kb, kh, kd) == (b, h, d)
        && v.dims() == k.dims()
        && base.dims() == [b, l, h * d]
        && (1..=MAX_KEYS).contains(&s)
        && l > 0
        && d > 0
}

impl FusedAttention for GemmSmallKeys {
    fn name(&self) -> &'static str {
        self.name
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Option<ipaflux_core::Result<Tensor>> {
        self.inner.attend(q, k, v)
    }

    fn attend_merged(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        add: Option<(&Tensor, f64)>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        match add {
            Some((base, scale)) if takes(q, k, v, base) => Some(ip_term(q, k, v, base, scale)),
            _ => self.inner.attend_merged(q, k, v, add),
        }
    }

    fn attend_merged_extra(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        extra: &ExtraAttention<'_>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        self.inner.attend_merged_extra(q, k, v, extra)
    }

    fn takes_extra(&self) -> bool {
        self.inner.takes_extra()
    }
}

/// `base + scale · softmax(q kᵀ/√D) v`, heads merged (module docs).
fn ip_term(q: &Tensor, k: &Tensor, v: &Tensor, base: &Tensor, scale: f64) -> ipaflux_core::Result<Tensor> {
    // The query may stay strided if cuBLAS can walk it as one batch (below).
    let q = if QueryLayout::of(q.layout()).is_some() { q.clone() } else { q.contiguous()? };
    let op = IpTermOp { base: base.contiguous()?, scale: scale as f32 };
    Ok(q.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?)
}

/// `CustomOp3` on (q, k, v) holding `base`: see [`ip_term`].
struct IpTermOp {
    base: Tensor,
    scale: f32,
}

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle::Error {
    candle::Error::Cuda(Box::new(e))
}

fn err(what: &str) -> candle::Error {
    candle::Error::Msg(format!("IP term by cuBLAS: {what}"))
}

fn int(x: usize) -> candle::Result<i32> {
    i32::try_from(x).map_err(|_| err("a size over i32"))
}

fn long(x: usize) -> candle::Result<i64> {
    i64::try_from(x).map_err(|_| err("a stride over i64"))
}

impl CustomOp3 for IpTermOp {
    fn name(&self) -> &'static str {
        "ipaflux-ip-term-cublas"
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
        Err(err("CUDA only"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.run::<half::bf16>(q, ql, k, kl, v, vl, blas::cudaDataType_t::CUDA_R_16BF, "bf16"),
            DType::F16 => self.run::<half::f16>(q, ql, k, kl, v, vl, blas::cudaDataType_t::CUDA_R_16F, "f16"),
            other => Err(err(&format!("{other:?} activations"))),
        }
    }
}

impl IpTermOp {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
        data_type: blas::cudaDataType_t,
        suffix: &str,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let stream = dev.cuda_stream();
        let (b, h, l, d) = ql.shape().dims4()?;
        let (_, _, s, _) = kl.shape().dims4()?;
        let layout = QueryLayout::of(ql).ok_or_else(|| err("query layout"))?;
        let contiguous = |l: &Layout, what: &str| l.contiguous_offsets().ok_or_else(|| err(what));
        let (k0, k1) = contiguous(kl, "keys not contiguous")?;
        let (v0, v1) = contiguous(vl, "values not contiguous")?;
        let q_all = q.as_cuda_slice::<T>()?;
        let k_view = k.as_cuda_slice::<T>()?.slice(k0..k1);
        let v_view = v.as_cuda_slice::<T>()?.slice(v0..v1);
        let (base_storage, base_layout) = self.base.storage_and_layout();
        let Storage::Cuda(base_storage) = &*base_storage else { return Err(err("base not on the CUDA device")) };
        let (b0, b1) = contiguous(base_layout, "base not contiguous")?;
        let base_view = base_storage.as_cuda_slice::<T>()?.slice(b0..b1);
        let n_out = b * l * h * d;
        if base_view.len() != n_out {
            return Err(err("base size"));
        }
        let rows = b * h * l;
        // SAFETY: every element is written (scores by the first product, P by the softmax, out by the copy).
        let mut scores: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows * s) }?;
        let mut probs: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * s) }?;
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(n_out) }?;
        stream.memcpy_dtod(&base_view, &mut out).map_err(cuda_err)?;

        let (first, outputs) = plan(b, h, l, s, d, layout);
        let blas_handle = dev.cublas_handle();
        let handle = *blas_handle.handle();
        {
            let (qp, _gq) = q_all.device_ptr(&stream);
            let (kp, _gk) = k_view.device_ptr(&stream);
            let (sp, _gs) = scores.device_ptr_mut(&stream);
            let alpha = 1.0f32 / (d as f32).sqrt();
            // SAFETY: pointers and extents from `plan` (`crate::ip_term_plan`'s tests check them against a host
            // transcription of cuBLAS's semantics); K and S are exactly sized, Q's last row ends
            // within its storage (its layout was read from candle's).
            unsafe {
                gemm(
                    handle,
                    &first,
                    (kp, data_type),
                    (qp, data_type),
                    (sp, blas::cudaDataType_t::CUDA_R_32F),
                    alpha,
                    0.0,
                    size_of::<T>(),
                    size_of::<f32>(),
                )
            }?;
        }
        let func = dev.get_or_load_custom_func(&format!("ipaflux_softmax_rows_{suffix}"), MODULE, PTX)?;
        let warps = (THREADS / 32) as usize;
        let blocks = u32::try_from(rows.div_ceil(warps)).map_err(|_| err("rows"))?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (rows_i64, s_i32) = (long(rows)?, int(s)?);
        let mut builder = func.builder();
        builder.arg(&scores).arg(&mut probs).arg(&rows_i64).arg(&s_i32);
        // SAFETY: arguments match `ipaflux_softmax_rows_*` in ip_term.cu; scores and probs hold rows·s.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        {
            let (vp, _gv) = v_view.device_ptr(&stream);
            let (pp, _gp) = probs.device_ptr(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            for g in &outputs {
                // SAFETY: as above; each head's output columns lie within its rows of `out`.
                unsafe {
                    gemm(
                        handle,
                        g,
                        (vp, data_type),
                        (pp, data_type),
                        (op, data_type),
                        self.scale,
                        1.0,
                        size_of::<T>(),
                        size_of::<T>(),
                    )
                }?;
            }
        }
        drop(scores);
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, l, h * d))))
    }
}

/// Issues `g` (offsets in elements of `elem` bytes for A and B, `c_elem` for C).
///
/// # Safety
/// The pointers must hold every element `g` reaches, on the handle's stream.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    handle: blas::cublasHandle_t,
    g: &Gemm,
    (a, a_type): (u64, blas::cudaDataType_t),
    (b, b_type): (u64, blas::cudaDataType_t),
    (c, c_type): (u64, blas::cudaDataType_t),
    alpha: f32,
    beta: f32,
    elem: usize,
    c_elem: usize,
) -> candle::Result<()> {
    let op = |t: bool| if t { blas::cublasOperation_t::CUBLAS_OP_T } else { blas::cublasOperation_t::CUBLAS_OP_N };
    let at = |p: u64, offset: usize, size: usize| (p + (offset * size) as u64) as *const std::ffi::c_void;
    cublas::gemm_strided_batched_ex(
        handle,
        op(g.trans_a),
        op(g.trans_b),
        int(g.m)?,
        int(g.n)?,
        int(g.k)?,
        (&raw const alpha).cast(),
        at(a, g.a, elem),
        a_type,
        int(g.lda)?,
        long(g.stride_a)?,
        at(b, g.b, elem),
        b_type,
        int(g.ldb)?,
        long(g.stride_b)?,
        (&raw const beta).cast(),
        at(c, g.c, c_elem).cast_mut(),
        c_type,
        int(g.ldc)?,
        long(g.stride_c)?,
        int(g.batch)?,
        blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .map_err(|e| err(&format!("cuBLAS: {e:?}")))
}
