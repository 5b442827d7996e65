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

/// Where a `[B, H, L, D]` query's rows lie: rows of D contiguous elements,
/// `D` apart, each (item, head) matrix `batch_stride` after the last, from
/// `offset`. `None` if cuBLAS cannot walk it as one strided batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueryLayout {
    offset: usize,
    batch_stride: usize,
}

impl QueryLayout {
    fn of(l: &Layout) -> Option<Self> {
        let (dims, st) = (l.dims(), l.stride());
        let [b, h, _, d] = *dims else { return None };
        let row_ok = st[3] == 1 || d == 1;
        let rows_ok = st[2] == d;
        // One stride over items and heads together: B = 1, or items H heads apart.
        let batch_ok = b == 1 || st[0] == h * st[1];
        (row_ok && rows_ok && batch_ok).then_some(Self { offset: l.start_offset(), batch_stride: st[1] })
    }
}

/// One strided-batched product in cuBLAS's column-major terms:
/// `C_i = α · op(A_i) · op(B_i) + β · C_i`, `A_i` at `a + i · stride_a` etc.
/// Offsets and strides in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gemm {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: usize,
    lda: usize,
    stride_a: usize,
    b: usize,
    ldb: usize,
    stride_b: usize,
    c: usize,
    ldc: usize,
    stride_c: usize,
    batch: usize,
}

/// The products of the term for `[B, H, L, D]` queries over `S` keys. Row-major
/// `X [r, c]` is column-major `Xᵀ [c, r]`, so each row-major product
/// `Y = X W` is issued as `Yᵀ = Wᵀ Xᵀ`:
///
/// - scores: `S_i [L, S] = Q_i K_iᵀ` as `S_iᵀ [S, L] = K_i Q_iᵀ`: A = K memory
///   (column-major `[D, S]` = `K_iᵀ`, transposed), B = Q memory (column-major
///   `[D, L]` = `Q_iᵀ`, as is), C = scores, batch over all B·H (item, head);
/// - output, per item b: `O_h [L, D] = P_h V_h` as `O_hᵀ [D, L] = V_hᵀ P_hᵀ`:
///   A = V memory (column-major `[D, S]`), B = P memory (column-major
///   `[S, L]`), C = the output rows of item b from column `h·D`, `ldc = H·D`,
///   batch over the H heads.
fn plan(b: usize, h: usize, l: usize, s: usize, d: usize, q: QueryLayout) -> (Gemm, Vec<Gemm>) {
    let scores = Gemm {
        trans_a: true,
        trans_b: false,
        m: s,
        n: l,
        k: d,
        a: 0,
        lda: d,
        stride_a: s * d,
        b: q.offset,
        ldb: d,
        stride_b: q.batch_stride,
        c: 0,
        ldc: s,
        stride_c: l * s,
        batch: b * h,
    };
    let outputs = (0..b)
        .map(|item| Gemm {
            trans_a: false,
            trans_b: false,
            m: d,
            n: l,
            k: s,
            a: item * h * s * d,
            lda: d,
            stride_a: s * d,
            b: item * h * l * s,
            ldb: s,
            stride_b: l * s,
            c: item * l * h * d,
            ldc: h * d,
            stride_c: d,
            batch: h,
        })
        .collect();
    (scores, outputs)
}

/// `CustomOp3` on (q, k, v) holding `base`: see [`ip_term`].
struct IpTermOp {
    base: Tensor,
    scale: f32,
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
        stream.memcpy_dtod(&base_view, &mut out).map_err(|e| candle::Error::Cuda(Box::new(e)))?;

        let (first, outputs) = plan(b, h, l, s, d, layout);
        let blas_handle = dev.cublas_handle();
        let handle = *blas_handle.handle();
        {
            let (qp, _gq) = q_all.device_ptr(&stream);
            let (kp, _gk) = k_view.device_ptr(&stream);
            let (sp, _gs) = scores.device_ptr_mut(&stream);
            let alpha = 1.0f32 / (d as f32).sqrt();
            // SAFETY: pointers and extents from `plan` (its test checks them against a host
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
        unsafe { builder.launch(cfg) }.map_err(|e| candle::Error::Cuda(Box::new(e)))?;
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

#[cfg(test)]
mod tests {
    //! The products' parameters run through a host transcription of cuBLAS's
    //! column-major strided-batched semantics, with the softmax between them,
    //! against attention computed directly: the index reasoning of [`plan`]
    //! checked without a GPU (the GPU run checks cuBLAS itself).

    use super::*;

    /// cuBLAS's `gemmStridedBatched` on host slices (column-major, element offsets).
    fn host_gemm(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], alpha: f32, beta: f32) {
        for i in 0..g.batch {
            let (ab, bb, cb) = (g.a + i * g.stride_a, g.b + i * g.stride_b, g.c + i * g.stride_c);
            for col in 0..g.n {
                for row in 0..g.m {
                    let mut acc = 0f32;
                    for p in 0..g.k {
                        let x = if g.trans_a { a[ab + p + row * g.lda] } else { a[ab + row + p * g.lda] };
                        let y = if g.trans_b { b[bb + col + p * g.ldb] } else { b[bb + p + col * g.ldb] };
                        acc += x * y;
                    }
                    let at = cb + row + col * g.ldc;
                    // As cuBLAS: with β = 0, C is not read (it may hold anything).
                    c[at] = if beta == 0.0 { alpha * acc } else { alpha * acc + beta * c[at] };
                }
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The term through `plan`'s products on host memory, for a query whose
    /// rows are `q_rows` of `l_all` (starting at `row0`), against the direct sum.
    fn check(b: usize, h: usize, l_all: usize, row0: usize, s: usize, d: usize) {
        let l = l_all - row0;
        let q_mem = values(b * h * l_all * d, 1);
        let (k, v, base) = (values(b * h * s * d, 2), values(b * h * s * d, 3), values(b * l * h * d, 4));
        let scale = 0.7f32;
        // Rows row0.. of each (item, head): a narrow along L, as the double blocks pass.
        let layout = Layout::contiguous((b, h, l_all, d)).narrow(2, row0, l).unwrap_or_else(|e| panic!("{e}"));
        let q = QueryLayout::of(&layout).unwrap_or_else(|| panic!("layout not taken"));
        let (first, outputs) = plan(b, h, l, s, d, q);
        let mut scores = vec![f32::NAN; b * h * l * s];
        host_gemm(&first, &k, &q_mem, &mut scores, 1.0 / (d as f32).sqrt(), 0.0);
        let mut probs = scores.clone();
        for row in probs.chunks_mut(s) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|x| (x - m).exp()).sum();
            row.iter_mut().for_each(|x| *x = (*x - m).exp() / sum);
        }
        let mut out = base.clone();
        for g in &outputs {
            host_gemm(g, &v, &probs, &mut out, scale, 1.0);
        }
        let mut worst = 0f32;
        for bi in 0..b {
            for hi in 0..h {
                for li in 0..l {
                    let qrow = |c: usize| q_mem[((bi * h + hi) * l_all + row0 + li) * d + c];
                    let kv = |t: &[f32], j: usize, c: usize| t[((bi * h + hi) * s + j) * d + c];
                    let logits: Vec<f32> = (0..s)
                        .map(|j| (0..d).map(|c| qrow(c) * kv(&k, j, c)).sum::<f32>() / (d as f32).sqrt())
                        .collect();
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let w: Vec<f32> = logits.iter().map(|x| (x - m).exp()).collect();
                    let sum: f32 = w.iter().sum();
                    for c in 0..d {
                        let attn: f32 = (0..s).map(|j| w[j] / sum * kv(&v, j, c)).sum();
                        let at = (bi * l + li) * h * d + hi * d + c;
                        let e = (out[at] - (base[at] + scale * attn)).abs();
                        // A NaN (an element never written) is an infinite error; `max` alone would skip it.
                        worst = worst.max(if e.is_finite() { e } else { f32::INFINITY });
                    }
                }
            }
        }
        assert!(worst < 1e-4, "[{b},{h},{l_all}->{l},{s},{d}]: max error {worst}");
    }

    #[test]
    fn the_products_compute_the_term_with_heads_merged() {
        check(1, 3, 7, 0, 5, 4);
    }

    #[test]
    fn a_narrowed_query_is_read_in_place() {
        // A double block: the image rows after the text tokens.
        check(1, 2, 9, 4, 3, 8);
    }

    #[test]
    fn items_get_their_own_output_rows() {
        check(2, 3, 6, 2, 4, 2);
    }

    #[test]
    fn layouts_cublas_cannot_walk_are_refused() {
        // Heads transposed with rows: rows are no longer D apart.
        let t = Layout::contiguous((1, 4, 6, 8)).transpose(1, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(QueryLayout::of(&t), None);
        let c = Layout::contiguous((2, 4, 6, 8));
        assert_eq!(QueryLayout::of(&c), Some(QueryLayout { offset: 0, batch_stride: 48 }));
    }
}
