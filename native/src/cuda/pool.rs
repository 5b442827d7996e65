//! The cache of CUDA's stream-ordered allocator, and the registry device
//! that accounts for it ([`PooledCuda`]).
//!
//! candle allocates through cudarc's `cuMemAllocAsync`, from the device's
//! current memory pool. The pool's release threshold defaults to 0: at every
//! synchronisation it hands all freed memory back to the driver, so a
//! sampler that synchronises once a step maps its activations afresh each
//! step, and an offload that waits for its copy also waits for the
//! unmapping. [`keep_freed_memory`] raises the threshold to the maximum
//! (PyTorch's caching allocator, RMM and CCCL keep freed memory the same
//! way); the pool then keeps freed bytes for reuse until
//! [`release_freed_memory`], which the registry calls through
//! [`PooledCuda`] between stages
//! ([`ipaflux_core::registry::Registry::release_cached`]).
//!
//! What it does not do: choose another pool, or limit the pool's size (the
//! registry's plans and safety margin bound what is allocated).

use std::sync::Arc;

use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};
use ipaflux_core::registry::{CudaMemory, DeviceFull, MemoryDevice};
use ipaflux_core::DeviceSpec;

fn pool_error(what: &str, e: sys::CUresult) -> ipaflux_core::Error {
    ipaflux_core::Error::Unsupported(format!("CUDA memory pool: {what}: {e:?}"))
}

type Result<T> = std::result::Result<T, ipaflux_core::Error>;

/// Bytes of a device's memory pool: `reserved` mapped from the driver,
/// `used` of them by live allocations, and the most `used` has been since
/// [`reset_pool_peak`] (or since the pool was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub reserved: u64,
    pub used: u64,
    pub used_high: u64,
}

impl PoolUsage {
    /// Freed bytes the pool keeps for reuse.
    pub fn cached(&self) -> u64 {
        self.reserved.saturating_sub(self.used)
    }
}

/// The pool `cuMemAllocAsync` on `ctx`'s device draws from.
fn current_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; the device handle is the context's own.
    match unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(pool),
        e => Err(pool_error("cuDeviceGetMemPool", e)),
    }
}

fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
    let mut value = 0u64;
    // SAFETY: the byte attributes read here are `cuuint64_t`, which `value` is.
    match unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&raw mut value).cast()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(value),
        e => Err(pool_error("cuMemPoolGetAttribute", e)),
    }
}

fn set(ctx: &CudaContext, attr: sys::CUmemPool_attribute, mut value: u64, what: &str) -> Result<()> {
    let pool = current_pool(ctx)?;
    // SAFETY: the attributes set here are `cuuint64_t`, which `value` is.
    match unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&raw mut value).cast()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(pool_error(what, e)),
    }
}

/// Reserved, used and highest used bytes of the pool `ctx`'s allocations come from.
pub fn pool_usage(ctx: &CudaContext) -> Result<PoolUsage> {
    use sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    };
    let pool = current_pool(ctx)?;
    Ok(PoolUsage {
        reserved: get(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        used: get(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        used_high: get(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
    })
}

/// Restarts the pool's high-water mark of used bytes (read it together with
/// the current use: after a reset the mark may start from 0).
pub fn reset_pool_peak(ctx: &CudaContext) -> Result<()> {
    // The driver takes only 0 here.
    set(ctx, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0, "resetting the used high")
}

/// Sets how many reserved bytes the pool keeps at a synchronisation. CUDA's
/// default is 0; [`keep_freed_memory`] is what ipaflux runs with.
pub fn set_release_threshold(ctx: &CudaContext, bytes: u64) -> Result<()> {
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    set(ctx, attr, bytes, "setting the release threshold")
}

/// Makes the pool keep freed memory across synchronisations until
/// [`release_freed_memory`]. Affects the device's pool for every context
/// on it; idempotent.
pub fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    set_release_threshold(ctx, u64::MAX)
}

/// Waits for the context's work (so the frees already issued complete), then
/// hands every byte the pool holds beyond live allocations back to the
/// driver. Returns the bytes handed back.
pub fn release_freed_memory(ctx: &CudaContext) -> Result<u64> {
    ctx.synchronize().map_err(|e| ipaflux_core::Error::Unsupported(format!("CUDA memory pool: synchronising: {e}")))?;
    let pool = current_pool(ctx)?;
    let before = pool_usage(ctx)?.reserved;
    // SAFETY: trimming releases only memory no allocation holds.
    match unsafe { sys::cuMemPoolTrimTo(pool, 0) } {
        sys::CUresult::CUDA_SUCCESS => Ok(before.saturating_sub(pool_usage(ctx)?.reserved)),
        e => Err(pool_error("cuMemPoolTrimTo", e)),
    }
}

/// A CUDA GPU as a registry device, its memory pool's cache included: cached
/// bytes count as free to the registry's plans
/// ([`MemoryDevice::cached_bytes`]) and go back to the driver on
/// [`MemoryDevice::release_cached`]. Capacity, free memory and placements
/// are [`CudaMemory`]'s.
#[derive(Debug)]
pub struct PooledCuda {
    inner: CudaMemory,
}

impl PooledCuda {
    pub fn new(inner: CudaMemory) -> Self {
        Self { inner }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        self.inner.context()
    }
}

impl MemoryDevice for PooledCuda {
    fn id(&self) -> DeviceSpec {
        self.inner.id()
    }
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }
    fn reported_free_bytes(&self) -> Option<u64> {
        self.inner.reported_free_bytes()
    }
    fn placed_bytes(&self) -> u64 {
        self.inner.placed_bytes()
    }
    fn place(&mut self, bytes: u64) -> std::result::Result<(), DeviceFull> {
        self.inner.place(bytes)
    }
    fn remove(&mut self, bytes: u64) {
        self.inner.remove(bytes);
    }
    fn cached_bytes(&self) -> u64 {
        // A driver without memory pools has no cache to count.
        pool_usage(self.context()).map_or(0, |u| u.cached())
    }
    fn release_cached(&mut self) -> ipaflux_core::Result<u64> {
        release_freed_memory(self.context())
    }
}
