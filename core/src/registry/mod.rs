//! The memory registry: knows where every byte of every model lives and
//! decides what to load, partially load, stream, offload and evict for a job.
//!
//! Ideas from ComfyUI's `model_management` (VRAM states, a load and an offload
//! device per model, partial loading, a reserve, nested "additional models"),
//! not its shape: the [`Registry`] is a value the caller owns (no globals),
//! eviction follows a named [`EvictionPolicy`], and cleanup is explicit and
//! idempotent — there are no finalizers.
//!
//! What it does: accounting and decisions. Each model is a list of units
//! (blocks, layers, processors) placed one by one on [`MemoryDevice`]s;
//! [`Registry::load_for_job`] returns a [`JobPlan`] listing the unit
//! [`Move`]s it made and which units are resident or streamed. Every load,
//! offload, eviction, stream and release is an [`Event`] in the timeline and a
//! `tracing` event (target `ipaflux::registry`) with model, bytes, device and reason.
//!
//! What it does not do: move tensors. The owner of a model executes the moves
//! (copying real buffers), so the same decisions serve CUDA, WebGPU and plans.
//!
//! **Invariants** (checked by [`Registry::audit`], property-tested):
//! every device's placed bytes equal the bytes of the units the registry
//! says are there; resident bytes never exceed capacity minus reserve; the
//! same weights (same `weights_key`) are one entry; releasing twice changes nothing.

mod bytes;
#[cfg(feature = "cuda")]
mod cuda;
mod job;
mod memory;
mod model;
mod policy;
pub mod scenario;
mod timeline;

#[cfg(test)]
mod proptests;

use std::collections::{BTreeMap, BTreeSet};

pub use bytes::{parse_bytes, Bytes};
#[cfg(feature = "cuda")]
pub use cuda::CudaMemory;
pub use job::{JobPlan, JobRequest, ModelPlacement, Move};
pub use memory::{place_within, BudgetedDevice, DeviceFull, HostMemory, MemoryDevice};
pub use model::{JobId, ModelHandle, ModelId, ModelSpec, Role, UnitSpec};
pub use policy::{EvictionPolicy, RegistryConfig, VramState, DEFAULT_LOW_VRAM_WEIGHT_PERCENT, DEFAULT_SAFETY_MARGIN};
pub use timeline::{Event, Op, Traffic};

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use model::{Entry, Unit};

/// What [`Registry::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The handle was the last claim: the model left the registry.
    Freed { bytes: u64 },
    /// The handle is gone; another handle or an owner still holds the model.
    StillHeld,
    /// The handle had been released before (or its model is gone): nothing changed.
    AlreadyReleased,
}

/// A model's state, for callers and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub id: ModelId,
    pub name: String,
    pub role: Role,
    pub size_bytes: u64,
    /// Bytes on the load device.
    pub loaded_bytes: u64,
    pub resident_units: usize,
    pub units: usize,
    pub load_device: DeviceSpec,
    pub offload_device: DeviceSpec,
    pub outputs_cached: bool,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// The registry. See the module docs.
#[derive(Debug)]
pub struct Registry {
    config: RegistryConfig,
    devices: Vec<Box<dyn MemoryDevice>>,
    slots: Vec<Slot>,
    next_lease: u64,
    next_job: u64,
    jobs: BTreeMap<JobId, (String, Vec<ModelHandle>)>,
    /// Logical time: one tick per job.
    clock: u64,
    stage: String,
    events: Vec<Event>,
    traffic: Traffic,
    /// Highest resident + working + stream-buffer bytes seen per device.
    peaks: BTreeMap<DeviceSpec, u64>,
}

impl Registry {
    /// A registry with the given devices (one per canonical id).
    pub fn new(config: RegistryConfig, devices: Vec<Box<dyn MemoryDevice>>) -> Result<Self> {
        let mut registry = Self {
            config,
            devices: Vec::new(),
            slots: Vec::new(),
            next_lease: 0,
            next_job: 0,
            jobs: BTreeMap::new(),
            clock: 0,
            stage: "setup".to_string(),
            events: Vec::new(),
            traffic: Traffic::default(),
            peaks: BTreeMap::new(),
        };
        for device in devices {
            registry.add_device(device)?;
        }
        Ok(registry)
    }

    /// Adds a device; a second device with the same canonical id is refused, so
    /// `cuda` and `cuda:0` can never become two pools.
    pub fn add_device(&mut self, device: Box<dyn MemoryDevice>) -> Result<()> {
        let id = device.id();
        if self.device(id).is_some() {
            return Err(Error::Registry(format!("device {id} is already registered")));
        }
        self.devices.push(device);
        Ok(())
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    pub fn set_state(&mut self, state: VramState) {
        self.config.state = state;
    }

    pub fn set_policy(&mut self, policy: EvictionPolicy) {
        self.config.policy = policy;
    }

    /// Names the stage that the following events belong to.
    pub fn begin_stage(&mut self, name: &str) {
        self.stage = name.to_string();
    }

    // ----- registration and lifetime -------------------------------------------------

    /// Registers a model; its bytes count on its offload device until loaded.
    /// Registering weights whose `weights_key` is already live returns a new
    /// handle to the existing entry (counted once).
    pub fn register(&mut self, spec: ModelSpec) -> Result<ModelHandle> {
        self.validate_spec(&spec)?;
        let lease = self.next_lease;
        self.next_lease += 1;
        if let Some(id) = spec.weights_key.as_deref().and_then(|k| self.find_weights(k)) {
            return self.share(id, &spec, lease);
        }
        let entry = new_entry(spec, lease);
        let (size, on_host) = (entry.size(), entry.offload_device);
        let at = if entry.moves() { on_host } else { entry.load_device };
        self.device_mut(at)?.place(size).map_err(|e| Error::Registry(format!("cannot register: {e}")))?;
        let name = entry.name.clone();
        let id = self.insert(entry);
        self.emit(Op::Register, &name, size, at, "registered; weights wait on this device until a job loads them");
        Ok(ModelHandle { model: id, lease })
    }

    fn share(&mut self, id: ModelId, spec: &ModelSpec, lease: u64) -> Result<ModelHandle> {
        let entry = self.entry_mut(id)?;
        if entry.size() != spec.bytes() {
            let key = spec.weights_key.clone().unwrap_or_default();
            return Err(Error::Registry(format!(
                "weights `{key}` are registered as `{}` with {} but `{}` claims {}",
                entry.name,
                Bytes(entry.size()),
                spec.name,
                Bytes(spec.bytes())
            )));
        }
        entry.leases.insert(lease);
        let (name, device) = (entry.name.clone(), entry.offload_device);
        let reason = format!("`{}` has the same weights: new handle, counted once", spec.name);
        self.emit(Op::Register, &name, 0, device, &reason);
        Ok(ModelHandle { model: id, lease })
    }

    fn validate_spec(&self, spec: &ModelSpec) -> Result<()> {
        if spec.units.is_empty() {
            return Err(Error::Registry(format!("model `{}` has no units", spec.name)));
        }
        for device in [spec.load_device, spec.offload_device] {
            if self.device(device).is_none() {
                return Err(Error::Registry(format!(
                    "model `{}` names device {device}, which this registry does not have",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Starts a group of registrations released together by [`Registry::end_job`].
    pub fn begin_job(&mut self, name: &str) -> JobId {
        let id = JobId(self.next_job);
        self.next_job += 1;
        self.jobs.insert(id, (name.to_string(), Vec::new()));
        id
    }

    /// [`Registry::register`], with the handle also owned by `job`.
    pub fn register_in(&mut self, job: JobId, spec: ModelSpec) -> Result<ModelHandle> {
        if !self.jobs.contains_key(&job) {
            return Err(Error::Registry(format!("job {} has ended or never began", job.0)));
        }
        let handle = self.register(spec)?;
        if let Some((_, handles)) = self.jobs.get_mut(&job) {
            handles.push(handle);
        }
        Ok(handle)
    }

    /// Releases every handle the job registered. Idempotent: ending an ended job returns 0.
    pub fn end_job(&mut self, job: JobId) -> usize {
        let Some((_, handles)) = self.jobs.remove(&job) else { return 0 };
        handles.into_iter().filter(|h| !matches!(self.release(*h), Released::AlreadyReleased)).count()
    }

    /// Gives up one claim. Never fails and never panics; a second release of the
    /// same handle is [`Released::AlreadyReleased`] and changes nothing.
    pub fn release(&mut self, handle: ModelHandle) -> Released {
        let Ok(entry) = self.entry_mut(handle.model) else { return Released::AlreadyReleased };
        if !entry.leases.remove(&handle.lease) {
            return Released::AlreadyReleased;
        }
        let size = entry.size();
        if self.collect().contains(&handle.model) {
            Released::Freed { bytes: size }
        } else {
            Released::StillHeld
        }
    }

    /// Attaches `children` under `key` of `owner` (ComfyUI's additional models):
    /// jobs that need the owner need them too, and the owner keeps them alive.
    /// Attaching under a used key replaces what was there. Refuses cycles.
    pub fn attach(&mut self, owner: ModelId, key: &str, children: &[ModelId]) -> Result<()> {
        self.entry(owner)?;
        let mut unique = Vec::new();
        for &child in children {
            self.entry(child)?;
            if child == owner || self.reachable(&[child]).contains(&owner) {
                let (o, c) = (self.name_of(owner), self.name_of(child));
                return Err(Error::Registry(format!("attaching `{c}` to `{o}` would make a cycle")));
            }
            if !unique.contains(&child) {
                unique.push(child);
            }
        }
        let owner_name = self.name_of(owner);
        let replaced = self.entry_mut(owner)?.attachments.insert(key.to_string(), unique.clone());
        let note = match &replaced {
            Some(old) => format!(" (replacing {} model(s))", old.len()),
            None => String::new(),
        };
        for child in unique {
            let (name, size, device) = self.entry(child).map(|e| (e.name.clone(), e.size(), e.load_device))?;
            self.emit(Op::Attach, &name, size, device, &format!("attached to `{owner_name}` as `{key}`{note}"));
        }
        self.collect();
        Ok(())
    }

    /// Removes the attachments under `key`; returns whether there were any.
    pub fn detach(&mut self, owner: ModelId, key: &str) -> bool {
        let removed = self.entry_mut(owner).ok().and_then(|e| e.attachments.remove(key)).is_some();
        if removed {
            self.collect();
        }
        removed
    }

    /// Every model attached under `owner`, transitively, each once, owner excluded.
    pub fn nested(&self, owner: ModelId) -> Vec<ModelId> {
        let mut all = self.reachable(&[owner]);
        all.retain(|&id| id != owner);
        all
    }

    /// Depth-first over attachments from `roots` (included), each model once:
    /// safe whatever the attachment graph looks like.
    fn reachable(&self, roots: &[ModelId]) -> Vec<ModelId> {
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        let mut stack: Vec<ModelId> = roots.iter().rev().copied().collect();
        while let Some(id) = stack.pop() {
            let Ok(entry) = self.entry(id) else { continue };
            if !seen.insert(id) {
                continue;
            }
            order.push(id);
            for children in entry.attachments.values().rev() {
                stack.extend(children.iter().rev().copied());
            }
        }
        order
    }

    /// Removes every model no handle holds and no held model has attached.
    /// Returns the ids removed.
    fn collect(&mut self) -> Vec<ModelId> {
        let roots: Vec<ModelId> =
            self.live_ids().filter(|&id| self.entry(id).is_ok_and(|e| !e.leases.is_empty())).collect();
        let keep: BTreeSet<ModelId> = self.reachable(&roots).into_iter().collect();
        let doomed: Vec<ModelId> = self.live_ids().filter(|id| !keep.contains(id)).collect();
        for &id in &doomed {
            self.remove_entry(id);
        }
        doomed
    }

    fn remove_entry(&mut self, id: ModelId) {
        let Some(slot) = self.slots.get_mut(id.slot as usize) else { return };
        let Some(entry) = slot.entry.take() else { return };
        slot.generation = slot.generation.wrapping_add(1);
        let on_load = entry.resident_bytes();
        let on_offload = entry.size() - on_load;
        for (device, bytes) in [(entry.load_device, on_load), (entry.offload_device, on_offload)] {
            if bytes > 0 {
                if let Ok(d) = self.device_mut(device) {
                    d.remove(bytes);
                }
            }
        }
        let reason = "last handle released and no owner holds it; its memory is free";
        let mostly_on = if on_load > on_offload { entry.load_device } else { entry.offload_device };
        self.emit(Op::Release, &entry.name, entry.size(), mostly_on, reason);
    }

    // ----- queries --------------------------------------------------------------------

    pub fn model(&self, id: ModelId) -> Option<ModelInfo> {
        let e = self.entry(id).ok()?;
        Some(ModelInfo {
            id,
            name: e.name.clone(),
            role: e.role,
            size_bytes: e.size(),
            loaded_bytes: if e.moves() { e.resident_bytes() } else { e.size() },
            resident_units: e.resident_units(),
            units: e.units.len(),
            load_device: e.load_device,
            offload_device: e.offload_device,
            outputs_cached: e.outputs_cached,
        })
    }

    /// All live models, in registration slot order.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.live_ids().filter_map(|id| self.model(id)).collect()
    }

    /// Looks a live model up by name (first match).
    pub fn find(&self, name: &str) -> Option<ModelId> {
        self.live_ids().find(|&id| self.entry(id).is_ok_and(|e| e.name == name))
    }

    /// Bytes the registry has placed on `device`.
    pub fn placed_bytes(&self, device: DeviceSpec) -> u64 {
        self.device(device).map_or(0, |d| d.placed_bytes())
    }

    /// Highest resident + working + stream-buffer bytes any job needed on `device`.
    pub fn peak_bytes(&self, device: DeviceSpec) -> u64 {
        self.peaks.get(&device).copied().unwrap_or(0)
    }

    /// What jobs may use on `device`: total minus reserve and safety margin
    /// (the host has neither), minus what other programs use where the platform tells.
    pub fn usable_bytes(&self, device: DeviceSpec) -> u64 {
        let Some(d) = self.device(device) else { return 0 };
        if device == DeviceSpec::Cpu {
            return d.total_bytes();
        }
        // Bytes the allocator caches for this process are free to its loads.
        let external = d.reported_free_bytes().map_or(0, |free| {
            d.total_bytes().saturating_sub(free.saturating_add(d.cached_bytes())).saturating_sub(d.placed_bytes())
        });
        d.total_bytes()
            .saturating_sub(external)
            .saturating_sub(self.config.reserve_bytes)
            .saturating_sub(self.config.safety_margin_bytes)
    }

    /// Hands memory the devices' allocators cache for reuse back to the
    /// platform (CUDA: the memory pool's idle bytes), for other programs and
    /// for allocations outside the pool. Callers do it once the tensors of a
    /// finished stage are dropped, not inside a sampler loop (its steps reuse
    /// that memory). Each device that gave bytes back is a `release_cache`
    /// event with `reason`. Returns the bytes given back in all.
    pub fn release_cached(&mut self, reason: &str) -> Result<u64> {
        // Every device is asked; what went back is recorded even when one fails.
        let results: Vec<(DeviceSpec, Result<u64>)> =
            self.devices.iter_mut().map(|d| (d.id(), d.release_cached())).collect();
        let mut total = 0;
        let mut first_error = None;
        for (device, result) in results {
            match result {
                Ok(0) => {}
                Ok(bytes) => {
                    total += bytes;
                    self.emit(Op::ReleaseCache, "allocator cache", bytes, device, reason);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(total), Err)
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Takes the timeline so far (long-running callers drain it; totals are kept in [`Registry::traffic`]).
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Checks the invariants: device counts equal the units placed there, no
    /// weights twice, resident bytes within capacity minus reserve, attachments
    /// only to live models. Returns every violation in one error.
    pub fn audit(&self) -> Result<()> {
        let mut problems = Vec::new();
        let mut expected: BTreeMap<DeviceSpec, u64> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for id in self.live_ids() {
            let Ok(e) = self.entry(id) else { continue };
            for u in &e.units {
                let at = if u.resident || !e.moves() { e.load_device } else { e.offload_device };
                *expected.entry(at).or_default() += u.bytes;
            }
            if let Some(k) = &e.weights_key {
                if !keys.insert(k.clone()) {
                    problems.push(format!("weights `{k}` registered twice"));
                }
            }
            for child in e.attachments.values().flatten() {
                if self.entry(*child).is_err() {
                    problems.push(format!("`{}` has a dangling attachment", e.name));
                }
            }
        }
        for d in &self.devices {
            let want = expected.get(&d.id()).copied().unwrap_or(0);
            if d.placed_bytes() != want {
                problems.push(format!("{} counts {} B but its units hold {want} B", d.id(), d.placed_bytes()));
            }
            let limit =
                d.total_bytes().saturating_sub(if d.id() == DeviceSpec::Cpu { 0 } else { self.config.reserve_bytes });
            if d.placed_bytes() > limit {
                problems.push(format!("{} holds {} B, over its limit {limit} B", d.id(), d.placed_bytes()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Registry(format!("audit failed: {}", problems.join("; "))))
        }
    }

    // ----- internals ------------------------------------------------------------------

    fn device(&self, id: DeviceSpec) -> Option<&dyn MemoryDevice> {
        self.devices.iter().find(|d| d.id() == id).map(|d| d.as_ref())
    }

    fn device_mut(&mut self, id: DeviceSpec) -> Result<&mut Box<dyn MemoryDevice>> {
        self.devices
            .iter_mut()
            .find(|d| d.id() == id)
            .ok_or_else(|| Error::Registry(format!("device {id} is not registered")))
    }

    fn live_ids(&self) -> impl Iterator<Item = ModelId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.entry.is_some())
            .map(|(i, s)| ModelId { slot: i as u32, generation: s.generation })
    }

    fn entry(&self, id: ModelId) -> Result<&Entry> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.entry.as_ref())
            .ok_or_else(|| Error::Registry("that model has been released".to_string()))
    }

    fn entry_mut(&mut self, id: ModelId) -> Result<&mut Entry> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.entry.as_mut())
            .ok_or_else(|| Error::Registry("that model has been released".to_string()))
    }

    fn name_of(&self, id: ModelId) -> String {
        self.entry(id).map(|e| e.name.clone()).unwrap_or_else(|_| "<released>".to_string())
    }

    fn find_weights(&self, key: &str) -> Option<ModelId> {
        self.live_ids().find(|&id| self.entry(id).is_ok_and(|e| e.weights_key.as_deref() == Some(key)))
    }

    fn insert(&mut self, entry: Entry) -> ModelId {
        if let Some(slot) = self.slots.iter().position(|s| s.entry.is_none()) {
            let s = &mut self.slots[slot];
            s.entry = Some(entry);
            return ModelId { slot: slot as u32, generation: s.generation };
        }
        self.slots.push(Slot { generation: 0, entry: Some(entry) });
        ModelId { slot: (self.slots.len() - 1) as u32, generation: 0 }
    }

    fn emit(&mut self, op: Op, model: &str, bytes: u64, device: DeviceSpec, reason: &str) {
        tracing::info!(
            target: "ipaflux::registry",
            stage = %self.stage, op = op.name(), model, bytes, device = %device, reason
        );
        self.events.push(Event {
            stage: self.stage.clone(),
            op,
            model: model.to_string(),
            bytes,
            device: device.to_string(),
            reason: reason.to_string(),
        });
    }
}

fn new_entry(spec: ModelSpec, lease: u64) -> Entry {
    let moves = spec.load_device != spec.offload_device;
    Entry {
        name: spec.name,
        role: spec.role,
        load_device: spec.load_device,
        offload_device: spec.offload_device,
        units: spec.units.into_iter().map(|u| Unit { name: u.name, bytes: u.bytes, resident: !moves }).collect(),
        weights_key: spec.weights_key,
        leases: BTreeSet::from([lease]),
        attachments: BTreeMap::new(),
        outputs_cached: false,
        last_used: 0,
        streamable: spec.streamable,
        resident_units: spec.resident_units,
    }
}

#[cfg(test)]
mod tests;
