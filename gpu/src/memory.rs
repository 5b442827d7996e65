//! The registry's memory device for WebGPU.
//!
//! WebGPU has no free-memory query, so the registry's own count is the only
//! truth here: the capacity is a budget the caller sets (the page asks the
//! user or assumes a default), and the adapter's largest buffer is recorded
//! so loaders split weights that exceed it.

use ipaflux_core::device::DeviceSpec;
use ipaflux_core::registry::{DeviceFull, MemoryDevice};

/// A WebGPU adapter as a registry memory device.
#[derive(Debug, Clone)]
pub struct WebGpuMemory {
    ordinal: usize,
    budget: u64,
    placed: u64,
    max_binding: u64,
}

impl WebGpuMemory {
    /// `budget`: bytes the registry may place; `max_binding`: the adapter's
    /// largest storage binding (from [`crate::GpuContext::max_binding`]).
    pub fn new(ordinal: usize, budget: u64, max_binding: u64) -> Self {
        Self { ordinal, budget, placed: 0, max_binding }
    }

    /// The largest single buffer a kernel may bind on this adapter.
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }
}

impl MemoryDevice for WebGpuMemory {
    fn id(&self) -> DeviceSpec {
        DeviceSpec::WebGpu(self.ordinal)
    }
    fn total_bytes(&self) -> u64 {
        self.budget
    }
    fn placed_bytes(&self) -> u64 {
        self.placed
    }
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull> {
        match self.placed.checked_add(bytes) {
            Some(after) if after <= self.budget => {
                self.placed = after;
                Ok(())
            }
            _ => Err(DeviceFull { device: self.id(), requested: bytes, placed: self.placed, capacity: self.budget }),
        }
    }
    fn remove(&mut self, bytes: u64) {
        self.placed = self.placed.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_its_own_bytes_and_refuses_past_the_budget() {
        let mut m = WebGpuMemory::new(0, 100, 64);
        assert_eq!(m.id().to_string(), "webgpu:0");
        assert!(m.place(60).is_ok());
        let full = m.place(50).err();
        assert_eq!(full.map(|f| (f.requested, f.placed, f.capacity)), Some((50, 60, 100)));
        m.remove(60);
        m.remove(60); // never below zero
        assert_eq!(m.placed_bytes(), 0);
        assert_eq!(m.reported_free_bytes(), None);
    }
}
