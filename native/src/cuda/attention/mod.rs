//! Fused attention on CUDA ([`attention.cu`](attention.cu)): bf16/f16 q, k, v
//! `[B, H, L|S, D]` with D ≤ 128, online softmax over key tiles on tensor
//! cores, so no `[L, S]` score matrix ever exists in GPU memory: the extra
//! memory of a call is its output. f32 inputs, other devices and larger heads
//! are declined (`None`), and the caller runs core's reference `sdpa`.
//!
//! Versions of the kernel ([`Kernel`]): `wmma` (the first: WMMA, scores,
//! probabilities and output accumulator through shared memory every tile),
//! `mma` (the default: `mma.sync` fragments kept in registers,
//! FlashAttention-2's layout) and `mma` with `cp.async` double buffering of
//! the K/V tiles (the candidate kernel set; not yet run on a GPU).
//! `ipaflux gpu-check` checks and times all of them.
//!
//! With `merged_output` (the candidate set; `mma` versions only) the kernel
//! also serves core's `attend_merged`: it writes `[B, L, H·D]` directly (no
//! transpose copy after it) and can add its result, scaled, to a given
//! tensor in the same store (the IP-Adapter's term added to a block's
//! attention output). That epilogue has not yet run on a GPU either; both
//! are checked on the host under an emulation of `ldmatrix`, `mma.sync` and
//! `cp.async` (`host_emulation.cpp` beside the kernel).
//!
//! The kernel is compiled to PTX by nvcc at build time (`build.rs`, for
//! `CUDA_COMPUTE_CAP`, default 90) and loaded by candle's CUDA device on first
//! use. Parity with the reference path is checked on the GPU by
//! `ipaflux gpu-check` (see `scripts/gpu-check.sh`).

use std::mem::size_of;

use ipaflux_core::candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::{self as candle, CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use ipaflux_core::nn::FusedAttention;

/// The PTX nvcc made of `attention.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// Query rows per thread block (4 warps × 16), keys per tile, threads per block:
/// must match `BR`, `BC`, `THREADS` in `attention.cu`.
const BR: usize = 64;
const BC: usize = 64;
const THREADS: u32 = 128;
/// Largest head size the kernel takes (its tiles are sized for it).
pub const MAX_HEAD_DIM: usize = 128;

/// Which version of the kernel (module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Version 1: WMMA, per-tile intermediates in shared memory.
    Wmma,
    /// Version 2: `mma.sync` with scores and output in registers.
    #[default]
    Mma,
    /// Version 4 (candidate, not yet run on a GPU): `Mma` with the K/V tiles
    /// double-buffered by `cp.async`, the next tile's copy overlapping this
    /// tile's products. Where 16-byte loads do not apply it runs as `Mma`.
    MmaPipelined,
}

impl Kernel {
    /// The kernel version a call runs: `MmaPipelined` needs the 16-byte path.
    fn effective(self, vec_loads: bool) -> Self {
        if self == Self::MmaPipelined && !vec_loads {
            Self::Mma
        } else {
            self
        }
    }

    fn entry(self, dtype: DType) -> &'static str {
        match (self, dtype) {
            (Self::Wmma, DType::F16) => "ipaflux_attention_f16",
            (Self::Wmma, _) => "ipaflux_attention_bf16",
            (Self::Mma, DType::F16) => "ipaflux_attention2_f16",
            (Self::Mma, _) => "ipaflux_attention2_bf16",
            (Self::MmaPipelined, DType::F16) => "ipaflux_attention4_f16",
            (Self::MmaPipelined, _) => "ipaflux_attention4_bf16",
        }
    }

    /// Dynamic shared memory of one block for head size `d` and element size `elem`.
    fn shared_bytes(self, d: usize, elem: usize) -> usize {
        // One K and one V tile, rows padded by 16 bytes (the first also stages Q).
        let pair = 2 * BC * (d.div_ceil(16) * 16 + 8) * elem;
        match self {
            Self::Wmma => shared_bytes(d, elem),
            Self::Mma => pair,
            Self::MmaPipelined => 2 * pair,
        }
    }

    /// Takes the merged-heads / add epilogue (versions 3 and 4).
    fn has_epilogue(self) -> bool {
        self != Self::Wmma
    }
}

/// The fused CUDA attention as core's [`FusedAttention`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaFusedAttention {
    pub kernel: Kernel,
    /// Serve `attend_merged` too (the `mma` kernel's merged-heads epilogue).
    pub merged_output: bool,
}

impl CudaFusedAttention {
    /// Whether the kernel takes these q, k, v.
    fn takes(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        let dtype = q.dtype();
        q.device().is_cuda()
            && matches!(dtype, DType::BF16 | DType::F16)
            && k.dtype() == dtype
            && v.dtype() == dtype
            && q.dims().len() == 4
            && q.dim(3).is_ok_and(|d| d <= MAX_HEAD_DIM && d > 0)
            && k.dims() == v.dims()
            && k.dim(2).is_ok_and(|s| s > 0)
    }
}

impl FusedAttention for CudaFusedAttention {
    fn name(&self) -> &'static str {
        match (self.kernel, self.merged_output) {
            (Kernel::Wmma, _) => "cuda-fused (wmma)",
            (Kernel::Mma, false) => "cuda-fused (mma)",
            (Kernel::Mma, true) => "cuda-fused (mma, merged-heads epilogue)",
            (Kernel::MmaPipelined, false) => "cuda-fused (mma, cp.async)",
            (Kernel::MmaPipelined, true) => "cuda-fused (mma, cp.async, merged-heads epilogue)",
        }
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Option<ipaflux_core::Result<Tensor>> {
        Self::takes(q, k, v).then(|| fused(q, k, v, self.kernel))
    }

    fn attend_merged(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        add: Option<(&Tensor, f64)>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        let (b, h, l, d) = q.dims4().ok()?;
        let base_ok = add.is_none_or(|(base, _)| base.dtype() == q.dtype() && base.dims() == [b, l, h * d]);
        let ok = self.merged_output && self.kernel.has_epilogue() && base_ok && Self::takes(q, k, v);
        ok.then(|| {
            let add = add.map(|(base, s)| Ok::<_, candle::Error>((base.contiguous()?, s as f32))).transpose()?;
            fused_with(q, k, v, self.kernel, Epilogue { merged: true, add })
        })
    }
}

/// Where and how the kernel stores its result (module docs).
struct Epilogue {
    /// `[B, L, H·D]` instead of `[B, H, L, D]`.
    merged: bool,
    /// `base + scale · attention`, `base` in the output's layout.
    add: Option<(Tensor, f32)>,
}

/// Runs the kernel (inputs made contiguous first).
pub fn fused(q: &Tensor, k: &Tensor, v: &Tensor, kernel: Kernel) -> ipaflux_core::Result<Tensor> {
    fused_with(q, k, v, kernel, Epilogue { merged: false, add: None })
}

fn fused_with(q: &Tensor, k: &Tensor, v: &Tensor, kernel: Kernel, epilogue: Epilogue) -> ipaflux_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (kb, kh, s, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims4()? != (b, h, s, d) {
        return Err(ipaflux_core::Error::Shape(format!(
            "fused attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if !kernel.has_epilogue() && (epilogue.merged || epilogue.add.is_some()) {
        return Err(ipaflux_core::Error::Unsupported("the wmma attention kernel writes [B, H, L, D] only".into()));
    }
    let op = AttentionOp { b, h, l, s, d, kernel, epilogue };
    Ok(q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?)
}

/// Dynamic shared memory of one block for head size `d` and element size `elem`:
/// K and V tiles (the first also stages Q), scores f32, probabilities, output
/// accumulator f32; every row padded by 16 bytes as in `attention.cu`.
fn shared_bytes(d: usize, elem: usize) -> usize {
    let dp = d.div_ceil(16) * 16;
    2 * BC * (dp + 8) * elem + BR * (BC + 4) * 4 + BR * (BC + 8) * elem + BR * (dp + 4) * 4
}

struct AttentionOp {
    b: usize,
    h: usize,
    l: usize,
    s: usize,
    d: usize,
    kernel: Kernel,
    epilogue: Epilogue,
}

fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle::Error {
    candle::Error::Cuda(Box::new(e))
}

impl AttentionOp {
    fn launch<T: CudaDType + DeviceRepr + candle::WithDType>(
        &self,
        dev: &CudaDevice,
        (q, lq): (&CudaSlice<T>, &Layout),
        (k, lk): (&CudaSlice<T>, &Layout),
        (v, lv): (&CudaSlice<T>, &Layout),
    ) -> candle::Result<(CudaStorage, Shape)> {
        let range = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| candle::Error::Msg("fused attention needs contiguous inputs".into()))
        };
        let ((q0, q1), (k0, k1), (v0, v1)) = (range(lq)?, range(lk)?, range(lv)?);
        // 16-byte loads need rows and slices on 8-element boundaries (allocations are 256-byte aligned).
        let vec = self.d % 8 == 0 && [q0, k0, v0].iter().all(|o| o % 8 == 0) && size_of::<T>() == 2;
        let vec_loads = i32::from(vec);
        let kernel = self.kernel.effective(vec);
        let (q, k, v) = (q.slice(q0..q1), k.slice(k0..k1), v.slice(v0..v1));
        let func = dev.get_or_load_custom_func(kernel.entry(T::DTYPE), "ipaflux_attention", PTX)?;
        let smem = kernel.shared_bytes(self.d, size_of::<T>());
        let smem_i32 = i32::try_from(smem).map_err(|_| candle::Error::Msg("fused attention: shared memory".into()))?;
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_i32)
            .map_err(cuda_err)?;
        let bh = self.b * self.h;
        // SAFETY: every element is written by the kernel (rows < L, columns < D).
        let out = unsafe { dev.alloc::<T>(bh * self.l * self.d) }?;
        let to_i32 =
            |x: usize| i32::try_from(x).map_err(|_| candle::Error::Msg("fused attention: size over i32".into()));
        let (l, s, d, dp) = (to_i32(self.l)?, to_i32(self.s)?, to_i32(self.d)?, to_i32(self.d.div_ceil(16) * 16)?);
        let scale_log2 = (1.0 / (self.d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let grid_x = u32::try_from(self.l.div_ceil(BR)).map_err(|_| candle::Error::Msg("fused attention: L".into()))?;
        let grid_y = u32::try_from(bh).map_err(|_| candle::Error::Msg("fused attention: B·H".into()))?;
        let cfg =
            LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 };
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&out).arg(&l).arg(&s).arg(&d).arg(&dp).arg(&scale_log2).arg(&vec_loads);
        // Version 3's epilogue arguments (the mma kernel only).
        let guard = self.epilogue.add.as_ref().map(|(base, _)| base.storage_and_layout());
        let base = match guard.as_ref().map(|(g, lb)| (&**g, *lb)) {
            Some((Storage::Cuda(st), lb)) => {
                let (b0, b1) = range(lb)?;
                Some(st.as_cuda_slice::<T>()?.slice(b0..b1))
            }
            Some(_) => return Err(candle::Error::Msg("fused attention: base not on the CUDA device".into())),
            None => None,
        };
        if base.as_ref().is_some_and(|b| b.len() != bh * self.l * self.d) {
            return Err(candle::Error::Msg("fused attention: base does not match the output".into()));
        }
        let (h, merged, has_base) =
            (to_i32(self.h)?, i32::from(self.epilogue.merged), i32::from(self.epilogue.add.is_some()));
        let out_scale = self.epilogue.add.as_ref().map_or(1.0, |(_, s)| *s);
        if kernel.has_epilogue() {
            builder.arg(&h).arg(&merged);
            match &base {
                Some(bv) => builder.arg(bv),
                None => builder.arg(&q), // not read
            };
            builder.arg(&has_base).arg(&out_scale);
        }
        // SAFETY: the arguments match the kernel's signature in attention.cu;
        // q/k/v/out hold B·H·L·D, B·H·S·D, B·H·S·D, B·H·L·D elements (checked
        // shapes, contiguous slices), base as many when read (checked above),
        // and the grid covers exactly L rows × B·H.
        unsafe { builder.launch(cfg) }.map_err(cuda_err)?;
        let shape = if self.epilogue.merged {
            Shape::from((self.b, self.l, self.h * self.d))
        } else {
            Shape::from((self.b, self.h, self.l, self.d))
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ipaflux-fused-attention"
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
        Err(candle::Error::Msg("the fused attention runs on CUDA only; the CPU uses the reference path".into()))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle::Result<(CudaStorage, Shape)> {
        use ipaflux_core::candle_core::backend::BackendStorage;
        let dev = q.device().clone();
        match q.dtype() {
            DType::BF16 => self.launch::<half::bf16>(
                &dev,
                (q.as_cuda_slice()?, lq),
                (k.as_cuda_slice()?, lk),
                (v.as_cuda_slice()?, lv),
            ),
            DType::F16 => self.launch::<half::f16>(
                &dev,
                (q.as_cuda_slice()?, lq),
                (k.as_cuda_slice()?, lk),
                (v.as_cuda_slice()?, lv),
            ),
            other => Err(candle::Error::Msg(format!("the fused attention takes bf16 or f16, not {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_hopper_and_ampere() {
        // 227 KiB per block on H100/H200, 163 KiB on A100; 2 blocks per SM on Hopper at D = 128.
        assert_eq!(shared_bytes(128, 2), 2 * 64 * 136 * 2 + 64 * 68 * 4 + 64 * 72 * 2 + 64 * 132 * 4);
        assert_eq!(shared_bytes(72, 2), 2 * 64 * 88 * 2 + 64 * 68 * 4 + 64 * 72 * 2 + 64 * 84 * 4);
        assert!(2 * shared_bytes(MAX_HEAD_DIM, 2) <= 227 * 1024);
        assert_eq!(Kernel::Mma.shared_bytes(128, 2), 2 * 64 * 136 * 2);
        assert_eq!(Kernel::Mma.shared_bytes(72, 2), 2 * 64 * 88 * 2);
        assert_eq!(Kernel::Wmma.shared_bytes(72, 2), shared_bytes(72, 2));
        // Two stages of K and V; 3 blocks per SM still fit Hopper's 227 KiB at D = 128.
        assert_eq!(Kernel::MmaPipelined.shared_bytes(128, 2), 4 * 64 * 136 * 2);
        assert!(3 * Kernel::MmaPipelined.shared_bytes(MAX_HEAD_DIM, 2) <= 227 * 1024);
        assert_eq!(Kernel::MmaPipelined.effective(false), Kernel::Mma);
    }

    #[test]
    fn each_kernel_has_its_entry_points_in_the_ptx() {
        for kernel in [Kernel::Wmma, Kernel::Mma, Kernel::MmaPipelined] {
            for dtype in [DType::BF16, DType::F16] {
                let entry = kernel.entry(dtype);
                assert!(PTX.contains(&format!(".entry {entry}(")), "{entry} missing from the PTX");
            }
        }
    }
}
