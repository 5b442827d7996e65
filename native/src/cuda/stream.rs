//! Block streaming on CUDA: the tensors of Flux blocks that the registry did
//! not make resident wait in pinned host memory and are copied to the GPU on
//! a second stream one block ahead of use, so the copy of block *i+1* runs
//! while block *i* computes (the [`BlockSource`] contract of
//! `ipaflux_core::flux::stream`).
//!
//! Ordering is explicit, with events, and every device buffer lives on the
//! compute stream (allocated and freed there, stream-ordered):
//! 1. `prefetch(b)`: allocate `b`'s buffers on the compute stream, record
//!    event *ready* there; the copy stream waits for *ready* (the memory is
//!    free in stream order), copies from pinned memory, records *done*.
//! 2. `fetch(b)`: the compute stream waits for *done*; the tensors are
//!    handed to the block and dropped after it, freeing their memory on the
//!    compute stream once the block's kernels are through.
//!
//! So at most two streamed blocks hold device memory at a time (the one
//! running and the one arriving), the registry's two-unit stream buffer.
//! cudarc's automatic event tracking is switched off for the context (it
//! would add events to every allocation and launch once a second stream
//! exists); this module's events are the only cross-stream ordering, and
//! nothing else in ipaflux uses a second stream.
//!
//! Not here: deciding which blocks stream (the registry's `load_for_job`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice,
};
use ipaflux_core::candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use ipaflux_core::candle_core::op::BackpropOp;
use ipaflux_core::candle_core::{self as candle, Device, Shape, Storage, Tensor};
use ipaflux_core::flux::stream::{BlockId, BlockSource};

use super::pinned::{cuda_device, cuda_err, Host};

/// One tensor of a streamed block, waiting in pinned memory.
struct Pinned {
    name: String,
    shape: Shape,
    host: Host,
}

/// A block whose copy was started and not yet fetched.
struct InFlight {
    tensors: BTreeMap<String, Tensor>,
    done: CudaEvent,
}

/// What the source did, for the benchmark table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Blocks fetched.
    pub fetches: u64,
    /// Of those, blocks whose copy had been started ahead (prefetched).
    pub prefetched: u64,
    /// Bytes copied host → device.
    pub bytes: u64,
}

/// Streamed Flux blocks in pinned host memory, copied in on a second stream.
pub struct PinnedBlocks {
    blocks: HashMap<BlockId, Vec<Pinned>>,
    device: CudaDevice,
    copy: Arc<CudaStream>,
    in_flight: Mutex<HashMap<BlockId, InFlight>>,
    stats: Mutex<StreamStats>,
    bytes: u64,
}

impl std::fmt::Debug for PinnedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBlocks").field("blocks", &self.blocks.len()).field("bytes", &self.bytes).finish()
    }
}

fn msg(m: String) -> ipaflux_core::Error {
    ipaflux_core::Error::Candle(candle::Error::Msg(m))
}

impl PinnedBlocks {
    /// Copies `tensors` (canonical names of `blocks`' tensors, bf16/f16/f32,
    /// on the GPU as `FluxModel::stream_blocks` returns them or on the host as
    /// `FluxModel::from_store_streamed` does) into pinned buffers allocated
    /// now, dropping each tensor once its copy is done, and waits for the
    /// copies. The
    /// blocks will run on `device`. Also switches its context to explicit
    /// stream ordering (module docs).
    pub fn new(mut tensors: BTreeMap<String, Tensor>, blocks: &[BlockId], device: &Device) -> candle::Result<Self> {
        let cuda = cuda_device(device)?;
        let main = cuda.cuda_stream();
        let ctx = main.context().clone();
        super::explicit_stream_ordering(device);
        let device = cuda;
        let copy = ctx.new_stream().map_err(cuda_err)?;
        let mut by_block: HashMap<BlockId, Vec<Pinned>> = blocks.iter().map(|&b| (b, Vec::new())).collect();
        let mut bytes = 0u64;
        // Each host tensor is dropped once its pinned copy exists (a plain
        // copy, done on return), so the host holds about one copy of the
        // streamed blocks while they are pinned, not two; GPU tensors stay
        // until their asynchronous copies are waited for.
        let mut on_gpu = Vec::new();
        while let Some((name, t)) = tensors.pop_first() {
            let block = blocks
                .iter()
                .find(|b| b.owns(&name))
                .ok_or_else(|| candle::Error::Msg(format!("tensor `{name}` belongs to no streamed block")))?;
            let t = t.contiguous()?;
            let n = t.elem_count();
            let mut host = Host::alloc(&ctx, t.dtype(), n, &name)?;
            host.fill(&device, &t)?;
            bytes += (n * t.dtype().size_in_bytes()) as u64;
            by_block.entry(*block).or_default().push(Pinned { shape: t.shape().clone(), name, host });
            if t.device().is_cuda() {
                on_gpu.push(t);
            }
        }
        main.synchronize().map_err(cuda_err)?;
        drop(on_gpu);
        tracing::info!(target: "ipaflux::stream", blocks = blocks.len(), bytes, "streamed blocks pinned in host memory");
        Ok(Self {
            blocks: by_block,
            device,
            copy,
            in_flight: Mutex::new(HashMap::new()),
            stats: Mutex::default(),
            bytes,
        })
    }

    /// Pinned bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counters since creation.
    pub fn stats(&self) -> StreamStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Starts the copy of `block` (module docs, step 1).
    fn start(&self, block: BlockId) -> candle::Result<InFlight> {
        let parts =
            self.blocks.get(&block).ok_or_else(|| candle::Error::Msg(format!("{block} is not streamed here")))?;
        let main = self.device.cuda_stream();
        let mut tensors = BTreeMap::new();
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            slices.push(match &p.host {
                Host::BF16(h) => Dst::BF16(alloc::<bf16>(&self.device, h.len())?),
                Host::F16(h) => Dst::F16(alloc::<f16>(&self.device, h.len())?),
                Host::F32(h) => Dst::F32(alloc::<f32>(&self.device, h.len())?),
            });
        }
        let ready = main.record_event(None).map_err(cuda_err)?;
        self.copy.wait(&ready).map_err(cuda_err)?;
        let mut bytes = 0u64;
        for (p, dst) in parts.iter().zip(slices) {
            let t = match (&p.host, dst) {
                (Host::BF16(h), Dst::BF16(d)) => self.copy_in(h, d, &p.shape)?,
                (Host::F16(h), Dst::F16(d)) => self.copy_in(h, d, &p.shape)?,
                (Host::F32(h), Dst::F32(d)) => self.copy_in(h, d, &p.shape)?,
                _ => return Err(candle::Error::Msg("streamed buffer of another dtype".into())),
            };
            bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            tensors.insert(p.name.clone(), t);
        }
        let done = self.copy.record_event(None).map_err(cuda_err)?;
        if let Ok(mut s) = self.stats.lock() {
            s.bytes += bytes;
        }
        Ok(InFlight { tensors, done })
    }

    fn copy_in<T: CudaDType + DeviceRepr>(
        &self,
        host: &PinnedHostSlice<T>,
        mut dst: CudaSlice<T>,
        shape: &Shape,
    ) -> candle::Result<Tensor> {
        self.copy.memcpy_htod(host, &mut dst).map_err(cuda_err)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, self.device.clone()));
        Ok(Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false))
    }
}

/// A device buffer by element type.
enum Dst {
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

fn alloc<T: DeviceRepr>(device: &CudaDevice, n: usize) -> candle::Result<CudaSlice<T>> {
    // SAFETY: every element is written by the host → device copy before any
    // kernel reads it (the compute stream waits for the copy's event).
    unsafe { device.cuda_stream().alloc::<T>(n) }.map_err(cuda_err)
}

impl BlockSource for PinnedBlocks {
    fn prefetch(&self, block: BlockId) -> ipaflux_core::Result<()> {
        let mut in_flight = self.in_flight.lock().map_err(|_| msg("block stream lock poisoned".into()))?;
        if let std::collections::hash_map::Entry::Vacant(e) = in_flight.entry(block) {
            e.insert(self.start(block)?);
        }
        Ok(())
    }

    fn fetch(&self, block: BlockId) -> ipaflux_core::Result<BTreeMap<String, Tensor>> {
        let taken = self.in_flight.lock().map_err(|_| msg("block stream lock poisoned".into()))?.remove(&block);
        let prefetched = taken.is_some();
        let f = match taken {
            Some(f) => f,
            None => self.start(block)?,
        };
        self.device.cuda_stream().wait(&f.done).map_err(|e| ipaflux_core::Error::Candle(cuda_err(e)))?;
        if let Ok(mut s) = self.stats.lock() {
            s.fetches += 1;
            s.prefetched += u64::from(prefetched);
        }
        Ok(f.tensors)
    }

    fn discard_prefetched(&self) {
        let Ok(mut in_flight) = self.in_flight.lock() else { return };
        let main = self.device.cuda_stream();
        for (block, f) in in_flight.drain() {
            // Their buffers are freed on the compute stream, which must not run ahead of the copy into them.
            if let Err(e) = main.wait(&f.done) {
                tracing::warn!(target: "ipaflux::stream", "{block}: waiting for its copy before freeing it: {e}");
            }
            tracing::info!(target: "ipaflux::stream", "{block}: prefetched, discarded after a failed forward");
        }
    }
}

impl Drop for PinnedBlocks {
    fn drop(&mut self) {
        // Copies still running read the pinned buffers freed below.
        if let Err(e) = self.copy.synchronize() {
            tracing::warn!(target: "ipaflux::stream", "copy stream did not finish: {e}");
        }
    }
}

/// Whether `device` can stream from pinned memory (a CUDA device).
pub fn supported(device: &Device) -> bool {
    matches!(device, Device::Cuda(_))
}
