//! Memory devices as the registry sees them: an identity, a capacity, and a
//! count of the bytes placed on it.
//!
//! The registry decides *where* every unit of weights lives and tells the
//! device about each placement; moving the actual tensors is the job of the
//! model owner, who executes the [`super::Move`]s of a job plan. Keeping the
//! two apart means the same decisions drive real CUDA buffers, WebGPU buffers
//! or nothing at all (planning, tests).

use std::fmt;

use crate::device::DeviceSpec;

/// Why a device refused a placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFull {
    pub device: DeviceSpec,
    pub requested: u64,
    pub placed: u64,
    pub capacity: u64,
}

impl fmt::Display for DeviceFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cannot place {} more with {} of {} already placed",
            self.device,
            super::Bytes(self.requested),
            super::Bytes(self.placed),
            super::Bytes(self.capacity)
        )
    }
}

/// A device the registry can place weights on.
///
/// Implementations: [`HostMemory`] (the CPU), [`BudgetedDevice`] (fixed
/// capacity, for tests and `ipaflux plan`); CUDA and WebGPU devices come with
/// their backends. `Send` so a registry can move between threads.
pub trait MemoryDevice: fmt::Debug + Send {
    /// The canonical name; the registry refuses two devices with the same one.
    fn id(&self) -> DeviceSpec;
    /// Everything the device has, before any reserve.
    fn total_bytes(&self) -> u64;
    /// Free memory as the platform reports it (the CUDA driver can; WebGPU
    /// cannot, then the registry relies on its own count). Includes memory
    /// used by other processes, which the registry's count does not see.
    fn reported_free_bytes(&self) -> Option<u64> {
        None
    }
    /// Bytes the registry has placed here.
    fn placed_bytes(&self) -> u64;
    /// Records `bytes` placed on the device; refuses when they do not fit.
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull>;
    /// Records `bytes` leaving the device. Never more than was placed.
    fn remove(&mut self, bytes: u64);
    /// Bytes this process's allocator holds on the device for reuse: freed
    /// by their owners, not yet handed back to the platform (CUDA's memory
    /// pool keeps them across synchronisations, as PyTorch's caching
    /// allocator does). The platform counts them as used; the registry counts
    /// them as free, since its own loads reuse them.
    fn cached_bytes(&self) -> u64 {
        0
    }
    /// Hands the allocator's cached bytes back to the platform (after the
    /// frees already issued complete) and returns how many went back.
    fn release_cached(&mut self) -> crate::error::Result<u64> {
        Ok(0)
    }
}

/// Host memory: the offload device. Its capacity is what the caller says
/// (native code reads the machine's RAM; plans use [`HostMemory::unbounded`]).
#[derive(Debug, Clone)]
pub struct HostMemory {
    total: u64,
    placed: u64,
}

impl HostMemory {
    pub fn with_total(total: u64) -> Self {
        Self { total, placed: 0 }
    }
    /// Host memory that never refuses: for plans, where weights on the host are
    /// backed by memory-mapped files anyway.
    pub fn unbounded() -> Self {
        Self::with_total(u64::MAX)
    }
}

impl MemoryDevice for HostMemory {
    fn id(&self) -> DeviceSpec {
        DeviceSpec::Cpu
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn placed_bytes(&self) -> u64 {
        self.placed
    }
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull> {
        place_within(DeviceSpec::Cpu, &mut self.placed, self.total, bytes)
    }
    fn remove(&mut self, bytes: u64) {
        self.placed = self.placed.saturating_sub(bytes);
    }
}

/// A device with a fixed capacity that tracks every byte placed on it and
/// refuses anything beyond. It can stand in for any device id (`cuda:0` with
/// 24 GiB, say), which is what `ipaflux plan` and the tests do.
#[derive(Debug, Clone)]
pub struct BudgetedDevice {
    id: DeviceSpec,
    capacity: u64,
    placed: u64,
    peak: u64,
}

impl BudgetedDevice {
    pub fn new(id: DeviceSpec, capacity: u64) -> Self {
        Self { id, capacity, placed: 0, peak: 0 }
    }
    /// The most bytes ever placed at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak
    }
}

impl MemoryDevice for BudgetedDevice {
    fn id(&self) -> DeviceSpec {
        self.id
    }
    fn total_bytes(&self) -> u64 {
        self.capacity
    }
    fn placed_bytes(&self) -> u64 {
        self.placed
    }
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull> {
        place_within(self.id, &mut self.placed, self.capacity, bytes)?;
        self.peak = self.peak.max(self.placed);
        Ok(())
    }
    fn remove(&mut self, bytes: u64) {
        self.placed = self.placed.saturating_sub(bytes);
    }
}

/// Adds `bytes` to `placed` if the result stays within `capacity`; otherwise
/// leaves it and says why. The rule every [`MemoryDevice::place`] follows.
pub fn place_within(device: DeviceSpec, placed: &mut u64, capacity: u64, bytes: u64) -> Result<(), DeviceFull> {
    match placed.checked_add(bytes) {
        Some(after) if after <= capacity => {
            *placed = after;
            Ok(())
        }
        _ => Err(DeviceFull { device, requested: bytes, placed: *placed, capacity }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgeted_device_refuses_beyond_capacity_and_tracks_peak() {
        let mut d = BudgetedDevice::new(DeviceSpec::Cuda(0), 100);
        assert!(d.place(60).is_ok());
        let err = d.place(41).err();
        assert_eq!(err.as_ref().map(|e| e.placed), Some(60));
        assert!(err.map(|e| e.to_string()).unwrap_or_default().contains("cuda:0"));
        assert!(d.place(40).is_ok());
        d.remove(70);
        assert_eq!((d.placed_bytes(), d.peak_bytes()), (30, 100));
        d.remove(1000);
        assert_eq!(d.placed_bytes(), 0);
    }

    #[test]
    fn unbounded_host_never_refuses() {
        let mut h = HostMemory::unbounded();
        assert!(h.place(u64::MAX / 2).is_ok());
        assert!(h.place(u64::MAX / 2).is_ok());
        assert_eq!(h.id(), DeviceSpec::Cpu);
    }
}
