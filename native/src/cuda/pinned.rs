//! Offloading GPU tensors to page-locked (pinned) host memory and back.
//!
//! Pageable host memory is copied by the driver through a staging buffer, at
//! a third or less of the link's speed; pinned memory is copied by DMA
//! directly. A [`PinnedStash`] allocates its pinned buffers once (pinning is
//! slow, like ComfyUI's pinned offload buffers it is kept for the model's
//! lifetime), then [`PinnedStash::offload`] and [`PinnedStash::reload`] move a
//! model's named tensors between the GPU and those buffers on the device's
//! stream, synchronising once per move. The stash packs all tensors of a
//! dtype into one buffer, and a reload gives them back as views into one
//! device allocation, so a move is one copy, not one per tensor. The registry decides *when* to move
//! (its `Move`s); this type is how an owner moves.

use std::collections::HashMap;

use half::{bf16, f16};
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaSlice, DeviceRepr, HostSlice, PinnedHostSlice, ValidAsZeroBits,
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

/// Where one named tensor lives in its dtype's pinned buffer.
struct Entry {
    name: String,
    shape: Shape,
    dtype: DType,
    /// Elements before it in [`Buffer::host`].
    offset: usize,
}

/// One pinned buffer holding every tensor of one dtype, back to back.
struct Buffer {
    dtype: DType,
    host: Host,
    len: usize,
}

/// Pinned host copies of a set of named GPU tensors, packed into one pinned
/// buffer per dtype. [`PinnedStash::reload`] makes one device allocation per
/// buffer and one copy, and gives the tensors back as views into it; an
/// offload of those views is again one copy. (Session 11 measured 44–47
/// GB/s offloading SigLIP's ~450 tensors one copy each against 55 GB/s for
/// one large copy; per-tensor copies and allocations are what this avoids.)
pub struct PinnedStash {
    entries: Vec<Entry>,
    buffers: Vec<Buffer>,
    device: CudaDevice,
    bytes: u64,
}

impl std::fmt::Debug for PinnedStash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedStash")
            .field("tensors", &self.entries.len())
            .field("buffers", &self.buffers.len())
            .field("bytes", &self.bytes)
            .finish()
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
fn copy_out<T: CudaDType + DeviceRepr, H: HostSlice<T> + ?Sized>(
    dev: &CudaDevice,
    t: &Tensor,
    host: &mut H,
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
    /// Pins host buffers for `tensors` (CUDA or host, contiguous,
    /// bf16/f16/f32; one buffer per dtype) and copies them out: the first
    /// offload. The GPU copies stay the caller's.
    pub fn new(tensors: &HashMap<String, Tensor>) -> candle::Result<Self> {
        let first = tensors.values().next().ok_or_else(|| candle::Error::Msg("pinned offload of nothing".into()))?;
        let device = cuda_device(first.device())?;
        let ctx = device.cuda_stream().context().clone();
        let (entries, lens) = pack(tensors.iter().map(|(name, t)| (name.as_str(), t.shape(), t.dtype())));
        let buffers = lens
            .into_iter()
            .map(|(dtype, len)| {
                let host = Host::alloc(&ctx, dtype, len, &format!("the {dtype:?} buffer"))?;
                Ok(Buffer { dtype, host, len })
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let bytes = buffers.iter().map(|b| (b.len * b.dtype.size_in_bytes()) as u64).sum();
        let mut stash = Self { entries, buffers, device, bytes };
        stash.offload(tensors)?;
        Ok(stash)
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Copies the current values of the same tensors into the pinned
    /// buffers (GPU → host), then waits for the copies: one copy per buffer
    /// when the tensors are the views [`PinnedStash::reload`] made, else one
    /// per tensor. The caller drops its GPU tensors afterwards to free the
    /// memory.
    pub fn offload(&mut self, tensors: &HashMap<String, Tensor>) -> candle::Result<()> {
        let mut parts: Vec<Vec<(&Tensor, usize)>> = vec![Vec::new(); self.buffers.len()];
        for e in &self.entries {
            let t = tensors
                .get(&e.name)
                .ok_or_else(|| candle::Error::Msg(format!("pinned offload: `{}` missing", e.name)))?;
            if t.shape() != &e.shape || t.dtype() != e.dtype {
                return Err(candle::Error::Msg(format!("pinned offload: `{}` changed shape or dtype", e.name)));
            }
            let b = self
                .buffers
                .iter()
                .position(|b| b.dtype == e.dtype)
                .ok_or_else(|| candle::Error::Msg(format!("pinned offload: no buffer for `{}`", e.name)))?;
            parts[b].push((t, e.offset));
        }
        let dev = self.device.clone();
        for (buffer, parts) in self.buffers.iter_mut().zip(&parts) {
            match &mut buffer.host {
                Host::BF16(h) => offload_into(&dev, parts, h, buffer.len)?,
                Host::F16(h) => offload_into(&dev, parts, h, buffer.len)?,
                Host::F32(h) => offload_into(&dev, parts, h, buffer.len)?,
            }
        }
        dev.cuda_stream().synchronize().map_err(cuda_err)
    }

    /// New GPU tensors from the pinned buffers (host → GPU): one allocation
    /// and one copy per buffer, the tensors views into it; waits for the
    /// copies.
    pub fn reload(&self) -> candle::Result<HashMap<String, Tensor>> {
        let dev = &self.device;
        let slabs = self
            .buffers
            .iter()
            .map(|b| match &b.host {
                Host::BF16(h) => copy_in(dev, h, &Shape::from(b.len)),
                Host::F16(h) => copy_in(dev, h, &Shape::from(b.len)),
                Host::F32(h) => copy_in(dev, h, &Shape::from(b.len)),
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let mut out = HashMap::with_capacity(self.entries.len());
        for e in &self.entries {
            let slab = self
                .buffers
                .iter()
                .zip(&slabs)
                .find(|(b, _)| b.dtype == e.dtype)
                .map(|(_, s)| s)
                .ok_or_else(|| candle::Error::Msg(format!("pinned reload: no buffer for `{}`", e.name)))?;
            let view = slab.narrow(0, e.offset, e.shape.elem_count())?.reshape(e.shape.clone())?;
            out.insert(e.name.clone(), view);
        }
        dev.cuda_stream().synchronize().map_err(cuda_err)?;
        Ok(out)
    }
}

/// Where each tensor goes: sorted by name, packed back to back in one
/// buffer per dtype (dtypes in the order their first tensor comes). Returns
/// the entries and each buffer's dtype and length in elements.
fn pack<'a>(tensors: impl Iterator<Item = (&'a str, &'a Shape, DType)>) -> (Vec<Entry>, Vec<(DType, usize)>) {
    let mut tensors: Vec<_> = tensors.collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut entries = Vec::with_capacity(tensors.len());
    let mut lens: Vec<(DType, usize)> = Vec::new();
    for (name, shape, dtype) in tensors {
        let b = match lens.iter().position(|(d, _)| *d == dtype) {
            Some(b) => b,
            None => {
                lens.push((dtype, 0));
                lens.len() - 1
            }
        };
        entries.push(Entry { name: name.to_string(), shape: shape.clone(), dtype, offset: lens[b].1 });
        lens[b].1 += shape.elem_count();
    }
    (entries, lens)
}

/// Copies `parts` (tensor, offset in `host`) into `host` on `dev`'s stream,
/// without waiting. When the parts are exactly one CUDA storage's elements
/// in `host`'s order (the views [`PinnedStash::reload`] made), that is one
/// copy; otherwise one per tensor.
fn offload_into<T: CudaDType + DeviceRepr + ValidAsZeroBits + candle::WithDType>(
    dev: &CudaDevice,
    parts: &[(&Tensor, usize)],
    host: &mut PinnedHostSlice<T>,
    len: usize,
) -> candle::Result<()> {
    let stream = dev.cuda_stream();
    if let Some(&(first, _)) = parts.first() {
        // Identity of the first tensor's storage; each guard is dropped before
        // the next is taken (candle's storage lock is not re-entrant).
        let storage_of = |t: &Tensor| {
            let (s, l) = t.storage_and_layout();
            (&*s as *const Storage, l.is_contiguous(), l.start_offset())
        };
        let id = storage_of(first).0;
        let views = parts.iter().all(|&(t, offset)| storage_of(t) == (id, true, offset));
        if views {
            let (storage, _) = first.storage_and_layout();
            if let Storage::Cuda(cs) = &*storage {
                let slab = cs.as_cuda_slice::<T>()?;
                if slab.len() == len {
                    return stream.memcpy_dtoh(slab, host).map_err(cuda_err);
                }
            }
        }
    }
    // SAFETY of the later reads: the copies below are not recorded on the
    // buffer's event; `PinnedStash::offload` waits for the stream after them.
    let dst = host.as_mut_slice().map_err(cuda_err)?;
    for &(t, offset) in parts {
        let n = t.elem_count();
        let dst = dst
            .get_mut(offset..offset + n)
            .ok_or_else(|| candle::Error::Msg("pinned offload: tensor past its buffer".into()))?;
        if t.device().is_cuda() {
            copy_out(dev, t, dst)?;
        } else {
            dst.copy_from_slice(&t.flatten_all()?.to_vec1::<T>()?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_pack_back_to_back_per_dtype_in_name_order() {
        let shapes = [Shape::from((2, 3)), Shape::from(4), Shape::from((5,)), Shape::from((1, 7))];
        let list = [
            ("b", &shapes[0], DType::BF16),
            ("a", &shapes[1], DType::F32),
            ("d", &shapes[2], DType::BF16),
            ("c", &shapes[3], DType::F32),
        ];
        let (entries, lens) = pack(list.into_iter());
        let got: Vec<(&str, DType, usize)> = entries.iter().map(|e| (e.name.as_str(), e.dtype, e.offset)).collect();
        assert_eq!(got, [("a", DType::F32, 0), ("b", DType::BF16, 0), ("c", DType::F32, 4), ("d", DType::BF16, 6)]);
        assert_eq!(lens, [(DType::F32, 11), (DType::BF16, 11)]);
        assert_eq!(entries[2].shape, shapes[3]);
    }
}
