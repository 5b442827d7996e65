//! CUDA device memory for the registry (feature `cuda`): capacity and free
//! memory from the driver, so memory other programs use is respected.
//!
//! Built with candle's CUDA backend (feature `cuda`), which links the driver
//! library; without a GPU [`CudaMemory::new`] is a clear error. Tensors
//! themselves are allocated by their owners; this type only accounts.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::memory::{DeviceFull, MemoryDevice};
use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// A CUDA GPU as a registry device.
#[derive(Debug)]
pub struct CudaMemory {
    ordinal: usize,
    context: Arc<CudaContext>,
    total: u64,
    placed: u64,
}

impl CudaMemory {
    /// Opens GPU `ordinal` (its primary context) and reads its capacity.
    pub fn new(ordinal: usize) -> Result<Self> {
        let fail = |e: cudarc::driver::DriverError| Error::Unsupported(format!("cuda:{ordinal}: {e}"));
        let context = CudaContext::new(ordinal).map_err(fail)?;
        let (_, total) = context.mem_get_info().map_err(fail)?;
        Ok(Self { ordinal, context, total: total as u64, placed: 0 })
    }

    /// The context, for owners that allocate the real buffers.
    /// As [`Self::new`], planning within at most `budget` bytes of the card
    /// (a share of a GPU others use too, or a smaller card's size).
    pub fn with_budget(ordinal: usize, budget: u64) -> Result<Self> {
        let mut m = Self::new(ordinal)?;
        m.total = m.total.min(budget);
        Ok(m)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// Free and total bytes as the driver reports them now.
    pub fn driver_info(&self) -> Result<(u64, u64)> {
        let (free, total) =
            self.context.mem_get_info().map_err(|e| Error::Unsupported(format!("cuda:{}: {e}", self.ordinal)))?;
        Ok((free as u64, total as u64))
    }
}

impl MemoryDevice for CudaMemory {
    fn id(&self) -> DeviceSpec {
        DeviceSpec::Cuda(self.ordinal)
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn reported_free_bytes(&self) -> Option<u64> {
        self.driver_info().ok().map(|(free, _)| free)
    }
    fn placed_bytes(&self) -> u64 {
        self.placed
    }
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull> {
        super::memory::place_within(self.id(), &mut self.placed, self.total, bytes)
    }
    fn remove(&mut self, bytes: u64) {
        self.placed = self.placed.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    //! Runs on a machine with an NVIDIA GPU (the GPU check script sets
    //! `IPAFLUX_REQUIRE_CUDA=1` so a missing GPU fails there); elsewhere it
    //! reports that it was skipped.

    use std::collections::HashMap;

    use cudarc::driver::CudaSlice;

    use super::super::{HostMemory, JobRequest, ModelId, ModelSpec, Registry, RegistryConfig, Role};
    use super::*;

    const MIB: u64 = 1 << 20;

    fn open() -> Option<CudaMemory> {
        match CudaMemory::new(0) {
            Ok(d) => Some(d),
            Err(e) if std::env::var("IPAFLUX_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("{e}"),
            Err(e) => {
                eprintln!("SKIPPED: CUDA registry check: {e}");
                None
            }
        }
    }

    /// Executes a plan's moves with real device buffers, as a model owner would.
    fn execute(
        moves: &[super::super::Move],
        buffers: &mut HashMap<(ModelId, usize), CudaSlice<u8>>,
        ctx: &Arc<CudaContext>,
    ) {
        let stream = ctx.default_stream();
        for m in moves {
            if matches!(m.to, DeviceSpec::Cuda(_)) {
                match stream.alloc_zeros::<u8>(m.bytes as usize) {
                    Ok(b) => {
                        buffers.insert((m.model, m.unit), b);
                    }
                    Err(e) => panic!("allocating {} B: {e}", m.bytes),
                }
            } else {
                buffers.remove(&(m.model, m.unit));
            }
        }
        if let Err(e) = stream.synchronize() {
            panic!("{e}");
        }
    }

    #[test]
    fn predicted_resident_bytes_match_the_driver_within_5_percent() {
        let Some(gpu) = open() else { return };
        let ctx = gpu.context().clone();
        let (free0, _) = match gpu.driver_info() {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        };
        // A budget well inside what is free, so the registry must evict and stream.
        let budget = (free0 / 2).min(6 << 30);
        let config =
            RegistryConfig { reserve_bytes: gpu.total_bytes().saturating_sub(budget), ..RegistryConfig::default() };
        let mut r = match Registry::new(config, vec![Box::new(gpu), Box::new(HostMemory::unbounded())]) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let mut buffers = HashMap::new();
        let spec = |name: &str, role, mib: u64, units| {
            ModelSpec::uniform(name, role, DeviceSpec::Cuda(0), mib * MIB, units, "u")
        };
        for round in 0..3 {
            let job = r.begin_job("round");
            let mut ids = Vec::new();
            for (name, role, mib, units) in [
                ("text", Role::TextEncoder, 2048, 16),
                ("flux", Role::Diffusion, 6144, 48),
                ("siglip", Role::ImageEncoder, 512, 8),
                ("procs", Role::IpProcessors, 640, 20),
            ] {
                match r.register_in(job, spec(name, role, mib, units)) {
                    Ok(h) => ids.push(h.model),
                    Err(e) => panic!("{e}"),
                }
            }
            for (stage, models, working) in
                [("text", vec![ids[0]], 256), ("image", vec![ids[2], ids[3]], 64), ("sample", vec![ids[1]], 1024)]
            {
                r.begin_stage(stage);
                let plan = match r.load_for_job(&JobRequest::new(DeviceSpec::Cuda(0), &models).working(working * MIB)) {
                    Ok(p) => p,
                    Err(e) => panic!("{e}"),
                };
                execute(&plan.moves, &mut buffers, &ctx);
                let predicted = r.placed_bytes(DeviceSpec::Cuda(0));
                let used = free0.saturating_sub(match ctx.mem_get_info() {
                    Ok((f, _)) => f as u64,
                    Err(e) => panic!("{e}"),
                });
                let diff = used.abs_diff(predicted);
                eprintln!("round {round} {stage}: predicted {predicted} B, driver {used} B");
                assert!(
                    diff * 20 <= predicted.max(1),
                    "round {round} {stage}: predicted {predicted} B, driver says {used} B"
                );
            }
            r.end_job(job);
            // Released models' buffers are the owner's to drop: drop all of this round's.
            buffers.clear();
            if let Err(e) = ctx.default_stream().synchronize() {
                panic!("{e}");
            }
            assert_eq!(r.placed_bytes(DeviceSpec::Cuda(0)), 0);
            let left = free0.saturating_sub(ctx.mem_get_info().map_or(0, |(f, _)| f as u64));
            assert!(left < 64 * MIB, "round {round}: {left} B still used after cleanup");
        }
    }
}
