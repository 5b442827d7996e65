//! The registry's memory device for WebGPU.
//!
//! WebGPU has no free-memory query, so the registry's own count is the only
//! truth here: the capacity is a budget the caller sets (the page asks the
//! user or assumes a default), and the adapter's largest buffer is recorded
//! so loaders split weights that exceed it.

use ipaflux_core::config::SiglipVisionConfig;
use ipaflux_core::device::DeviceSpec;
use ipaflux_core::registry::{
    place_within, Bytes, DeviceFull, HostMemory, JobRequest, MemoryDevice, ModelHandle, ModelSpec, Registry,
    RegistryConfig, Role, VramState,
};

use crate::error::{Error, Result};
use crate::quant::WeightFormat;
use crate::GpuEncoder;

/// The budget when the page sets none: WebGPU cannot tell how much memory
/// the adapter has, so this is an assumption (a modest integrated GPU's
/// share), stated wherever it is used.
pub const DEFAULT_WEBGPU_BUDGET: u64 = 4 << 30;

/// A registry for one WebGPU adapter with `budget` bytes (weights only: the
/// budget is the caller's number, so no safety margin is added) and the host.
/// Models load whole or not at all (`VramState::High`): the encoder has no
/// streamed path on WebGPU.
pub fn webgpu_registry(budget: u64, max_binding: u64) -> ipaflux_core::Result<Registry> {
    let config = RegistryConfig { state: VramState::High, safety_margin_bytes: 0, ..RegistryConfig::default() };
    Registry::new(config, vec![Box::new(WebGpuMemory::new(0, budget, max_binding)), Box::new(HostMemory::unbounded())])
}

/// Registers the SigLIP encoder's predicted GPU bytes and places them on the
/// WebGPU device before anything is uploaded: a model that does not fit the
/// budget is refused ([`Error::OverBudget`]) instead of failing halfway
/// through the upload, and leaves nothing registered.
pub fn reserve_encoder(registry: &mut Registry, cfg: &SiglipVisionConfig, format: WeightFormat) -> Result<ModelHandle> {
    let device = DeviceSpec::WebGpu(0);
    let bytes = GpuEncoder::predicted_bytes(cfg, format);
    let spec = ModelSpec::uniform("siglip", Role::ImageEncoder, device, bytes, 1, "siglip");
    let handle = registry.register(spec)?;
    registry.begin_stage("load");
    match registry.load_for_job(&JobRequest::new(device, &[handle.model])) {
        Ok(_) => Ok(handle),
        Err(e) => {
            registry.release(handle);
            Err(match e {
                ipaflux_core::Error::OutOfMemory { .. } => {
                    Error::OverBudget { needed: Bytes(bytes), budget: Bytes(registry.usable_bytes(device)), format }
                }
                other => other.into(),
            })
        }
    }
}

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
        place_within(self.id(), &mut self.placed, self.budget, bytes)
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

    #[test]
    fn the_encoder_is_refused_past_the_budget_and_released_once() -> Result<()> {
        let cfg = ipaflux_core::config::SiglipVisionConfig::so400m_patch14_384();
        let q8 = GpuEncoder::predicted_bytes(&cfg, WeightFormat::Q8);
        let mut reg = webgpu_registry(q8 + 1, 128 << 20)?;
        let err = reserve_encoder(&mut reg, &cfg, WeightFormat::F32).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("more than the") && err.contains("budget") && err.contains("in f32"), "{err}");
        assert_eq!(reg.placed_bytes(DeviceSpec::WebGpu(0)), 0, "a refused model leaves nothing behind");
        let handle = reserve_encoder(&mut reg, &cfg, WeightFormat::Q8)?;
        assert_eq!(reg.placed_bytes(DeviceSpec::WebGpu(0)), q8);
        reg.release(handle);
        reg.release(handle);
        assert_eq!(reg.placed_bytes(DeviceSpec::WebGpu(0)), 0);
        Ok(reg.audit()?)
    }
}
