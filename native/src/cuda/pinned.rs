//! Offloading GPU tensors to page-locked (pinned) host memory and back.
//!
//! Pageable host memory is copied by the driver through a staging buffer, at
//! a third or less of the link's speed; pinned memory is copied by DMA
//! directly. A [`PinnedStash`] allocates its pinned buffers once (pinning is
//! slow, like ComfyUI's pinned offload buffers it is kept for the model's
//! lifetime), then [`PinnedStash::offload`] and [`PinnedStash::reload`] move a
//! model's named tensors between the GPU and those buffers on the device's
//! stream, synchronising once per move. The registry decides *when* to move
//! (its `Move`s); this type is how an owner moves.

use std::collections::HashMap;

use half::{bf16, f16};
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::op::BackpropOp;
use ipaflux_core::candle_core::{self as candle, DType, Device, Shape, Storage, Tensor};

/// One pinned buffer, by element type.
pub(crate) enum Host {
    BF16(PinnedHostSlice<bf16>),
    F16(PinnedHostSlice<f16>),
    F32(PinnedHostSlice<f32>),
}

impl Host {
    /// A pinned buffer for `n` elements of `dtype`; `what` names the tensor in the error.
    pub(crate) fn alloc(ctx: &std::sync::Arc<CudaContext>, dtype: DType, n: usize, what: &str) -> candle::Result<Self> {
        Ok(match dtype {
            DType::BF16 => Self::BF16(pinned(ctx, n)?),
            DType::F16 => Self::F16(pinned(ctx, n)?),
            DType::F32 => Self::F32(pinned(ctx, n)?),
            other => {
                return Err(candle::Error::Msg(format!("pinned buffers hold bf16, f16 or f32, not {other:?} ({what})")))
            }
        })
    }

    /// Copies the contiguous tensor `t` (same dtype and size) in: from the
    /// GPU on `dev`'s stream (asynchronously), from host memory at once.
    pub(crate) fn fill(&mut self, dev: &CudaDevice, t: &Tensor) -> candle::Result<()> {
        match self {
            Self::BF16(h) => fill(dev, t, h),
            Self::F16(h) => fill(dev, t, h),
            Self::F32(h) => fill(dev, t, h),
        }
    }
}

fn fill<T: CudaDType + DeviceRepr + ValidAsZeroBits + candle::WithDType>(
    dev: &CudaDevice,
    t: &Tensor,
    host: &mut PinnedHostSlice<T>,
) -> candle::Result<()> {
    if t.device().is_cuda() {
        return copy_out(dev, t, host);
    }
    let values = t.flatten_all()?.to_vec1::<T>()?;
    let dst = host.as_mut_slice().map_err(cuda_err)?;
    if dst.len() != values.len() {
        return Err(candle::Error::Msg("pinned buffer of another size".into()));
    }
    dst.copy_from_slice(&values);
    Ok(())
}

struct Entry {
    shape: Shape,
    host: Host,
}

/// Pinned host copies of a set of named GPU tensors.
pub struct PinnedStash {
    entries: Vec<(String, Entry)>,
    device: CudaDevice,
    bytes: u64,
}

impl std::fmt::Debug for PinnedStash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedStash").field("tensors", &self.entries.len()).field("bytes", &self.bytes).finish()
    }
}

pub(crate) fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> candle::Error {
    candle::Error::Cuda(Box::new(e))
}

pub(crate) fn cuda_device(device: &Device) -> candle::Result<CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(candle::Error::Msg(format!("pinned offload needs a CUDA device, not {other:?}"))),
    }
}

fn pinned<T: DeviceRepr>(ctx: &std::sync::Arc<CudaContext>, n: usize) -> candle::Result<PinnedHostSlice<T>> {
    // SAFETY: the buffer is only written by device copies before it is read.
    // Flags 0: ordinary (not write-combined) pinned memory, fast in both directions.
    unsafe { ctx.alloc_pinned_with_flags::<T>(n, 0) }.map_err(cuda_err)
}

/// Copies the contiguous elements of a CUDA tensor into `host` (asynchronously).
fn copy_out<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    t: &Tensor,
    host: &mut PinnedHostSlice<T>,
) -> candle::Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(candle::Error::Msg("pinned offload: tensor is not on a CUDA device".into()));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle::Error::Msg("pinned offload: tensor is not contiguous".into()))?;
    let src = cs.as_cuda_slice::<T>()?.slice(a..b);
    dev.cuda_stream().memcpy_dtoh(&src, host).map_err(cuda_err)
}

fn copy_in<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    host: &PinnedHostSlice<T>,
    shape: &Shape,
) -> candle::Result<Tensor> {
    let slice: CudaSlice<T> = dev.cuda_stream().clone_htod(host).map_err(cuda_err)?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Ok(Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false))
}

impl PinnedStash {
    /// Pins host buffers for `tensors` (CUDA, contiguous, bf16/f16/f32) and
    /// copies them out: the first offload. The GPU copies stay the caller's.
    pub fn new(tensors: &HashMap<String, Tensor>) -> candle::Result<Self> {
        let first = tensors.values().next().ok_or_else(|| candle::Error::Msg("pinned offload of nothing".into()))?;
        let device = cuda_device(first.device())?;
        let ctx = device.cuda_stream().context().clone();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut bytes = 0u64;
        for name in names {
            let t = &tensors[name];
            let n = t.elem_count();
            let host = Host::alloc(&ctx, t.dtype(), n, name)?;
            bytes += (n * t.dtype().size_in_bytes()) as u64;
            entries.push((name.clone(), Entry { shape: t.shape().clone(), host }));
        }
        let mut stash = Self { entries, device, bytes };
        stash.offload(tensors)?;
        Ok(stash)
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Copies the current GPU values of the same tensors into the pinned
    /// buffers (GPU → host), then waits for the copies. The caller drops its
    /// GPU tensors afterwards to free the memory.
    pub fn offload(&mut self, tensors: &HashMap<String, Tensor>) -> candle::Result<()> {
        let dev = self.device.clone();
        for (name, e) in &mut self.entries {
            let t = tensors.get(name).ok_or_else(|| candle::Error::Msg(format!("pinned offload: `{name}` missing")))?;
            if t.shape() != &e.shape {
                return Err(candle::Error::Msg(format!("pinned offload: `{name}` changed shape")));
            }
            e.host.fill(&dev, t)?;
        }
        dev.cuda_stream().synchronize().map_err(cuda_err)
    }

    /// New GPU tensors from the pinned buffers (host → GPU), after waiting for the copies.
    pub fn reload(&self) -> candle::Result<HashMap<String, Tensor>> {
        let dev = &self.device;
        let mut out = HashMap::with_capacity(self.entries.len());
        for (name, e) in &self.entries {
            let t = match &e.host {
                Host::BF16(h) => copy_in(dev, h, &e.shape)?,
                Host::F16(h) => copy_in(dev, h, &e.shape)?,
                Host::F32(h) => copy_in(dev, h, &e.shape)?,
            };
            out.insert(name.clone(), t);
        }
        dev.cuda_stream().synchronize().map_err(cuda_err)?;
        Ok(out)
    }
}
