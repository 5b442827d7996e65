//! The Flux benchmark's memory readings (`bench_flux::run`), checked with a
//! probe that knows this process's live heap bytes exactly: a counting
//! global allocator. One test in a binary of its own, so no other test's
//! allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipaflux::bench_flux::{self, FluxBenchOptions, PeakMemory};
use ipaflux_core::candle_core::DType;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

struct Counting;

fn grew(by: u64) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size() as u64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size() as u64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            grew(new_size as u64);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live heap bytes, the way the driver probe reads device memory.
#[derive(Debug)]
struct Heap;

impl PeakMemory for Heap {
    fn reset(&self) {
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    fn peak(&self) -> Option<u64> {
        Some(PEAK.load(Ordering::Relaxed))
    }
    fn in_use(&self) -> Option<u64> {
        Some(LIVE.load(Ordering::Relaxed))
    }
}

#[test]
fn the_plain_step_is_measured_without_the_adapter_and_the_kv_row_is_the_cache() {
    // The narrow model: 1 double + 1 single block, 2 heads of 128, f32.
    let o = FluxBenchOptions {
        narrow: true,
        txt_tokens: 8,
        peak: Arc::new(Heap),
        ..FluxBenchOptions::cpu(64, 1, 1, 1, DType::F32)
    };
    let rows = bench_flux::run(&o).unwrap();
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix)).unwrap();
    let plain = find("step, no IP").memory.unwrap();
    let ip = find("step, IP with cached").memory.unwrap();
    let kv = find("  K/V").resident_added.unwrap();

    // K and V of 2 blocks, each [1, 2 heads, 128 tokens, 128] f32.
    let kv_bytes = 2 * 2 * 128 * 256 * 4;
    assert!((kv_bytes..kv_bytes + (64 << 10)).contains(&kv), "K/V cache {kv} B, its tensors {kv_bytes} B");
    // to_k_ip and to_v_ip of 2 blocks, [256, 4096] f32: resident for the IP
    // step, not yet for the plain one.
    let processors = 2 * 2 * 256 * 4096 * 4;
    assert!(
        ip.before >= plain.before + processors + kv_bytes,
        "plain step: {} B in use before it; IP step: {} B",
        plain.before,
        ip.before
    );
    // Each step allocates its activations (tokens × hidden and more, f32).
    assert!(plain.working() >= 72 * 256 * 4, "{plain:?}");
    assert!(plain.peak >= plain.before && ip.peak >= ip.before);
    // The table prints both memory columns.
    let table = bench_flux::table(&rows, &o);
    assert!(table.contains("added") && table.lines().count() > rows.len(), "{table}");
}
