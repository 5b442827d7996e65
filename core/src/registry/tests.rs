//! Unit tests: one per rule (policy, state, lifetime rule).

use super::*;

const GPU: DeviceSpec = DeviceSpec::Cuda(0);
const MB: u64 = 1 << 20;

fn registry(capacity: u64, config: RegistryConfig) -> Registry {
    let devices: Vec<Box<dyn MemoryDevice>> =
        vec![Box::new(BudgetedDevice::new(GPU, capacity)), Box::new(HostMemory::unbounded())];
    match Registry::new(config, devices) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

fn no_margin() -> RegistryConfig {
    RegistryConfig { safety_margin_bytes: 0, ..RegistryConfig::default() }
}

fn model(name: &str, mb: u64, units: usize) -> ModelSpec {
    ModelSpec::uniform(name, Role::Other, GPU, mb * MB, units, "block")
}

fn reg(r: &mut Registry, spec: ModelSpec) -> ModelHandle {
    match r.register(spec) {
        Ok(h) => h,
        Err(e) => panic!("{e}"),
    }
}

fn job(r: &mut Registry, models: &[ModelId], working_mb: u64) -> JobPlan {
    match r.load_for_job(&JobRequest::new(GPU, models).working(working_mb * MB)) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn loaded_mb(r: &Registry, id: ModelId) -> u64 {
    r.model(id).map_or(u64::MAX, |m| m.loaded_bytes / MB)
}

fn ok_audit(r: &Registry) {
    if let Err(e) = r.audit() {
        panic!("{e}");
    }
}

#[test]
fn registration_counts_on_the_offload_device_and_loading_moves_it() {
    let mut r = registry(1000 * MB, no_margin());
    let a = reg(&mut r, model("a", 300, 3)).model;
    assert_eq!((r.placed_bytes(DeviceSpec::Cpu), r.placed_bytes(GPU)), (300 * MB, 0));
    let plan = job(&mut r, &[a], 100);
    assert_eq!((r.placed_bytes(DeviceSpec::Cpu), r.placed_bytes(GPU)), (0, 300 * MB));
    assert_eq!(plan.moves.len(), 3);
    assert!(!plan.streams());
    assert_eq!(plan.peak_bytes, 400 * MB);
    assert_eq!(r.traffic().h2d_bytes, 300 * MB);
    assert!(r.events().iter().any(|e| e.op == Op::Load && e.model == "a" && e.device == "cuda:0"));
    ok_audit(&r);
}

#[test]
fn the_same_weights_are_counted_once_and_release_is_idempotent() {
    let mut r = registry(1000 * MB, no_margin());
    let h1 = reg(&mut r, model("flux", 300, 3).with_weights_key("flux1-dev.safetensors"));
    let h2 = reg(&mut r, model("flux again", 300, 3).with_weights_key("flux1-dev.safetensors"));
    assert_eq!(h1.model, h2.model);
    assert_ne!(h1, h2);
    assert_eq!(r.placed_bytes(DeviceSpec::Cpu), 300 * MB);
    assert!(r.register(model("liar", 10, 1).with_weights_key("flux1-dev.safetensors")).is_err());
    assert_eq!(r.release(h1), Released::StillHeld);
    assert_eq!(r.release(h1), Released::AlreadyReleased);
    assert_eq!(r.placed_bytes(DeviceSpec::Cpu), 300 * MB);
    assert_eq!(r.release(h2), Released::Freed { bytes: 300 * MB });
    assert_eq!(r.release(h2), Released::AlreadyReleased);
    assert_eq!(r.placed_bytes(DeviceSpec::Cpu), 0);
    assert!(r.models().is_empty());
    ok_audit(&r);
}

#[test]
fn a_stale_id_never_reaches_a_new_model_in_the_same_slot() {
    let mut r = registry(1000 * MB, no_margin());
    let old = reg(&mut r, model("old", 10, 1));
    r.release(old);
    let new = reg(&mut r, model("new", 20, 1));
    assert_eq!(r.release(old), Released::AlreadyReleased);
    assert!(r.model(old.model).is_none());
    assert_eq!(r.model(new.model).map(|m| m.name), Some("new".to_string()));
    assert!(r.load_for_job(&JobRequest::new(GPU, &[old.model])).is_err());
}

#[test]
fn attached_models_come_with_their_owner_and_stay_alive_with_it() {
    let mut r = registry(1000 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 300, 3));
    let enc = reg(&mut r, model("encoder", 50, 1));
    let proj = reg(&mut r, model("projection", 40, 1));
    let procs = reg(&mut r, model("processors", 60, 6));
    let ip = [enc.model, proj.model, procs.model];
    assert!(r.attach(flux.model, "ipadapter_flux", &ip).is_ok());
    assert!(r.attach(flux.model, "ipadapter_flux", &ip).is_ok(), "re-attaching replaces");
    assert_eq!(r.nested(flux.model).len(), 3);
    let plan = job(&mut r, &[flux.model], 0);
    assert_eq!(plan.placements.len(), 4);
    assert_eq!(r.placed_bytes(GPU), 450 * MB);
    for h in [enc, proj, procs] {
        assert_eq!(r.release(h), Released::StillHeld, "the owner still holds it");
    }
    assert_eq!(r.models().len(), 4);
    assert!(r.detach(flux.model, "ipadapter_flux"));
    assert!(!r.detach(flux.model, "ipadapter_flux"));
    assert_eq!(r.models().len(), 1);
    assert_eq!(r.placed_bytes(GPU), 300 * MB);
    ok_audit(&r);
}

#[test]
fn cycles_are_refused_and_shared_children_counted_once() {
    let mut r = registry(1000 * MB, no_margin());
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|n| reg(&mut r, model(n, 10, 1)).model);
    assert!(r.attach(a, "x", &[b]).is_ok());
    assert!(r.attach(b, "x", &[c]).is_ok());
    assert!(r.attach(c, "x", &[a]).is_err(), "c → a closes a → b → c");
    assert!(r.attach(a, "self", &[a]).is_err());
    assert!(r.attach(a, "y", &[d, d]).is_ok());
    assert!(r.attach(b, "y", &[d]).is_ok());
    let nested = r.nested(a);
    assert_eq!(nested.len(), 3, "{nested:?}");
    job(&mut r, &[a], 0);
    assert_eq!(r.placed_bytes(GPU), 40 * MB, "d is loaded once");
    ok_audit(&r);
}

/// Three resident models outside the job (a: 40, b: 30, c: 20; used in that
/// order, b partially evicted earlier) and a job needing 50 of the 100.
fn eviction_setup(policy: EvictionPolicy) -> (Registry, [ModelId; 4]) {
    let mut r = registry(100 * MB, RegistryConfig { policy, ..no_margin() });
    let a = reg(&mut r, model("a", 40, 4)).model;
    let b = reg(&mut r, model("b", 30, 3)).model;
    let c = reg(&mut r, model("c", 20, 2)).model;
    let d = reg(&mut r, model("d", 50, 5)).model;
    job(&mut r, &[a], 0);
    job(&mut r, &[b], 0);
    job(&mut r, &[c], 0);
    (r, [a, b, c, d])
}

fn evicted(r: &Registry) -> Vec<String> {
    r.events().iter().filter(|e| e.op == Op::Evict).map(|e| format!("{}:{}", e.model, e.bytes / MB)).collect()
}

#[test]
fn lru_evicts_the_least_recently_used_only_as_much_as_needed() {
    let (mut r, [_, _, _, d]) = eviction_setup(EvictionPolicy::Lru);
    job(&mut r, &[d], 0);
    assert_eq!(evicted(&r), ["a:40"]);
    let (mut r, [_, _, _, d]) = eviction_setup(EvictionPolicy::Lru);
    job(&mut r, &[d], 20);
    assert_eq!(evicted(&r), ["a:40", "b:20"], "70 needed, 10 free: all of a, then b's last two units");
    ok_audit(&r);
}

#[test]
fn largest_first_evicts_the_biggest_resident_model() {
    let (mut r, [.., d]) = eviction_setup(EvictionPolicy::LargestFirst);
    job(&mut r, &[d], 5);
    assert_eq!(evicted(&r), ["a:40", "b:10"], "b gives up one 10 MiB unit, not all");
}

#[test]
fn furthest_next_use_keeps_what_the_next_stages_need() {
    let (mut r, [a, b, c, d]) = eviction_setup(EvictionPolicy::FurthestNextUse);
    let request = JobRequest::new(GPU, &[d]).working(5 * MB).lookahead(vec![vec![a], vec![c]]);
    assert!(r.load_for_job(&request).is_ok());
    assert_eq!(evicted(&r), ["b:30", "c:20"], "b is never needed again, c after a");
    assert_eq!(loaded_mb(&r, a), 40);
    assert_eq!(loaded_mb(&r, b), 0);
    let reasons: Vec<_> = r.events().iter().filter(|e| e.op == Op::Evict).map(|e| e.reason.clone()).collect();
    assert!(
        reasons[0].contains("not needed by later stages") && reasons[0].contains("furthest-next-use"),
        "{reasons:?}"
    );
}

#[test]
fn furthest_next_use_beats_lru_and_comfyui_when_a_model_comes_back() {
    // Room for two of three 40 MiB models; stages a, b, c, a. At c, LRU and
    // ComfyUI's key evict a (oldest / tie broken by size and order) and must load it
    // again; furthest-next-use evicts b, which is never needed again.
    let h2d = |policy| {
        let mut r = registry(90 * MB, RegistryConfig { policy, ..no_margin() });
        let [a, b, c] = ["a", "b", "c"].map(|n| reg(&mut r, model(n, 40, 4)).model);
        let stages = [a, b, c, a];
        for (i, &m) in stages.iter().enumerate() {
            let ahead = stages[i + 1..].iter().map(|&x| vec![x]).collect();
            if let Err(e) = r.load_for_job(&JobRequest::new(GPU, &[m]).lookahead(ahead)) {
                panic!("{e}");
            }
        }
        ok_audit(&r);
        r.traffic().h2d_bytes / MB
    };
    assert_eq!(h2d(EvictionPolicy::FurthestNextUse), 120);
    assert_eq!(h2d(EvictionPolicy::Lru), 150, "30 MiB of a evicted at c and loaded again");
    assert_eq!(h2d(EvictionPolicy::ComfyUi), 150);
}

#[test]
fn comfyui_key_evicts_partially_offloaded_models_first_then_the_smallest() {
    let (mut r, _) = eviction_setup(EvictionPolicy::ComfyUi);
    let small = reg(&mut r, model("small", 10, 1)).model;
    job(&mut r, &[small], 5);
    assert_eq!(evicted(&r), ["c:10"], "nothing offloaded yet, one holder each: smallest first");
    let e = reg(&mut r, model("e", 25, 5)).model;
    job(&mut r, &[e], 0);
    assert_eq!(evicted(&r), ["c:10", "c:10", "small:10"], "c is partially offloaded, so it goes first");
    ok_audit(&r);
}

#[test]
fn normal_state_loads_partially_and_streams_when_the_job_does_not_fit() {
    let mut r = registry(100 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20)).model;
    let plan = job(&mut r, &[flux], 10);
    assert!(plan.streams());
    assert_eq!(plan.stream_buffer_bytes, 20 * MB, "two 10 MiB units in flight");
    let resident = plan.placements[0].resident.len();
    assert_eq!(resident, 7, "100 - 10 working - 20 buffer = 70 MiB of blocks");
    assert_eq!(plan.placements[0].resident, (0..7).collect::<Vec<_>>(), "the first blocks, in order");
    assert_eq!(plan.stream_bytes_per_use, 130 * MB);
    assert!(plan.peak_bytes <= 100 * MB);
    r.stream(&plan, 4);
    assert_eq!(r.traffic().h2d_bytes, 70 * MB + 4 * 130 * MB);
    assert!(r.events().iter().any(|e| e.op == Op::PartialLoad && e.reason.contains("7/20 units")));
    ok_audit(&r);
}

#[test]
fn a_model_that_cannot_stream_is_resident_whole_beside_one_that_streams() {
    // 100 MiB: 10 working; a 50 MiB net loaded whole (the smaller model, which
    // would otherwise go first into the room left by the net's 50 MiB and a
    // 10 MiB block in the stream buffer) and Flux's blocks in what is left.
    let mut r = registry(100 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20)).model;
    let net = reg(&mut r, model("net", 50, 1).resident_only()).model;
    let plan = job(&mut r, &[flux, net], 10);
    let placed =
        |id: ModelId| plan.placements.iter().find(|p| p.model == id).map(|p| (p.resident.len(), p.streamed.len()));
    assert_eq!(placed(net), Some((1, 0)), "the net is resident whole");
    assert_eq!(placed(flux), Some((2, 18)), "100 - 10 working - 20 buffer - 50 net = 20 MiB of blocks");
    assert!(plan.peak_bytes <= 100 * MB);
    ok_audit(&r);
    // The same net, streamable, would have been streamed in its whole 50 MiB unit instead: its
    // unit is the largest, so the buffer alone takes it.
    let mut r = registry(100 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20)).model;
    let net = reg(&mut r, model("net", 50, 1)).model;
    let plan = job(&mut r, &[flux, net], 10);
    assert!(plan.placements.iter().any(|p| p.model == net && p.streamed == [0]));
    // No room for it whole beside the working memory and a stream buffer: a clear error, nothing moved.
    let mut r = registry(70 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20)).model;
    let net = reg(&mut r, model("net", 50, 1).resident_only()).model;
    let err = r.load_for_job(&JobRequest::new(GPU, &[flux, net]).working(10 * MB));
    assert!(matches!(err, Err(Error::OutOfMemory { .. })), "{err:?}");
    assert!(format!("{:?}", err.err()).contains("cannot be streamed"));
    assert_eq!(r.placed_bytes(GPU), 0);
    ok_audit(&r);
}

#[test]
fn a_streamable_models_base_units_are_never_streamed() {
    // 70 MiB, 10 working. A ControlNet (a 30 MiB base, then two 10 MiB blocks) beside Flux (20 units of
    // 10 MiB), each with its first unit resident whenever it runs: the bases are placed first, the
    // blocks stream through a 20 MiB buffer.
    let net_spec = || {
        let mut spec = model("net", 50, 3);
        spec.units[0].bytes = 30 * MB;
        spec.units[1].bytes = 10 * MB;
        spec.units[2].bytes = 10 * MB;
        spec
    };
    let placed = |plan: &JobPlan, id: ModelId| {
        plan.placements.iter().find(|p| p.model == id).map(|p| (p.resident.clone(), p.streamed.len()))
    };
    let mut r = registry(70 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20).with_resident_units(1)).model;
    let net = reg(&mut r, net_spec().with_resident_units(1)).model;
    let plan = job(&mut r, &[flux, net], 10);
    assert_eq!(placed(&plan, net), Some((vec![0], 2)), "the net's base resident, its blocks streamed");
    assert_eq!(placed(&plan, flux), Some((vec![0], 19)));
    assert!(plan.peak_bytes <= 70 * MB);
    ok_audit(&r);
    // Without the rule, the fill order (the smaller model first) streams the net's base: its 30 MiB
    // are in the buffer, and its blocks take the room left.
    let mut r = registry(70 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20)).model;
    let net = reg(&mut r, net_spec()).model;
    let plan = job(&mut r, &[flux, net], 10);
    assert_eq!(placed(&plan, net), Some((vec![1, 2], 1)));
    // No room for both bases beside the buffer and the working memory: a clear error, nothing moved.
    let mut r = registry(60 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 200, 20).with_resident_units(1)).model;
    let net = reg(&mut r, net_spec().with_resident_units(1)).model;
    let err = r.load_for_job(&JobRequest::new(GPU, &[flux, net]).working(10 * MB));
    assert!(matches!(err, Err(Error::OutOfMemory { .. })), "{err:?}");
    assert_eq!(r.placed_bytes(GPU), 0);
    ok_audit(&r);
}

#[test]
fn low_state_caps_weights_at_a_share_of_usable_memory() {
    let mut r = registry(100 * MB, RegistryConfig { state: VramState::Low, ..no_margin() });
    let m = reg(&mut r, model("m", 80, 8)).model;
    let plan = job(&mut r, &[m], 0);
    assert_eq!(plan.placements[0].resident.len(), 5, "50% of 100 MiB");
    assert!(plan.streams());
    ok_audit(&r);
}

#[test]
fn low_state_shrinks_a_model_loaded_fully_before() {
    let mut r = registry(100 * MB, no_margin());
    let m = reg(&mut r, model("m", 80, 8)).model;
    job(&mut r, &[m], 0);
    assert_eq!(loaded_mb(&r, m), 80);
    r.set_state(VramState::Low);
    job(&mut r, &[m], 0);
    assert_eq!(loaded_mb(&r, m), 50);
    assert!(r.events().iter().any(|e| e.op == Op::Offload && e.reason.contains("low VRAM")));
    ok_audit(&r);
}

#[test]
fn no_vram_state_keeps_nothing_resident() {
    let mut r = registry(100 * MB, RegistryConfig { state: VramState::NoVram, ..no_margin() });
    let m = reg(&mut r, model("m", 30, 3)).model;
    let plan = job(&mut r, &[m], 10);
    assert_eq!(r.placed_bytes(GPU), 0);
    assert_eq!(plan.placements[0].streamed.len(), 3);
    assert_eq!(plan.peak_bytes, 30 * MB, "10 working + two 10 MiB units in flight");
}

#[test]
fn high_state_refuses_partial_loading_and_changes_nothing() {
    let mut r = registry(100 * MB, RegistryConfig { state: VramState::High, ..no_margin() });
    let small = reg(&mut r, model("small", 30, 1)).model;
    job(&mut r, &[small], 0);
    let big = reg(&mut r, model("big", 120, 12)).model;
    let before = (r.placed_bytes(GPU), r.events().len(), r.traffic());
    let err = r.load_for_job(&JobRequest::new(GPU, &[big])).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("--vram-state normal") && err.contains("cuda:0"), "{err}");
    assert_eq!((r.placed_bytes(GPU), r.events().len(), r.traffic()), before);
    let fits = reg(&mut r, model("fits", 90, 9)).model;
    job(&mut r, &[fits], 0);
    assert_eq!(loaded_mb(&r, fits), 90);
    assert_eq!(loaded_mb(&r, small), 0, "others are still evicted to make room");
    ok_audit(&r);
}

#[test]
fn a_job_that_cannot_fit_even_streaming_is_a_clear_error() {
    let mut r = registry(100 * MB, no_margin());
    let m = reg(&mut r, model("m", 60, 1)).model;
    let err = r.load_for_job(&JobRequest::new(GPU, &[m]).working(50 * MB)).err();
    assert!(matches!(err, Some(Error::OutOfMemory { .. })), "{err:?}");
    assert_eq!(r.placed_bytes(GPU), 0);
    ok_audit(&r);
}

#[test]
fn reserve_and_margin_are_kept_free() {
    let config = RegistryConfig { reserve_bytes: 30 * MB, safety_margin_bytes: 10 * MB, ..RegistryConfig::default() };
    let mut r = registry(100 * MB, config);
    assert_eq!(r.usable_bytes(GPU), 60 * MB);
    let m = reg(&mut r, model("m", 100, 10)).model;
    let plan = job(&mut r, &[m], 0);
    assert_eq!(plan.placements[0].resident.len(), 4, "60 - 20 buffer");
    assert!(plan.peak_bytes <= 60 * MB);
    assert_eq!(r.usable_bytes(DeviceSpec::Cpu), u64::MAX, "no reserve on the host");
}

#[test]
fn preprocessing_is_offloaded_once_embeddings_exist_unless_switched_off() {
    let mut r = registry(1000 * MB, no_margin());
    let flux = reg(&mut r, model("flux", 300, 3)).model;
    let enc = reg(&mut r, ModelSpec::uniform("siglip", Role::ImageEncoder, GPU, 50 * MB, 5, "layer")).model;
    let procs = reg(&mut r, ModelSpec::uniform("processors", Role::IpProcessors, GPU, 60 * MB, 6, "proc")).model;
    assert!(r.attach(flux, "ipadapter_flux", &[enc, procs]).is_ok());
    job(&mut r, &[enc], 0);
    job(&mut r, &[procs], 0);
    assert!(r.embeddings_ready(&[enc, procs]).is_ok());
    assert_eq!((loaded_mb(&r, enc), loaded_mb(&r, procs)), (0, 0));
    let plan = job(&mut r, &[flux], 0);
    assert_eq!(plan.placements.len(), 1, "cached preprocessing is not pulled in by the owner");
    assert_eq!(r.placed_bytes(GPU), 300 * MB);

    assert!(r.set_offload_preprocessing(false).is_ok());
    assert_eq!((loaded_mb(&r, enc), loaded_mb(&r, procs)), (50, 60), "moved back when switched off");
    assert!(r.set_offload_preprocessing(true).is_ok());
    assert_eq!((loaded_mb(&r, enc), loaded_mb(&r, procs)), (0, 0));
    job(&mut r, &[enc], 0);
    assert_eq!(r.model(enc).map(|m| m.outputs_cached), Some(false), "asking for it again means new outputs");
    ok_audit(&r);
}

#[test]
fn kept_preprocessing_is_kept_until_room_is_needed() {
    let mut r = registry(400 * MB, RegistryConfig { offload_preprocessing: false, ..no_margin() });
    let flux = reg(&mut r, model("flux", 300, 3)).model;
    let enc = reg(&mut r, ModelSpec::uniform("siglip", Role::ImageEncoder, GPU, 150 * MB, 3, "layer")).model;
    job(&mut r, &[enc], 0);
    assert!(r.embeddings_ready(&[enc]).is_ok());
    assert_eq!(loaded_mb(&r, enc), 150);
    assert!(r.events().iter().any(|e| e.op == Op::Keep));
    job(&mut r, &[flux], 0);
    assert_eq!(loaded_mb(&r, enc), 100, "evicted only as far as flux needed");
    ok_audit(&r);
}

#[test]
fn jobs_release_what_they_registered_once() {
    let mut r = registry(1000 * MB, no_margin());
    let j = r.begin_job("txt2img");
    let a = r.register_in(j, model("a", 10, 1));
    assert!(a.is_ok());
    assert!(r.register_in(j, model("b", 10, 1)).is_ok());
    assert_eq!(r.end_job(j), 2);
    assert_eq!(r.end_job(j), 0);
    assert!(r.register_in(j, model("c", 10, 1)).is_err());
    if let Ok(a) = a {
        assert_eq!(r.release(a), Released::AlreadyReleased);
    }
    assert!(r.models().is_empty());
    assert_eq!(r.placed_bytes(DeviceSpec::Cpu), 0);
}

#[test]
fn one_pool_per_canonical_device_name() {
    let mut r = registry(100 * MB, no_margin());
    let again = match "cuda".parse::<DeviceSpec>() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    assert!(r.add_device(Box::new(BudgetedDevice::new(again, 100 * MB))).is_err());
    let stray = ModelSpec::uniform("x", Role::Other, DeviceSpec::Cuda(3), MB, 1, "u");
    assert!(r.register(stray).is_err());
}

/// A GPU whose platform reports free memory and whose allocator caches freed
/// bytes (CUDA's memory pool with a raised release threshold).
#[derive(Debug)]
struct CachingGpu {
    placed: u64,
    total: u64,
    /// Free as the platform reports it: the cache counts as used there.
    free: u64,
    cached: u64,
}

impl MemoryDevice for CachingGpu {
    fn id(&self) -> DeviceSpec {
        GPU
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn reported_free_bytes(&self) -> Option<u64> {
        Some(self.free)
    }
    fn placed_bytes(&self) -> u64 {
        self.placed
    }
    fn place(&mut self, bytes: u64) -> Result<(), DeviceFull> {
        place_within(GPU, &mut self.placed, self.total, bytes)
    }
    fn remove(&mut self, bytes: u64) {
        self.placed = self.placed.saturating_sub(bytes);
    }
    fn cached_bytes(&self) -> u64 {
        self.cached
    }
    fn release_cached(&mut self) -> Result<u64> {
        self.free += self.cached;
        Ok(std::mem::take(&mut self.cached))
    }
}

#[test]
fn the_allocators_cache_counts_as_free_and_goes_back_once_with_an_event() {
    // 10 000 MB card: 2 000 MB used by another program, 3 000 MB cached by ours.
    let gpu = CachingGpu { placed: 0, total: 10_000 * MB, free: 5_000 * MB, cached: 3_000 * MB };
    let devices: Vec<Box<dyn MemoryDevice>> = vec![Box::new(gpu), Box::new(HostMemory::unbounded())];
    let mut r = match Registry::new(no_margin(), devices) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.usable_bytes(GPU), 8_000 * MB);
    // A 7 500 MB model fits only because the cache is ours to reuse.
    let a = reg(&mut r, model("a", 7_500, 15));
    assert!(!job(&mut r, &[a.model], 0).streams());
    r.release(a);
    assert_eq!(r.release_cached("stage done").ok(), Some(3_000 * MB));
    assert_eq!(r.usable_bytes(GPU), 8_000 * MB, "releasing the cache changes what is free to us by nothing");
    let released: Vec<_> = r.events().iter().filter(|e| e.op == Op::ReleaseCache).collect();
    assert_eq!(released.len(), 1);
    assert_eq!((released[0].bytes, released[0].reason.as_str()), (3_000 * MB, "stage done"));
    // A second release finds nothing and says nothing.
    assert_eq!(r.release_cached("again").ok(), Some(0));
    assert_eq!(r.events().iter().filter(|e| e.op == Op::ReleaseCache).count(), 1);
    ok_audit(&r);
}
