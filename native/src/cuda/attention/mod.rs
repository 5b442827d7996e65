//! Fused attention on CUDA ([`attention.cu`](attention.cu)): bf16/f16 q, k, v
//! `[B, H, L|S, D]` with D ≤ 128, online softmax over key tiles on tensor
//! cores, so no `[L, S]` score matrix ever exists in GPU memory: the extra
//! memory of a call is its output. f32 inputs, other devices and larger heads
//! are declined (`None`), and the caller runs core's reference `sdpa`.
//!
//! Versions of the kernel ([`Kernel`]): `wmma` (the first: WMMA, scores,
//! probabilities and output accumulator through shared memory every tile),
//! `mma` (version 3, the baseline set's: `mma.sync` fragments kept in
//! registers, FlashAttention-2's layout), `mma` with `cp.async` double
//! buffering of the K/V tiles (version 4), and two ways to 128 query rows a
//! block instead of 64, so each K/V tile fetched serves twice the rows:
//! version 5 is version 4 with 8 warps, version 6 (the fast set's, the
//! fastest at every shape on an H200 in session 11: 1.69 ms against version
//! 3's 3.11 ms at Flux 1024²) keeps 4 warps of 32 rows each, so each K/V
//! fragment read from shared memory feeds two products. Version 7 (session
//! 12, not yet run on a GPU, so not in a kernel set) is version 6 with its
//! Q tile fetched asynchronously beside the first K/V tiles and its results
//! written as whole 16-byte row pieces through shared memory, for the fixed
//! cost of a launch over few keys (the IP-Adapter's 128: 0.24 ms at 1024²
//! on an H200, most of it outside the key loop). Version 8 (session 13, not
//! yet run on a GPU either) moves the products onto Hopper's `wgmma`
//! (FlashAttention-3's instruction: a warpgroup's 64 × N × 16 product,
//! issued once and run asynchronously, operands read from shared memory by
//! descriptor), at head size 128; it is compiled for `compute_90a` into a
//! module of its own. `ipaflux gpu-check` checks and times all of them.
//!
//! With [`Output::Merged`] (the fast set; `mma` versions only) the kernel
//! also serves core's `attend_merged`: it writes `[B, L, H·D]` directly (no
//! transpose copy after it) and can add its result, scaled, to a given
//! tensor in the same store (the IP-Adapter's term added to a block's
//! attention output). It also serves `attend_merged_extra`: the `_ip` entry
//! points run the IP-Adapter's attention over its 128 image tokens in the
//! same launch as the block's attention (a second softmax over those keys
//! with the pre-RoPE query, added to the stored result), instead of a second
//! launch after it, where the output is [`Output::MergedFusedExtra`]. The
//! fast set does not take that: on an H200 (session 11) version 6's `_ip`
//! entry added more to a launch (0.30 ms at 1024²) than the second launch
//! costs (0.21 ms), and 14.2 ms to a step against 10.8 ms. All of it is
//! checked on the GPU by `gpu-check`, and without one on the host under an
//! emulation of `ldmatrix`, `mma.sync`, `wgmma` and `cp.async`
//! (`host_emulation.cpp` beside the kernel).
//!
//! The kernel is compiled to PTX by nvcc at build time (`build.rs`, for
//! `CUDA_COMPUTE_CAP`, default 90) and loaded by candle's CUDA device on first
//! use. Parity with the reference path is checked on the GPU by
//! `ipaflux gpu-check` (see `scripts/gpu-check.sh`).

use std::mem::size_of;

use ipaflux_core::candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::{self as candle, CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use ipaflux_core::nn::{ExtraAttention, FusedAttention};

/// The PTX nvcc made of `attention.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// Version 8 alone, for `compute_90a` (empty where the build targets
/// another compute capability: `build.rs`).
const WGMMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_wgmma.ptx"));
/// The only head size version 8 takes (its instruction's N).
const WGMMA_HEAD_DIM: usize = 128;
/// Query rows per thread block (4 warps × 16), keys per tile, threads per block
/// of versions 1–4: must match `BR`, `BC`, `THREADS` in `attention.cu`.
const BR: usize = 64;
const BC: usize = 64;
const THREADS: u32 = 128;
/// Largest head size the kernel takes (its tiles are sized for it).
pub const MAX_HEAD_DIM: usize = 128;

/// Which version of the kernel (module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Version 2: WMMA, per-tile intermediates in shared memory.
    Wmma,
    /// Version 3: `mma.sync` with scores and output in registers.
    #[default]
    Mma,
    /// Version 4: `Mma` with the K/V tiles
    /// double-buffered by `cp.async`, the next tile's copy overlapping this
    /// tile's products. Where 16-byte loads do not apply it runs as `Mma`.
    MmaPipelined,
    /// Version 5: `MmaPipelined` with 8
    /// warps, 128 query rows a block, so each K/V tile fetched serves twice
    /// the rows (one block an SM at 168 registers a thread instead of
    /// three of 4 warps). Where 16-byte loads do not apply it runs as `Mma`.
    MmaPipelinedWide,
    /// Version 6 (the fast set's): 4 warps of 32 query rows
    /// (two 16-row tiles each), 128 a block, K/V double-buffered as version
    /// 4; the Q tile stays in shared memory and its fragments are re-read
    /// each key tile. 255 registers, no spills; two blocks an SM. Where
    /// 16-byte loads do not apply it runs as `Mma`.
    MmaTwoTiles,
    /// Version 7: `MmaTwoTiles` with the Q tile fetched by `cp.async`
    /// together with the first K/V tiles, and results leaving through
    /// shared memory in 16-byte row stores (version 6 stores 2-byte
    /// fragment elements, 8 of each 32-byte sector). The same values as
    /// version 6, bit for bit (host emulation). Where 16-byte loads do not
    /// apply it runs as `Mma`; where `base` is not 16-byte aligned, as
    /// `MmaTwoTiles`.
    MmaTwoTilesStaged,
    /// Version 8 (Hopper only): the products on `wgmma` (warpgroup MMA, as
    /// FlashAttention-3, without its warp specialisation and TMA), two
    /// warpgroups of 64 rows a block, K/V double-buffered by `cp.async` in
    /// wgmma's canonical shared-memory layout, results out through version
    /// 7's staged 16-byte stores. Head size 128 on a compute
    /// capability 9.0 device only; elsewhere, and where the build has no
    /// `compute_90a` PTX, it runs as `MmaTwoTiles`.
    Wgmma,
}

impl Kernel {
    /// The kernel version a call runs: versions 4 to 8 need the 16-byte
    /// loads, versions 7 and 8 also 16-byte aligned rows of `base` (their
    /// stores), version 8 head size 128, its PTX and a compute capability 9.0 device
    /// (`sm_90a` code runs there only; [`Self::on_device`]).
    fn effective(self, vec_loads: bool, vec_base: bool, d: usize) -> Self {
        match self {
            Self::MmaPipelined | Self::MmaPipelinedWide | Self::MmaTwoTiles | Self::MmaTwoTilesStaged | Self::Wgmma
                if !vec_loads =>
            {
                Self::Mma
            }
            Self::MmaTwoTilesStaged if !vec_base => Self::MmaTwoTiles,
            Self::Wgmma if !vec_base || d != WGMMA_HEAD_DIM || WGMMA_PTX.is_empty() => Self::MmaTwoTiles,
            other => other,
        }
    }

    /// As [`Self::effective`] on `dev`: version 8 only on compute capability 9.0.
    fn on_device(self, dev: &CudaDevice, vec_loads: bool, vec_base: bool, d: usize) -> Self {
        let hopper = || dev.cuda_stream().context().compute_capability().is_ok_and(|cc| cc == (9, 0));
        match self.effective(vec_loads, vec_base, d) {
            Self::Wgmma if !hopper() => Self::MmaTwoTiles,
            other => other,
        }
    }

    /// The module its entry points are in: (name, PTX).
    fn module(self) -> (&'static str, &'static str) {
        if self == Self::Wgmma {
            ("ipaflux_attention_wgmma", WGMMA_PTX)
        } else {
            ("ipaflux_attention", PTX)
        }
    }

    /// The entry point; `ip`: the one with the extra (IP) attention
    /// (versions 3 to 6).
    fn entry(self, dtype: DType, ip: bool) -> &'static str {
        let f16 = dtype == DType::F16;
        match (self, ip) {
            (Self::Wmma, _) => ["ipaflux_attention_bf16", "ipaflux_attention_f16"][usize::from(f16)],
            (Self::Mma, false) => ["ipaflux_attention2_bf16", "ipaflux_attention2_f16"][usize::from(f16)],
            (Self::Mma, true) => ["ipaflux_attention2_ip_bf16", "ipaflux_attention2_ip_f16"][usize::from(f16)],
            (Self::MmaPipelined, false) => ["ipaflux_attention4_bf16", "ipaflux_attention4_f16"][usize::from(f16)],
            (Self::MmaPipelined, true) => ["ipaflux_attention4_ip_bf16", "ipaflux_attention4_ip_f16"][usize::from(f16)],
            (Self::MmaPipelinedWide, false) => ["ipaflux_attention5_bf16", "ipaflux_attention5_f16"][usize::from(f16)],
            (Self::MmaPipelinedWide, true) => {
                ["ipaflux_attention5_ip_bf16", "ipaflux_attention5_ip_f16"][usize::from(f16)]
            }
            (Self::MmaTwoTiles, false) => ["ipaflux_attention6_bf16", "ipaflux_attention6_f16"][usize::from(f16)],
            (Self::MmaTwoTiles, true) => ["ipaflux_attention6_ip_bf16", "ipaflux_attention6_ip_f16"][usize::from(f16)],
            (Self::MmaTwoTilesStaged, false) => ["ipaflux_attention7_bf16", "ipaflux_attention7_f16"][usize::from(f16)],
            (Self::MmaTwoTilesStaged, true) => {
                ["ipaflux_attention7_ip_bf16", "ipaflux_attention7_ip_f16"][usize::from(f16)]
            }
            (Self::Wgmma, false) => ["ipaflux_attention8_bf16", "ipaflux_attention8_f16"][usize::from(f16)],
            (Self::Wgmma, true) => ["ipaflux_attention8_ip_bf16", "ipaflux_attention8_ip_f16"][usize::from(f16)],
        }
    }

    /// Threads of one block (32 per warp, each warp 16 query rows; 32 in versions 6 and 7).
    fn threads(self) -> u32 {
        if matches!(self, Self::MmaPipelinedWide | Self::Wgmma) {
            2 * THREADS
        } else {
            THREADS
        }
    }

    /// Query rows of one block.
    fn rows(self) -> usize {
        match self {
            Self::MmaTwoTiles | Self::MmaTwoTilesStaged => 2 * BR,
            other => other.threads() as usize / 2,
        }
    }

    /// Dynamic shared memory of one block for head size `d` and element size `elem`.
    fn shared_bytes(self, d: usize, elem: usize) -> usize {
        // One K and one V tile, rows padded by 16 bytes (the first also stages Q).
        let row = (d.div_ceil(16) * 16 + 8) * elem;
        let pair = 2 * BC * row;
        match self {
            Self::Wmma => shared_bytes(d, elem),
            Self::Mma => pair,
            // The 128-row Q tile of version 5 is staged in the first K/V pair (its size).
            Self::MmaPipelined | Self::MmaPipelinedWide => 2 * pair,
            // The 128-row Q tile for the whole call, then two stages (version
            // 7's f32 staging rows overlay them after the key loop).
            Self::MmaTwoTiles | Self::MmaTwoTilesStaged => self.rows() * row + 2 * pair,
            // The same without padding (wgmma's canonical layout has none).
            Self::Wgmma => (self.rows() + 4 * BC) * d.div_ceil(16) * 16 * elem,
        }
    }

    /// Takes the merged-heads / add epilogue (versions 3 to 6).
    fn has_epilogue(self) -> bool {
        self != Self::Wmma
    }
}

/// The fused CUDA attention as core's [`FusedAttention`].
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaFusedAttention {
    pub kernel: Kernel,
    pub output: Output,
}

/// What a [`CudaFusedAttention`] serves besides `[B, H, L, D]` attention.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `attend` only.
    #[default]
    Heads,
    /// Also `attend_merged` (the `mma` kernels' merged-heads epilogue, with
    /// `base + s·attention`); an extra term takes a second launch.
    Merged,
    /// Also `attend_merged_extra`: an extra term (the IP-Adapter's) in the
    /// same launch, the `_ip` entry points.
    MergedFusedExtra,
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
        use Output::{Heads, Merged, MergedFusedExtra as Fused};
        match (self.kernel, self.output) {
            (Kernel::Wmma, _) => "cuda-fused (wmma)",
            (Kernel::Mma, Heads) => "cuda-fused (mma)",
            (Kernel::Mma, Merged) => "cuda-fused (mma, merged-heads epilogue)",
            (Kernel::Mma, Fused) => "cuda-fused (mma, merged-heads epilogue, IP term in the launch)",
            (Kernel::MmaPipelined, Heads) => "cuda-fused (mma, cp.async)",
            (Kernel::MmaPipelined, Merged) => "cuda-fused (mma, cp.async, merged-heads epilogue)",
            (Kernel::MmaPipelined, Fused) => "cuda-fused (mma, cp.async, merged-heads epilogue, IP term in the launch)",
            (Kernel::MmaPipelinedWide, Heads) => "cuda-fused (mma, cp.async, 128 rows)",
            (Kernel::MmaPipelinedWide, Merged) => "cuda-fused (mma, cp.async, 128 rows, merged-heads epilogue)",
            (Kernel::MmaPipelinedWide, Fused) => {
                "cuda-fused (mma, cp.async, 128 rows, merged-heads epilogue, IP term in the launch)"
            }
            (Kernel::MmaTwoTiles, Heads) => "cuda-fused (mma, cp.async, 32 rows a warp)",
            (Kernel::MmaTwoTiles, Merged) => "cuda-fused (mma, cp.async, 32 rows a warp, merged-heads epilogue)",
            (Kernel::MmaTwoTiles, Fused) => {
                "cuda-fused (mma, cp.async, 32 rows a warp, merged-heads epilogue, IP term in the launch)"
            }
            (Kernel::MmaTwoTilesStaged, Heads) => "cuda-fused (version 7: 32 rows a warp, 16-byte stores)",
            (Kernel::MmaTwoTilesStaged, Merged) => {
                "cuda-fused (version 7: 32 rows a warp, 16-byte stores, merged-heads epilogue)"
            }
            (Kernel::MmaTwoTilesStaged, Fused) => {
                "cuda-fused (version 7: 32 rows a warp, 16-byte stores, merged-heads epilogue, IP term in the launch)"
            }
            (Kernel::Wgmma, Heads) => "cuda-fused (version 8: wgmma at D = 128, else version 6)",
            (Kernel::Wgmma, Merged) => {
                "cuda-fused (version 8: wgmma at D = 128, else version 6; merged-heads epilogue)"
            }
            (Kernel::Wgmma, Fused) => {
                "cuda-fused (version 8: wgmma at D = 128, else version 6; merged-heads epilogue, IP term in the launch)"
            }
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
        let ok = self.output != Output::Heads && self.kernel.has_epilogue() && base_ok && Self::takes(q, k, v);
        ok.then(|| {
            let add = add.map(|(base, s)| Ok::<_, candle::Error>((base.contiguous()?, s as f32))).transpose()?;
            fused_with(q, k, v, self.kernel, Epilogue { merged: true, add, extra: None })
        })
    }

    fn attend_merged_extra(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        x: &ExtraAttention<'_>,
    ) -> Option<ipaflux_core::Result<Tensor>> {
        let (b, h, l, d) = q.dims4().ok()?;
        let fits = x.q.dims() == q.dims()
            && x.q.dtype() == q.dtype()
            && x.k.dims4().is_ok_and(|(xb, xh, _, xd)| (xb, xh, xd) == (b, h, d))
            && x.row0 <= l;
        let ok = self.takes_extra() && fits && Self::takes(q, k, v) && Self::takes(x.q, x.k, x.v);
        ok.then(|| {
            let extra = Extra {
                q: x.q.contiguous()?,
                k: x.k.contiguous()?,
                v: x.v.contiguous()?,
                row0: x.row0,
                scale: x.scale as f32,
            };
            fused_with(q, k, v, self.kernel, Epilogue { merged: true, add: None, extra: Some(extra) })
        })
    }

    fn takes_extra(&self) -> bool {
        self.output == Output::MergedFusedExtra && self.kernel.has_epilogue()
    }
}

/// Where and how the kernel stores its result (module docs).
struct Epilogue {
    /// `[B, L, H·D]` instead of `[B, H, L, D]`.
    merged: bool,
    /// `base + scale · attention`, `base` in the output's layout.
    add: Option<(Tensor, f32)>,
    /// A second attention added to rows `row0..` (core's [`ExtraAttention`]).
    extra: Option<Extra>,
}

/// [`ExtraAttention`] with its tensors made contiguous.
struct Extra {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row0: usize,
    scale: f32,
}

/// Runs the kernel (inputs made contiguous first).
pub fn fused(q: &Tensor, k: &Tensor, v: &Tensor, kernel: Kernel) -> ipaflux_core::Result<Tensor> {
    fused_with(q, k, v, kernel, Epilogue { merged: false, add: None, extra: None })
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
    if !kernel.has_epilogue() && (epilogue.merged || epilogue.add.is_some() || epilogue.extra.is_some()) {
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

/// A contiguous CUDA tensor's `n` elements (its storage read-locked by the
/// caller), and their offset in the storage (for the 16-byte-load test).
fn view_of<'a, T: CudaDType + DeviceRepr>(
    (storage, layout): (&'a Storage, &Layout),
    n: usize,
    what: &str,
) -> candle::Result<(CudaView<'a, T>, usize)> {
    let Storage::Cuda(st) = storage else {
        return Err(candle::Error::Msg(format!("fused attention: {what} is not on the CUDA device")));
    };
    match layout.contiguous_offsets() {
        Some((a, b)) if b - a == n => Ok((st.as_cuda_slice::<T>()?.slice(a..b), a)),
        _ => Err(candle::Error::Msg(format!("fused attention: {what} is not a contiguous {n}-element tensor"))),
    }
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
        let (q, k, v) = (q.slice(q0..q1), k.slice(k0..k1), v.slice(v0..v1));
        let bh = self.b * self.h;
        let (n_out, s_ip) = (bh * self.l * self.d, self.epilogue.extra.as_ref().map_or(Ok(0), |x| x.k.dim(2))?);
        // Operands that are not inputs of the op, read-locked for the launch.
        let base_held = self.epilogue.add.as_ref().map(|(base, _)| base.storage_and_layout());
        let (base, base_offset) = match &base_held {
            Some((g, l)) => {
                let (view, offset) = view_of::<T>((g, l), n_out, "base")?;
                (Some(view), offset)
            }
            None => (None, 0),
        };
        let extra_held = self.epilogue.extra.as_ref().map(|x| [&x.q, &x.k, &x.v].map(|t| t.storage_and_layout()));
        let (extra, extra_offsets) = match &extra_held {
            Some([xq, xk, xv]) => {
                let (q, qo) = view_of::<T>((&xq.0, xq.1), n_out, "the extra attention's q")?;
                let (k, ko) = view_of::<T>((&xk.0, xk.1), bh * s_ip * self.d, "the extra attention's k")?;
                let (v, vo) = view_of::<T>((&xv.0, xv.1), bh * s_ip * self.d, "the extra attention's v")?;
                (Some([q, k, v]), vec![qo, ko, vo])
            }
            None => (None, Vec::new()),
        };
        // 16-byte loads need rows and slices on 8-element boundaries (allocations are 256-byte aligned).
        let aligned = [q0, k0, v0].into_iter().chain(extra_offsets).all(|o| o % 8 == 0);
        let vec = self.d % 8 == 0 && aligned && size_of::<T>() == 2;
        let vec_loads = i32::from(vec);
        let kernel = self.kernel.on_device(dev, vec, base_offset % 8 == 0, self.d);
        let (module, ptx) = kernel.module();
        let func = dev.get_or_load_custom_func(kernel.entry(T::DTYPE, extra.is_some()), module, ptx)?;
        let smem = kernel.shared_bytes(self.d, size_of::<T>());
        let smem_i32 = i32::try_from(smem).map_err(|_| candle::Error::Msg("fused attention: shared memory".into()))?;
        func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_i32)
            .map_err(cuda_err)?;
        // SAFETY: every element is written by the kernel (rows < L, columns < D).
        let out = unsafe { dev.alloc::<T>(n_out) }?;
        let to_i32 =
            |x: usize| i32::try_from(x).map_err(|_| candle::Error::Msg("fused attention: size over i32".into()));
        let (l, s, d, dp) = (to_i32(self.l)?, to_i32(self.s)?, to_i32(self.d)?, to_i32(self.d.div_ceil(16) * 16)?);
        let scale_log2 = (1.0 / (self.d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let grid_x = u32::try_from(self.l.div_ceil(kernel.rows()))
            .map_err(|_| candle::Error::Msg("fused attention: L".into()))?;
        let grid_y = u32::try_from(bh).map_err(|_| candle::Error::Msg("fused attention: B·H".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (kernel.threads(), 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut builder = func.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&out).arg(&l).arg(&s).arg(&d).arg(&dp).arg(&scale_log2).arg(&vec_loads);
        // Versions 3 to 6: the epilogue's and the extra attention's arguments.
        let (h, merged, has_base) = (to_i32(self.h)?, i32::from(self.epilogue.merged), i32::from(base.is_some()));
        let out_scale = self.epilogue.add.as_ref().map_or(1.0, |(_, s)| *s);
        let x = self.epilogue.extra.as_ref();
        let (s_ip, ip_row0, ip_scale) = (to_i32(s_ip)?, to_i32(x.map_or(0, |x| x.row0))?, x.map_or(0.0, |x| x.scale));
        let has_ip = i32::from(extra.is_some());
        if kernel.has_epilogue() {
            builder.arg(&h).arg(&merged);
            builder.arg(base.as_ref().unwrap_or(&q)); // not read without has_base
            builder.arg(&has_base).arg(&out_scale);
            match &extra {
                Some([xq, xk, xv]) => builder.arg(xq).arg(xk).arg(xv),
                None => builder.arg(&q).arg(&k).arg(&v), // not read without has_ip
            };
            builder.arg(&s_ip).arg(&ip_row0).arg(&ip_scale).arg(&has_ip);
        }
        // SAFETY: the arguments match the kernel's signature in attention.cu;
        // q/k/v/out hold B·H·L·D, B·H·S·D, B·H·S·D, B·H·L·D elements (checked
        // shapes, contiguous slices), base and the extra q as many as out, the
        // extra k and v B·H·S_ip·D (checked by view_of), and the grid covers
        // exactly L rows × B·H.
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
        assert_eq!(Kernel::MmaPipelined.effective(false, true, 128), Kernel::Mma);
        // Version 5: the same shared memory, 8 warps of 16 rows.
        assert_eq!(Kernel::MmaPipelinedWide.shared_bytes(128, 2), Kernel::MmaPipelined.shared_bytes(128, 2));
        assert!(128 * 136 * 2 <= Kernel::Mma.shared_bytes(128, 2), "the 128-row Q tile fits one K/V pair");
        assert_eq!((Kernel::MmaPipelinedWide.threads(), Kernel::MmaPipelinedWide.rows()), (256, 128));
        assert_eq!((Kernel::MmaPipelined.threads(), Kernel::MmaPipelined.rows()), (128, BR));
        assert_eq!(Kernel::MmaPipelinedWide.effective(false, true, 128), Kernel::Mma);
        // Version 6: Q tile + two stages; two blocks an SM on Hopper at D = 128.
        assert_eq!(Kernel::MmaTwoTiles.shared_bytes(128, 2), (128 + 4 * 64) * 136 * 2);
        assert!(2 * Kernel::MmaTwoTiles.shared_bytes(MAX_HEAD_DIM, 2) <= 227 * 1024);
        assert_eq!((Kernel::MmaTwoTiles.threads(), Kernel::MmaTwoTiles.rows()), (128, 128));
        assert_eq!(Kernel::MmaTwoTiles.effective(false, true, 128), Kernel::Mma);
        // Version 7: version 6's shared memory, which its f32 staging rows (128 × (DP + 8)) fit.
        for d in [72, 128] {
            let staged = Kernel::MmaTwoTilesStaged;
            assert_eq!(staged.shared_bytes(d, 2), Kernel::MmaTwoTiles.shared_bytes(d, 2));
            assert!(staged.rows() * (d.div_ceil(16) * 16 + 8) * 4 <= staged.shared_bytes(d, 2));
        }
        assert_eq!(Kernel::MmaTwoTilesStaged.effective(false, true, 128), Kernel::Mma);
        assert_eq!(Kernel::MmaTwoTilesStaged.effective(true, false, 128), Kernel::MmaTwoTiles);
        assert_eq!(Kernel::MmaTwoTilesStaged.effective(true, true, 128), Kernel::MmaTwoTilesStaged);
        assert_eq!(Kernel::MmaTwoTiles.effective(true, false, 128), Kernel::MmaTwoTiles);
        // Version 8: two warpgroups, its tiles unpadded; two blocks an SM on Hopper.
        assert_eq!(Kernel::Wgmma.shared_bytes(128, 2), (128 + 4 * 64) * 128 * 2);
        assert!(2 * Kernel::Wgmma.shared_bytes(128, 2) <= 227 * 1024);
        assert_eq!((Kernel::Wgmma.threads(), Kernel::Wgmma.rows()), (256, 128));
        assert_eq!(Kernel::Wgmma.effective(false, true, 128), Kernel::Mma);
        assert_eq!(Kernel::Wgmma.effective(true, true, 72), Kernel::MmaTwoTiles);
        assert_eq!(Kernel::Wgmma.effective(true, false, 128), Kernel::MmaTwoTiles);
        let at_128 = if WGMMA_PTX.is_empty() { Kernel::MmaTwoTiles } else { Kernel::Wgmma };
        assert_eq!(Kernel::Wgmma.effective(true, true, 128), at_128);
        // Its f32 staging rows (8 warps × 16 × (128 + 8)) fit its shared memory.
        assert!(128 * (128 + 8) * 4 <= Kernel::Wgmma.shared_bytes(128, 2));
    }

    #[test]
    fn each_kernel_has_its_entry_points_in_the_ptx() {
        for kernel in [
            Kernel::Wmma,
            Kernel::Mma,
            Kernel::MmaPipelined,
            Kernel::MmaPipelinedWide,
            Kernel::MmaTwoTiles,
            Kernel::MmaTwoTilesStaged,
            Kernel::Wgmma,
        ] {
            let (_, ptx) = kernel.module();
            if ptx.is_empty() {
                continue; // version 8 where the build targets another compute capability
            }
            for (dtype, ip) in [(DType::BF16, false), (DType::F16, false), (DType::BF16, true), (DType::F16, true)] {
                let entry = kernel.entry(dtype, ip);
                assert!(ptx.contains(&format!(".entry {entry}(")), "{entry} missing from the PTX");
            }
        }
        // Version 8 is sm_90a code in a module of its own; the other module stays plain compute_90.
        if !WGMMA_PTX.is_empty() {
            assert!(WGMMA_PTX.contains(".target sm_90a") && !WGMMA_PTX.contains("ipaflux_attention6_bf16"));
            assert!(!PTX.contains("wgmma"));
        }
        assert_eq!(Kernel::MmaPipelined.entry(DType::F16, true), "ipaflux_attention4_ip_f16");
    }
}
