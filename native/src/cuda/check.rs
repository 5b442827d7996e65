//! The CUDA-only sections of `ipaflux gpu-check` ([`crate::gpu_check`]):
//! the registry's accounting against the driver while an encoder is loaded,
//! offloaded to pinned memory and reloaded over several jobs; host ↔ device
//! copy speed, pinned and pageable; and [`DriverPeak`], the peak-memory probe
//! the Flux benchmark uses on CUDA.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{CudaContext, DriverError};
use std::collections::HashMap;

use ipaflux_core::candle_core::{DType, Device, Tensor, D};
use ipaflux_core::candle_nn::VarBuilder;
use ipaflux_core::registry::{CudaMemory, HostMemory, JobRequest, ModelSpec, Registry, RegistryConfig, Role};
use ipaflux_core::siglip::expected_tensors;
use ipaflux_core::{DeviceSpec, SiglipVisionModel};

use super::pinned::PinnedStash;
use super::pool::{keep_freed_memory, pool_usage, reset_pool_peak, set_release_threshold, PooledCuda};
use crate::bench_flux::PeakMemory;
use crate::gpu_check::{gib, mib, random_weights, siglip_config, CheckOptions, Report, Section};
use crate::{Error, Result};

const MIB: u64 = 1 << 20;

fn driver(e: DriverError) -> Error {
    Error::Core(ipaflux_core::Error::Unsupported(format!("CUDA driver: {e}")))
}

fn context(device: &Device) -> Option<Arc<CudaContext>> {
    match device {
        Device::Cuda(d) => Some(d.cuda_stream().context().clone()),
        _ => None,
    }
}

/// Bytes this process's work holds on the device now: the driver's used
/// memory less what the memory pool caches for reuse (freed, kept mapped:
/// [`keep_freed_memory`]). Memory outside the pool
/// (the context, cuBLAS's workspace, graph pools) counts.
fn live_bytes(ctx: &CudaContext) -> Option<u64> {
    let cached = pool_usage(ctx).map_or(0, |u| u.cached());
    Some(held_bytes(ctx)?.saturating_sub(cached))
}

/// The driver's used bytes: everything held on the device, the pool's cache
/// and other programs included (as `nvidia-smi` shows).
fn held_bytes(ctx: &CudaContext) -> Option<u64> {
    let (free, total) = ctx.mem_get_info().ok()?;
    Some((total as u64).saturating_sub(free as u64))
}

/// Peak device memory in use, counted from when the probe started, by two
/// readings of which the larger counts: [`live_bytes`] sampled every
/// millisecond on a thread of its own, and the memory pool's own high-water
/// mark of live allocations (exact, reset with the probe) plus what lies
/// outside the pool now. The pool's cache does not count: PyTorch's figure
/// beside it is its allocator's maximum allocated, not reserved. Also the
/// driver's own used bytes, sampled ([`PeakMemory::peak_held`]): what a card
/// must have, the cache included.
#[derive(Debug)]
pub struct DriverPeak {
    base: u64,
    max_live: Arc<AtomicU64>,
    /// The driver's used bytes at the start and their sampled maximum (the pool's cache included).
    base_held: u64,
    max_held: Arc<AtomicU64>,
    ctx: Arc<CudaContext>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DriverPeak {
    /// Starts sampling; what is in use now counts as zero.
    pub fn start(device: &Device) -> Result<Self> {
        let ctx =
            context(device).ok_or_else(|| Error::Core(ipaflux_core::Error::Unsupported("not a CUDA device".into())))?;
        let base = live(&ctx)?;
        let base_held = held(&ctx)?;
        let max_live = Arc::new(AtomicU64::new(base));
        let max_held = Arc::new(AtomicU64::new(base_held));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, m, h, s) = (ctx.clone(), max_live.clone(), max_held.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(held) = held_bytes(&c) {
                    h.fetch_max(held, Ordering::Relaxed);
                }
                if let Some(live) = live_bytes(&c) {
                    m.fetch_max(live, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Failure leaves the high-water mark of the process so far: a larger peak, never a smaller one.
        let _ = reset_pool_peak(&ctx);
        Ok(Self { base, max_live, base_held, max_held, ctx, stop, thread: Some(thread) })
    }
}

fn live(ctx: &CudaContext) -> Result<u64> {
    live_bytes(ctx).ok_or_else(driver_unreadable)
}

fn held(ctx: &CudaContext) -> Result<u64> {
    held_bytes(ctx).ok_or_else(driver_unreadable)
}

/// `", pool cache N MiB not counted"` where the pool caches anything.
fn cache_note(ctx: &CudaContext) -> String {
    match pool_usage(ctx) {
        Ok(u) if u.cached() > 0 => format!(" (pool cache {:.1} MiB not counted)", mib(u.cached())),
        _ => String::new(),
    }
}

/// Runs `f` with the memory pool handing freed memory back at every
/// synchronisation (CUDA's default), then makes it keep freed memory again
/// (ipaflux's setting), whatever `f` returned: for the rows that show what
/// keeping it saves.
pub fn with_pool_releasing<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(ctx) = context(device) else { return f() };
    set_release_threshold(&ctx, 0)?;
    let out = f();
    keep_freed_memory(&ctx)?;
    out
}

fn driver_unreadable() -> Error {
    Error::Core(ipaflux_core::Error::Unsupported("CUDA driver: memory use unreadable".into()))
}

impl Drop for DriverPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PeakMemory for DriverPeak {
    fn reset(&self) {
        if let Some(live) = live_bytes(&self.ctx) {
            self.max_live.store(live, Ordering::Relaxed);
        }
        if let Some(held) = held_bytes(&self.ctx) {
            self.max_held.store(held, Ordering::Relaxed);
        }
        let _ = reset_pool_peak(&self.ctx);
    }
    fn peak_held(&self) -> Option<u64> {
        Some(self.max_held.load(Ordering::Relaxed).saturating_sub(self.base_held))
    }
    fn release_cache(&self) {
        if let Err(e) = super::pool::release_freed_memory(&self.ctx) {
            tracing::warn!(target: "ipaflux::bench", "memory pool cache kept: {e}");
        }
    }
    fn peak(&self) -> Option<u64> {
        let sampled = self.max_live.load(Ordering::Relaxed);
        let pool = pool_usage(&self.ctx).ok()?;
        let (free, total) = self.ctx.mem_get_info().ok()?;
        let outside_pool = (total as u64).saturating_sub(free as u64).saturating_sub(pool.reserved);
        let pool_peak = pool.used_high.max(pool.used) + outside_pool;
        Some(sampled.max(pool_peak).saturating_sub(self.base))
    }
    fn in_use(&self) -> Option<u64> {
        Some(live_bytes(&self.ctx)?.saturating_sub(self.base))
    }
}

/// Registry accounting vs the driver over three jobs: SigLIP loaded from
/// pinned memory for an encode, offloaded once its embeddings exist (d2h into
/// the same pinned buffers), job ended and the memory pool's cache released
/// (the driver's use less that cache is compared before; after the release
/// the driver's own figure). Also the offload/reload speeds.
pub fn registry_vs_driver(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let dev = &o.device;
    let Some(ctx) = context(dev) else { return Ok(()) };
    let cfg = siglip_config(o.quick);
    let list = expected_tensors(&cfg);
    // Predicted from the config alone: what the registry is told.
    let predicted = ipaflux_core::weights::loaded_bytes(&list, DType::BF16);
    // The weights start on the host (pinned); no GPU copy is kept.
    let initial = random_weights(&list, DType::BF16, dev)?;
    let want = fingerprint(&initial)?;
    let mut stash = PinnedStash::new(&initial)?;
    drop(initial);
    dev.synchronize()?;
    let pixels = ipaflux_core::candle_core::Tensor::randn(0f32, 1.0, (1, 3, cfg.image_size, cfg.image_size), dev)?
        .to_dtype(DType::BF16)?;
    // Freed memory stays in the pool until the registry releases it, as in
    // `generate`; the setup's own (the weights' first copy) goes back first.
    keep_freed_memory(&ctx)?;
    super::pool::release_freed_memory(&ctx)?;
    let held0 = held(&ctx)?;
    let live0 = live(&ctx)?;
    let gpu = PooledCuda::new(CudaMemory::new(0)?);
    let mut reg = Registry::new(RegistryConfig::default(), vec![Box::new(gpu), Box::new(HostMemory::unbounded())])?;
    let cuda = DeviceSpec::Cuda(0);
    let (mut loads, mut offloads) = (Vec::new(), Vec::new());
    for round in 1..=3 {
        let job = reg.begin_job("gpu-check");
        let spec = ModelSpec::uniform("siglip", Role::ImageEncoder, cuda, predicted, cfg.num_hidden_layers, "layer");
        let h = reg.register_in(job, spec)?;
        reg.begin_stage("encode");
        let plan = reg.load_for_job(&JobRequest::new(cuda, &[h.model]))?;
        let moved: u64 = plan.moves.iter().filter(|m| m.to == cuda).map(|m| m.bytes).sum();
        // The owner executes the plan: every unit comes in, so all weights.
        let t = Instant::now();
        let weights = if moved > 0 { stash.reload()? } else { Default::default() };
        loads.push(predicted as f64 / t.elapsed().as_secs_f64() / 1e9);
        let (placed, used) = (reg.placed_bytes(cuda), live(&ctx)?.saturating_sub(live0));
        r.bool_check(
            Section::Registry,
            format!("job {round}: SigLIP loaded, registry vs driver"),
            format!("registry {:.1} MiB, driver {:.1} MiB{}", mib(placed), mib(used), cache_note(&ctx)),
            "within 5 %".into(),
            used.abs_diff(placed) * 20 <= placed.max(1),
        );
        if moved > 0 {
            // Round 1 reloads what `new` copied out tensor by tensor; later
            // rounds what an offload of the reloaded views copied in one piece.
            let same = fingerprint(&weights)? == want;
            r.bool_check(
                Section::Registry,
                format!("job {round}: reloaded weights are the originals"),
                format!("{} tensors, per-tensor f64 sums", want.len()),
                "equal".into(),
                same,
            );
        }
        {
            let model = SiglipVisionModel::new(&cfg, VarBuilder::from_tensors(weights.clone(), DType::BF16, dev))?;
            drop(model.forward(&pixels)?);
            dev.synchronize()?;
        }
        reg.embeddings_ready(&[h.model])?;
        let offloaded = reg.model(h.model).is_some_and(|m| m.loaded_bytes == 0);
        let t = Instant::now();
        if offloaded {
            stash.offload(&weights)?;
            drop(weights);
            dev.synchronize()?;
        }
        offloads.push(predicted as f64 / t.elapsed().as_secs_f64() / 1e9);
        let (placed, used) = (reg.placed_bytes(cuda), live(&ctx)?.saturating_sub(live0));
        r.bool_check(
            Section::Registry,
            format!("job {round}: embeddings ready → offloaded to pinned memory"),
            format!("registry {:.1} MiB, driver {:.1} MiB{}", mib(placed), mib(used), cache_note(&ctx)),
            "registry 0, driver < 64 MiB".into(),
            offloaded && placed == 0 && used < 64 * MIB,
        );
        reg.end_job(job);
        let released = reg.release_cached(&format!("gpu-check job {round} ended"))?;
        let used = held(&ctx)?.saturating_sub(held0);
        r.bool_check(
            Section::Registry,
            format!("job {round}: ended, the pool's cache released"),
            format!("{:.1} MiB released; driver {:.1} MiB, nothing cached", mib(released), mib(used)),
            "some released, driver < 64 MiB".into(),
            released > 0 && used < 64 * MIB,
        );
        reg.audit()?;
    }
    let used = held(&ctx)?.saturating_sub(held0);
    r.bool_check(
        Section::Registry,
        "after 3 jobs: nothing grew",
        format!("driver {:.1} MiB, registry {} B", mib(used), reg.placed_bytes(cuda)),
        "< 64 MiB, 0 B".into(),
        used < 64 * MIB && reg.placed_bytes(cuda) == 0,
    );
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let gb = predicted as f64 / 1e9;
    let (off, load) = (best(&offloads), best(&loads));
    r.info(
        Section::Bench,
        format!("encoder offload GPU → pinned host ({gb:.2} GB), best of 3"),
        format!("{off:.1} GB/s"),
        "≥ 45 GB/s (target)".into(),
        if off >= 45.0 { "met".into() } else { "**not met**".into() },
    );
    r.info(
        Section::Bench,
        format!("encoder reload pinned host → GPU ({gb:.2} GB), best of 3"),
        format!("{load:.1} GB/s"),
        "—".into(),
        String::new(),
    );
    Ok(())
}

/// Each tensor's sum and sum of squares, in f64 by name: equal values give
/// equal sums (candle's reductions have a fixed order), a tensor read from
/// the wrong place or misplaced does not.
fn fingerprint(weights: &HashMap<String, Tensor>) -> Result<Vec<(String, f64, f64)>> {
    let mut out = weights
        .iter()
        .map(|(name, t)| {
            let t = t.to_dtype(DType::F64)?;
            let sum = t.sum_keepdim(D::Minus1)?.sum_all()?.to_scalar::<f64>()?;
            let squares = t.sqr()?.sum_keepdim(D::Minus1)?.sum_all()?.to_scalar::<f64>()?;
            Ok((name.clone(), sum, squares))
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Host ↔ device copy speed, pinned and pageable, against PyTorch's on the same card.
pub fn transfers(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let Some(ctx) = context(&o.device) else { return Ok(()) };
    let n: usize = if o.quick { 16 << 20 } else { 256 << 20 }; // f32 elements: 64 MiB / 1 GiB
    let bytes = (n * 4) as f64;
    let stream = ctx.default_stream();
    // SAFETY: written by the first copy into it before it is read.
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }.map_err(driver)?;
    let mut pageable = vec![0.5f32; n];
    let mut dbuf = stream.alloc_zeros::<f32>(n).map_err(driver)?;
    let gbs = |f: &mut dyn FnMut() -> std::result::Result<(), DriverError>| -> Result<f64> {
        f().map_err(driver)?;
        stream.synchronize().map_err(driver)?;
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            f().map_err(driver)?;
            stream.synchronize().map_err(driver)?;
            best = best.max(bytes / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    };
    let h2d_pinned = gbs(&mut || stream.memcpy_htod(&pinned, &mut dbuf))?;
    let h2d_pageable = gbs(&mut || stream.memcpy_htod(pageable.as_slice(), &mut dbuf))?;
    let d2h_pinned = gbs(&mut || stream.memcpy_dtoh(&dbuf, &mut pinned))?;
    let d2h_pageable = gbs(&mut || stream.memcpy_dtoh(&dbuf, pageable.as_mut_slice()))?;
    for (what, ours, key) in [
        ("host → device, pinned", h2d_pinned, "h2d_pinned_gbs"),
        ("host → device, pageable", h2d_pageable, "h2d_pageable_gbs"),
        ("device → host, pinned", d2h_pinned, "d2h_pinned_gbs"),
        ("device → host, pageable", d2h_pageable, "d2h_pageable_gbs"),
    ] {
        let torch = o.torch.as_ref().and_then(|t| t.get(key).copied());
        r.info(
            Section::Bench,
            format!("{what}, {:.2} GiB, best of 5", gib((n * 4) as u64)),
            format!("{ours:.1} GB/s"),
            torch.map_or("—".into(), |t| format!("{t:.1} GB/s")),
            torch.map_or(String::new(), |t| format!("{:.2}×", ours / t)),
        );
    }
    Ok(())
}
