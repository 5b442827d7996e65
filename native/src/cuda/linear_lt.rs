//! Linear layers with what follows them in the product's epilogue, by
//! cuBLASLt, as [`LinearLt`]: the bias (`BIAS`), bias + GELU-tanh
//! (`GELU_BIAS`; cuBLASLt's GELU is the tanh approximation, the one PyTorch
//! relies on for `addmm` with `approximate="tanh"`), or the bias and a
//! residual added with β = 1. One launch instead of a product and one or two
//! elementwise passes. It serves two seams of core:
//!
//! - Flux (`FusedModulation`, in [`super::modulation::CudaModulation`]'s
//!   `linear`): the separate bias + GELU kernels take ≈ 0.38 ms per double +
//!   single block pair at 1024² (session 11, H200, ncu), about 11 ms of a
//!   209 ms step. Double blocks: `mlp.0` with bias and GELU written by the
//!   product. Single blocks: `linear1` as two products (core's model splits
//!   it where this takes it): the QKV half as before (its bias goes to the
//!   `qkv_rope` kernel), the MLP half written with bias and GELU into columns
//!   `H..` of the `linear2` input after the attention (columns `0..H`,
//!   copied there by one 2-D copy): no concatenation pass.
//! - SigLIP (`FusedLinear`, `SiglipVisionModel::set_fused_linear`): each
//!   layer's q/k/v with their bias, `fc1` with bias + GELU, `out_proj` and
//!   `fc2` with the bias and the residual: 6 launches a layer instead of 15
//!   (at batch 1 SigLIP's small products leave it launch-bound).
//!
//! Parameters and their host-transcription tests: `crate::linear_lt_plan`
//! (compiled in every build). Numerics: f32 accumulation, bias, GELU and
//! residual in f32, one rounding. Not measured yet: `gpu-check` checks it
//! through the Flux and SigLIP fixtures and times both with it (variants
//! until a GPU run says they are faster). cuBLASLt's workspace (32 MiB,
//! NVIDIA's recommendation for Hopper) is device memory the registry does
//! not count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ipaflux_core::candle_core::backend::{BackendDevice, BackendStorage};
use ipaflux_core::candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    sys as drv, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::{self as candle, CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use ipaflux_core::nn::{FusedLinear, Linear, LinearEpilogue};

use crate::linear_lt_plan::{alignment, plan, with_residual, LtGemm, RowMatrix};

/// cuBLASLt's workspace: 32 MiB, what NVIDIA recommends from Hopper on.
const WORKSPACE_BYTES: usize = 32 << 20;

fn err(what: &str) -> candle::Error {
    candle::Error::Msg(format!("linear layer by cuBLASLt: {what}"))
}

fn lt_err(what: &str, e: lt::CublasError) -> candle::Error {
    err(&format!("{what}: {e:?}"))
}

/// The products with their epilogues on whichever CUDA device the tensors
/// are on (the cuBLASLt handle and workspace made on first use).
#[derive(Debug, Default)]
pub struct LinearLt {
    state: Mutex<Option<Arc<LtState>>>,
}

impl LinearLt {
    /// Whether these products take `x` (`[B, L, C]` activations, bf16 or f16, on CUDA).
    pub fn takes(x: &Tensor) -> bool {
        x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16) && x.rank() == 3
    }

    fn state(&self, dev: &CudaDevice) -> candle::Result<Arc<LtState>> {
        let mut slot = self.state.lock().map_err(|_| err("state lock poisoned"))?;
        if let Some(s) = slot.as_ref().filter(|s| s.device.same_device(dev)) {
            return Ok(s.clone());
        }
        let s = Arc::new(LtState::new(dev)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// One product as `req` asks; `None` where not taken (dtypes, devices,
    /// layouts, shapes).
    pub fn product(&self, req: &Request<'_>) -> Option<ipaflux_core::Result<Tensor>> {
        let x = req.x;
        let dtype = x.dtype();
        let (b, l, k) = x.dims3().ok()?;
        let (n, wk) = req.weight.dims2().ok()?;
        let same = |t: &Tensor| t.dtype() == dtype && t.device().same_device(x.device());
        let rows_match = |t: &Tensor, cols: Option<usize>| {
            t.dims3().is_ok_and(|(tb, tl, tc)| (tb, tl) == (b, l) && cols.is_none_or(|c| c == tc))
        };
        let fits = Self::takes(x)
            && wk == k
            && same(req.weight)
            && RowMatrix::of(req.weight.layout()).is_some()
            && req.head.is_none_or(|h| same(h) && rows_match(h, None))
            // A residual goes with the plain bias epilogue (cuBLASLt would apply GELU to the sum).
            && req.residual.is_none_or(|r| {
                same(r) && rows_match(r, Some(n)) && req.act == Act::None && req.head.is_none()
            });
        if !fits {
            return None;
        }
        let candle::Device::Cuda(dev) = x.device() else { return None };
        let rows = |t: &Tensor| if RowMatrix::of(t.layout()).is_some() { Ok(t.clone()) } else { t.contiguous() };
        Some((|| {
            let state = self.state(dev)?;
            let op = LinearEpilogueOp {
                state,
                bias: req.bias.map(|b| b.to_dtype(dtype)?.contiguous()).transpose()?,
                head: req.head.map(rows).transpose()?,
                residual: req.residual.map(rows).transpose()?,
                act: req.act,
            };
            Ok(rows(x)?.apply_op2_no_bwd(req.weight, &op)?)
        })())
    }
}

/// The activation a product's epilogue applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Act {
    None,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// One product for [`LinearLt::product`]: `act(x Wᵀ + bias) [+ residual]`,
/// written after `head`'s columns in each row where given.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `[B, L, A]`: its values first in each output row.
    pub head: Option<&'a Tensor>,
    /// `[B, L, K]`.
    pub x: &'a Tensor,
    /// `[N, K]`, PyTorch's layout (rows may be a narrow of a larger weight).
    pub weight: &'a Tensor,
    /// `[N]`.
    pub bias: Option<&'a Tensor>,
    pub act: Act,
    /// `[B, L, N]`, added to the product (with [`Act::None`] only).
    pub residual: Option<&'a Tensor>,
}

impl FusedLinear for LinearLt {
    fn name(&self) -> &'static str {
        "cuBLASLt epilogues (bias, GELU-tanh, residual add)"
    }

    fn linear(&self, x: &Tensor, layer: &Linear, epilogue: LinearEpilogue<'_>) -> Option<ipaflux_core::Result<Tensor>> {
        let weight = layer.weight().ok()?;
        let (act, residual) = match epilogue {
            LinearEpilogue::Bias => (Act::None, None),
            LinearEpilogue::GeluTanh => (Act::GeluTanh, None),
            LinearEpilogue::Residual(r) => (Act::None, Some(r)),
        };
        self.product(&Request { head: None, x, weight: &weight, bias: layer.bias(), act, residual })
    }
}

/// A cuBLASLt handle and workspace on one device, and per problem the
/// descriptors and the algorithm its heuristic chose (made once per shape).
struct LtState {
    device: CudaDevice,
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    prepared: Mutex<HashMap<ProblemKey, Prepared>>,
}

// SAFETY: the handle and the cached descriptors are used only on the
// device's one stream, by one op at a time (`LtState::matmul` holds the
// cache's lock while it sets the bias pointer and enqueues); cuBLASLt
// handles and descriptors may be shared between host threads.
unsafe impl Send for LtState {}
unsafe impl Sync for LtState {}

impl std::fmt::Debug for LtState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LtState").field("workspace", &WORKSPACE_BYTES).finish_non_exhaustive()
    }
}

impl Drop for LtState {
    fn drop(&mut self) {
        // SAFETY: made by `cublasLtCreate` in `new`, destroyed once here.
        if let Err(e) = unsafe { lt::destroy_handle(self.handle) } {
            tracing::warn!("cuBLASLt handle not destroyed: {e:?}");
        }
    }
}

/// What a problem's descriptors and the heuristic's choice depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ProblemKey {
    dtype: DType,
    /// [`LtGemm::shape`]: offsets are in the pointers.
    shape: LtGemm,
    bias: bool,
    act: Act,
    /// A, B, C, D.
    align: [u32; 4],
}

impl LtState {
    fn new(dev: &CudaDevice) -> candle::Result<Self> {
        // SAFETY: the workspace is scratch for cuBLASLt, never read by us.
        let workspace = unsafe { dev.alloc::<u8>(WORKSPACE_BYTES) }?;
        let handle = lt::create_handle().map_err(|e| lt_err("creating a handle", e))?;
        Ok(Self { device: dev.clone(), handle, workspace, prepared: Mutex::new(HashMap::new()) })
    }
}

/// Owned cuBLASLt descriptors, destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);
struct MatLayout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created once by `create_matmul_desc`.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for MatLayout {
    fn drop(&mut self) {
        // SAFETY: created once by `create_matrix_layout`.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created once by `create_matmul_pref`.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn desc_attr<V>(d: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, value: &V, what: &str) -> candle::Result<()> {
    // SAFETY: `value` is the attribute's type (the callers pass i32, u32 enums and pointers as cuBLASLt documents).
    unsafe { lt::set_matmul_desc_attribute(d.0, attr, (value as *const V).cast(), size_of::<V>()) }
        .map_err(|e| lt_err(what, e))
}

fn pref_attr<V>(
    p: &Pref,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    value: &V,
    what: &str,
) -> candle::Result<()> {
    // SAFETY: as `desc_attr`.
    unsafe { lt::set_matmul_pref_attribute(p.0, attr, (value as *const V).cast(), size_of::<V>()) }
        .map_err(|e| lt_err(what, e))
}

/// One problem's descriptors and algorithm, reused by every product of its
/// key: only the bias pointer changes between them (set before each).
struct Prepared {
    desc: Desc,
    a: MatLayout,
    b: MatLayout,
    /// The residual's layout; `None`: D's (β = 0, C not read).
    c: Option<MatLayout>,
    d: MatLayout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// The layout cuBLASLt is given for C: the residual's, or D's where there
/// is none (β = 0, C not read). For the heuristic and for every product.
fn c_or_d(c: &Option<MatLayout>, d: &MatLayout) -> sys::cublasLtMatrixLayout_t {
    c.as_ref().unwrap_or(d).0
}

/// Device pointers of one product (A = weight, B = input, C = residual, D = output, bias).
struct Pointers {
    a: u64,
    b: u64,
    c: Option<u64>,
    d: u64,
    bias: Option<u64>,
}

impl LtState {
    /// Enqueues `D = act(op(A) op(B) + β·C + bias)` on `stream` (β = 1 with a residual C).
    ///
    /// # Safety
    /// The pointers must hold every element `g` reaches (checked by the
    /// caller against the storages' lengths), on the device's stream.
    unsafe fn matmul(
        &self,
        g: &LtGemm,
        dtype: DType,
        act: Act,
        p: &Pointers,
        stream: drv::CUstream,
    ) -> candle::Result<()> {
        let c_ptr = p.c.unwrap_or(p.d);
        let align = [alignment(p.a), alignment(p.b), alignment(c_ptr), alignment(p.d)];
        let key = ProblemKey { dtype, shape: g.shape(), bias: p.bias.is_some(), act, align };
        let mut cache = self.prepared.lock().map_err(|_| err("descriptor cache lock poisoned"))?;
        let prepared = match cache.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.prepare(&key)?),
        };
        if let Some(bias) = &p.bias {
            use sys::cublasLtMatmulDescAttributes_t as D;
            desc_attr(&prepared.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "bias pointer")?;
        }
        let (alpha, beta) = (1f32, if p.c.is_some() { 1f32 } else { 0f32 });
        let stream_arc = self.device.cuda_stream();
        let (w, _guard) = self.workspace.device_ptr(&stream_arc);
        let ptr = |x: u64| x as *const std::ffi::c_void;
        // SAFETY: the caller's contract; the descriptors, the algorithm and the workspace are live.
        unsafe {
            lt::matmul(
                self.handle,
                prepared.desc.0,
                (&raw const alpha).cast(),
                (&raw const beta).cast(),
                ptr(p.a),
                prepared.a.0,
                ptr(p.b),
                prepared.b.0,
                ptr(c_ptr),
                c_or_d(&prepared.c, &prepared.d),
                p.d as *mut std::ffi::c_void,
                prepared.d.0,
                &raw const prepared.algo,
                w as *mut std::ffi::c_void,
                WORKSPACE_BYTES,
                stream.cast(),
            )
        }
        .map_err(|e| lt_err("matmul", e))
    }

    /// The descriptors of `key`'s problem and the algorithm the heuristic
    /// chooses for it (the bias pointer is set per product by `matmul`).
    fn prepare(&self, key: &ProblemKey) -> candle::Result<Prepared> {
        use sys::cublasLtEpilogue_t as E;
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let g = &key.shape;
        let data_type = match key.dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            other => return Err(err(&format!("{other:?} activations"))),
        };
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| lt_err("matmul descriptor", e))?,
        );
        // A transposed (`LtGemm`'s convention), B as it is: cublasOperation_t
        // as i32 (CUBLAS_OP_N = 0, CUBLAS_OP_T = 1; cuBLASLt's sys module has no enum for it).
        const OP_N: i32 = 0;
        const OP_T: i32 = 1;
        desc_attr(&desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &OP_T, "transa")?;
        desc_attr(&desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &OP_N, "transb")?;
        let epilogue = match (key.act, key.bias) {
            (Act::GeluTanh, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
            (Act::GeluTanh, false) => E::CUBLASLT_EPILOGUE_GELU,
            (Act::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
            (Act::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
        };
        desc_attr(&desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, "epilogue")?;
        let layout = |rows: usize, cols: usize, ld: usize| -> candle::Result<MatLayout> {
            let ld = i64::try_from(ld).map_err(|_| err("a leading dimension over i64"))?;
            lt::create_matrix_layout(data_type, rows as u64, cols as u64, ld)
                .map(MatLayout)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // Stored shapes, column-major: A [k, m] (read transposed), B [k, n], D [m, n].
        let a = layout(g.k, g.m, g.lda)?;
        let b = layout(g.k, g.n, g.ldb)?;
        let d = layout(g.m, g.n, g.ldd)?;
        // C is the residual with its own layout, or D itself (β = 0: not read).
        let c = match g.c {
            Some((_, ldc)) => Some(layout(g.m, g.n, ldc)?),
            None => None,
        };
        let pref = Pref(lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?);
        pref_attr(&pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(WORKSPACE_BYTES as u64), "workspace")?;
        // cuBLASLt assumes 256-byte aligned operands unless told otherwise.
        let [a_align, b_align, c_align, d_align] = key.align;
        pref_attr(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_align, "alignment of A")?;
        pref_attr(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_align, "alignment of B")?;
        pref_attr(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_align, "alignment of C")?;
        pref_attr(&pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d_align, "alignment of D")?;
        // SAFETY: live descriptors made above.
        let h = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c_or_d(&c, &d), d.0, pref.0) }
            .map_err(|e| lt_err(&format!("no algorithm for {g:?} ({:?}, aligned {:?})", key.dtype, key.align), e))?;
        Ok(Prepared { desc, a, b, c, d, algo: h.algo })
    }
}

/// `CustomOp2` on (x, weight): see [`LinearLt::product`].
struct LinearEpilogueOp {
    state: Arc<LtState>,
    bias: Option<Tensor>,
    head: Option<Tensor>,
    residual: Option<Tensor>,
    act: Act,
}

/// The CUDA storage of `t` as `T` elements, with its layout.
fn cuda_view<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaSlice<T>, &Layout) -> candle::Result<R>,
) -> candle::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { return Err(err("a tensor not on the CUDA device")) };
    f(s.as_cuda_slice::<T>()?, layout)
}

/// The last element `m` reaches, checked against the storage's length.
fn within(m: &RowMatrix, len: usize, what: &str) -> candle::Result<()> {
    let end = m.offset + (m.rows - 1) * m.stride + m.cols;
    if end > len {
        return Err(err(&format!("{what} reaches element {end} of {len}")));
    }
    Ok(())
}

impl CustomOp2 for LinearEpilogueOp {
    fn name(&self) -> &'static str {
        "ipaflux-linear-epilogue-cublaslt"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        Err(err("CUDA only"))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::BF16 => self.run::<half::bf16>(x, xl, w, wl),
            DType::F16 => self.run::<half::f16>(x, xl, w, wl),
            other => Err(err(&format!("{other:?} activations"))),
        }
    }
}

impl LinearEpilogueOp {
    fn run<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let stream = dev.cuda_stream();
        let elem = size_of::<T>();
        let xm = RowMatrix::of(xl).ok_or_else(|| err("input rows not evenly strided"))?;
        let wm = RowMatrix::of(wl).ok_or_else(|| err("weight rows not evenly strided"))?;
        let (x_all, w_all) = (x.as_cuda_slice::<T>()?, w.as_cuda_slice::<T>()?);
        within(&xm, x_all.len(), "input")?;
        within(&wm, w_all.len(), "weight")?;
        let head = match &self.head {
            Some(h) => Some(cuda_view::<T, _>(h, |s, l| {
                let m = RowMatrix::of(l).ok_or_else(|| err("head rows not evenly strided"))?;
                within(&m, s.len(), "head")?;
                if m.rows != xm.rows {
                    return Err(err("head and input rows differ"));
                }
                Ok((m, s.device_ptr(&stream).0))
            })?),
            None => None,
        };
        let head_cols = head.map_or(0, |(m, _)| m.cols);
        let width = head_cols + wm.rows;
        let g = plan(xm, wm, width, head_cols).ok_or_else(|| err("input and weight sizes differ"))?;
        let residual = match &self.residual {
            Some(r) => Some(cuda_view::<T, _>(r, |s, l| {
                let m = RowMatrix::of(l).ok_or_else(|| err("residual rows not evenly strided"))?;
                within(&m, s.len(), "residual")?;
                Ok((m, s.device_ptr(&stream).0))
            })?),
            None => None,
        };
        let g = match residual {
            Some((m, _)) if head_cols == 0 => {
                with_residual(g, m).ok_or_else(|| err("residual shape differs from the output"))?
            }
            Some(_) => return Err(err("a residual with a head")),
            None => g,
        };
        // SAFETY: the head's columns are copied below, the product writes every other element.
        let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(xm.rows * width) }?;
        let (out_ptr, out_guard) = out.device_ptr_mut(&stream);
        let cu_stream = stream.cu_stream();
        if let Some((m, src)) = head {
            let copy = drv::CUDA_MEMCPY2D {
                srcXInBytes: m.offset * elem,
                srcY: 0,
                srcMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: src,
                srcArray: std::ptr::null_mut(),
                srcPitch: m.stride * elem,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: drv::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: out_ptr,
                dstArray: std::ptr::null_mut(),
                dstPitch: width * elem,
                WidthInBytes: m.cols * elem,
                Height: m.rows,
            };
            // SAFETY: source rows checked by `within`; destination rows are `width` elements, the copy `m.cols` of them.
            let r = unsafe { drv::cuMemcpy2DAsync_v2(&raw const copy, cu_stream) };
            if r != drv::CUresult::CUDA_SUCCESS {
                return Err(err(&format!("copying the head: {r:?}")));
            }
        }
        // A bias pointer cuBLASLt's epilogue may not read unaligned goes
        // through a fresh, aligned copy (freed in stream order after the
        // product, like every candle allocation).
        let (bias, _bias_copy) = match &self.bias {
            Some(b) => {
                let (p, copy) = cuda_view::<T, _>(b, |s, l| {
                    let (start, end) = l.contiguous_offsets().ok_or_else(|| err("bias not contiguous"))?;
                    if end - start != wm.rows {
                        return Err(err("bias length differs from the output features"));
                    }
                    let view = s.slice(start..end);
                    let p = view.device_ptr(&stream).0;
                    if alignment(p) >= 16 {
                        return Ok((p, None));
                    }
                    // SAFETY: every element is written by the copy that follows.
                    let mut copy: CudaSlice<T> = unsafe { dev.alloc::<T>(end - start) }?;
                    stream.memcpy_dtod(&view, &mut copy).map_err(|e| err(&format!("copying the bias: {e:?}")))?;
                    let p = copy.device_ptr(&stream).0;
                    Ok((p, Some(copy)))
                })?;
                (Some(p), copy)
            }
            None => (None, None),
        };
        let (x_ptr, _gx) = x_all.device_ptr(&stream);
        let (w_ptr, _gw) = w_all.device_ptr(&stream);
        let at = |p: u64, offset: usize| p + (offset * elem) as u64;
        let c = residual.zip(g.c).map(|((_, ptr), (offset, _))| at(ptr, offset));
        let p = Pointers { a: at(w_ptr, g.a), b: at(x_ptr, g.b), c, d: at(out_ptr, g.d), bias };
        // SAFETY: A, B and C within their storages (`within`), D within `out`
        // (`plan`: col0 + m ≤ width), bias of m elements.
        unsafe { self.state.matmul(&g, T::DTYPE, self.act, &p, cu_stream) }?;
        drop(out_guard);
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}
