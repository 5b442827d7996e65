//! Loading for a job: which units go where, what is evicted, what is streamed.
//!
//! The decision for each device is computed first without changing anything
//! ([`Registry::plan_device`]) and applied only when every device's plan
//! succeeded, so a job that cannot run leaves the registry as it was.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::model::{Entry, Role};
use super::{Bytes, EvictionPolicy, ModelId, Op, Registry, VramState};
use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// What a step of work needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The device the work runs on; its working memory is counted there.
    pub device: DeviceSpec,
    /// Models the step runs. Their attachments come along, except attached
    /// preprocessing models whose outputs are cached.
    pub models: Vec<ModelId>,
    /// Activations and scratch the step needs besides weights.
    pub working_bytes: u64,
    /// The models of the stages after this one, in order: lets
    /// [`EvictionPolicy::FurthestNextUse`] keep what is needed soon.
    pub lookahead: Vec<Vec<ModelId>>,
}

impl JobRequest {
    pub fn new(device: DeviceSpec, models: &[ModelId]) -> Self {
        Self { device, models: models.to_vec(), working_bytes: 0, lookahead: Vec::new() }
    }
    pub fn working(mut self, bytes: u64) -> Self {
        self.working_bytes = bytes;
        self
    }
    pub fn lookahead(mut self, stages: Vec<Vec<ModelId>>) -> Self {
        self.lookahead = stages;
        self
    }
}

/// One unit moved between devices; the model's owner copies the real tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub model: ModelId,
    pub unit: usize,
    pub from: DeviceSpec,
    pub to: DeviceSpec,
    pub bytes: u64,
}

/// Where a job model's units are for this job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPlacement {
    pub model: ModelId,
    pub name: String,
    /// Units on the load device for the whole job.
    pub resident: Vec<usize>,
    /// Units copied in for each use and dropped after (block streaming).
    pub streamed: Vec<usize>,
}

/// The outcome of [`Registry::load_for_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPlan {
    pub stage: String,
    pub device: DeviceSpec,
    pub placements: Vec<ModelPlacement>,
    /// Evictions, offloads and loads made, in order.
    pub moves: Vec<Move>,
    /// Bytes streamed in for one use of the job's models.
    pub stream_bytes_per_use: u64,
    /// Device memory held for streamed units in flight (current + prefetched).
    pub stream_buffer_bytes: u64,
    pub working_bytes: u64,
    /// Resident + working + stream buffer on the job's device.
    pub peak_bytes: u64,
}

impl JobPlan {
    /// Whether any unit of the job is streamed rather than resident.
    pub fn streams(&self) -> bool {
        self.placements.iter().any(|p| !p.streamed.is_empty())
    }
}

/// The decision for one device, computed before anything changes.
#[derive(Debug)]
struct DevicePlan {
    device: DeviceSpec,
    /// (victim, units to evict, reason).
    evictions: Vec<(ModelId, Vec<usize>, String)>,
    /// Job units resident now but not in the target (shrinking in low/no-VRAM).
    shrink: Vec<(ModelId, Vec<usize>)>,
    /// Job units to load, per model.
    loads: Vec<(ModelId, Vec<usize>)>,
    placements: Vec<ModelPlacement>,
    stream_per_use: u64,
    buffer: u64,
    working: u64,
    peak: u64,
}

/// A job unit: model, index, bytes.
type UnitRef = (ModelId, usize, u64);

/// A chosen victim: model, units to evict, their bytes, the reason in words.
type Victim = (ModelId, Vec<usize>, u64, String);

impl Registry {
    /// Makes room for and loads a job's models on their load devices, by the
    /// configured [`VramState`] and [`EvictionPolicy`]: fully when it fits,
    /// otherwise as many units as fit with the rest streamed per use. A job
    /// that cannot run even streaming is an [`Error::OutOfMemory`] and changes nothing.
    pub fn load_for_job(&mut self, request: &JobRequest) -> Result<JobPlan> {
        if self.device(request.device).is_none() {
            return Err(Error::Registry(format!("job device {} is not registered", request.device)));
        }
        for &id in &request.models {
            self.entry(id)?;
        }
        let closure = self.job_closure(&request.models);
        let mut devices: BTreeSet<DeviceSpec> = BTreeSet::from([request.device]);
        for &id in &closure {
            devices.insert(self.entry(id)?.load_device);
        }
        let mut plans = Vec::new();
        for device in devices {
            let models: Vec<ModelId> =
                closure.iter().copied().filter(|&id| self.entry(id).is_ok_and(|e| e.load_device == device)).collect();
            let working = if device == request.device { request.working_bytes } else { 0 };
            plans.push(self.plan_device(device, &models, &closure, working, &request.lookahead)?);
        }
        self.clock += 1;
        for &id in &closure {
            let clock = self.clock;
            let entry = self.entry_mut(id)?;
            entry.last_used = clock;
            if request.models.contains(&id) {
                entry.outputs_cached = false;
            }
        }
        let mut moves = Vec::new();
        let mut job = JobPlan {
            stage: self.stage.clone(),
            device: request.device,
            placements: Vec::new(),
            moves: Vec::new(),
            stream_bytes_per_use: 0,
            stream_buffer_bytes: 0,
            working_bytes: request.working_bytes,
            peak_bytes: 0,
        };
        for plan in plans {
            moves.extend(self.apply(&plan)?);
            let peak = self.peaks.entry(plan.device).or_default();
            *peak = (*peak).max(plan.peak);
            if plan.device == request.device {
                job.peak_bytes = plan.peak;
            }
            job.stream_bytes_per_use += plan.stream_per_use;
            job.stream_buffer_bytes += plan.buffer;
            job.placements.extend(plan.placements);
        }
        job.moves = moves;
        Ok(job)
    }

    /// Accounts `uses` uses of a job's streamed units (one per sampler step).
    pub fn stream(&mut self, plan: &JobPlan, uses: u64) {
        for p in &plan.placements {
            let Ok(e) = self.entry(p.model) else { continue };
            let per_use: u64 = p.streamed.iter().filter_map(|&u| e.units.get(u)).map(|u| u.bytes).sum();
            if per_use == 0 || uses == 0 {
                continue;
            }
            let (name, device, n) = (e.name.clone(), e.load_device, p.streamed.len());
            let bytes = per_use.saturating_mul(uses);
            self.traffic.h2d_bytes = self.traffic.h2d_bytes.saturating_add(bytes);
            let reason = format!("{n} unit(s) not resident, {} copied in per use × {uses} use(s)", Bytes(per_use));
            self.emit(Op::Stream, &name, bytes, device, &reason);
        }
    }

    /// Marks the outputs of `models` as cached (image embeddings, per-block IP K/V
    /// exist). With `offload_preprocessing` on they go back to their offload device
    /// now; either way, jobs no longer pull them in through attachments.
    pub fn embeddings_ready(&mut self, models: &[ModelId]) -> Result<()> {
        for &id in models {
            self.entry_mut(id)?.outputs_cached = true;
        }
        let on = self.config.offload_preprocessing;
        for &id in models {
            if on {
                self.offload_all(id, Op::Offload, "outputs cached; offload_preprocessing is on")?;
            } else {
                let (name, bytes, device) =
                    self.entry(id).map(|e| (e.name.clone(), e.resident_bytes(), e.load_device))?;
                self.emit(
                    Op::Keep,
                    &name,
                    bytes,
                    device,
                    "outputs cached; offload_preprocessing is off: kept for reuse",
                );
            }
        }
        Ok(())
    }

    /// Switches `offload_preprocessing`. On: cached-output models leave the
    /// device now. Off: they move back to their load device as far as free
    /// memory allows (nothing is evicted for them).
    pub fn set_offload_preprocessing(&mut self, on: bool) -> Result<()> {
        self.config.offload_preprocessing = on;
        let cached: Vec<ModelId> =
            self.live_ids().filter(|&id| self.entry(id).is_ok_and(|e| e.outputs_cached && e.moves())).collect();
        for id in cached {
            if on {
                self.offload_all(id, Op::Offload, "offload_preprocessing switched on")?;
            } else {
                self.load_into_free(id, "offload_preprocessing switched off: moved back for reuse")?;
            }
        }
        Ok(())
    }

    /// Job models plus their attachments, minus attached models whose outputs are cached.
    fn job_closure(&self, models: &[ModelId]) -> Vec<ModelId> {
        self.reachable(models)
            .into_iter()
            .filter(|id| models.contains(id) || self.entry(*id).is_ok_and(|e| !e.outputs_cached))
            .collect()
    }

    fn plan_device(
        &self,
        device: DeviceSpec,
        models: &[ModelId],
        closure: &[ModelId],
        working: u64,
        lookahead: &[Vec<ModelId>],
    ) -> Result<DevicePlan> {
        let usable = self.usable_bytes(device);
        let units = self.movable_units(models)?;
        let (target, buffer) = self.choose_target(device, &units, working, usable)?;
        let target_bytes: u64 = units.iter().filter(|u| target.contains(&(u.0, u.1))).map(|u| u.2).sum();
        let job_resident = self.resident_of(models);
        let others = self.placed_bytes(device).saturating_sub(job_resident);
        let wanted = target_bytes + working + buffer;
        let free_for_job = usable.saturating_sub(others);
        let to_free = wanted.saturating_sub(free_for_job);
        let evictions = self.choose_victims(device, closure, to_free, lookahead)?;
        let evicted: u64 = evictions.iter().map(|(_, _, bytes, _)| bytes).sum();
        let mut plan = DevicePlan {
            device,
            evictions: evictions.into_iter().map(|(id, u, _, why)| (id, u, why)).collect(),
            shrink: Vec::new(),
            loads: Vec::new(),
            placements: Vec::new(),
            stream_per_use: 0,
            buffer,
            working,
            peak: others.saturating_sub(evicted) + wanted,
        };
        self.fill_placements(&mut plan, models, &target)?;
        Ok(plan)
    }

    /// Every unit of the models that actually moves (load ≠ offload device).
    fn movable_units(&self, models: &[ModelId]) -> Result<Vec<UnitRef>> {
        let mut units = Vec::new();
        for &id in models {
            let e = self.entry(id)?;
            if e.moves() {
                units.extend(e.units.iter().enumerate().map(|(i, u)| (id, i, u.bytes)));
            }
        }
        Ok(units)
    }

    /// Which units to keep resident for the job, and the stream buffer the rest need.
    fn choose_target(
        &self,
        device: DeviceSpec,
        units: &[UnitRef],
        working: u64,
        usable: u64,
    ) -> Result<(BTreeSet<(ModelId, usize)>, u64)> {
        let total: u64 = units.iter().map(|u| u.2).sum();
        let all: BTreeSet<(ModelId, usize)> = units.iter().map(|u| (u.0, u.1)).collect();
        let state = self.config.state;
        let fits = total.saturating_add(working) <= usable;
        match state {
            VramState::Normal | VramState::High if fits => return Ok((all, 0)),
            VramState::High => {
                return Err(self.oom(
                    device,
                    total + working,
                    usable,
                    "high VRAM state loads fully or not at all; use --vram-state normal to load partially and stream",
                ));
            }
            _ => {}
        }
        // Models their runners load whole stay resident whatever the state,
        // and so do streamable models' base units; only the other units
        // stream (and need a stream buffer).
        let streamable =
            |&&(id, i, _): &&UnitRef| self.entry(id).map(|e| e.streamable && i >= e.resident_units).unwrap_or(true);
        let (flexible, fixed): (Vec<UnitRef>, Vec<UnitRef>) = units.iter().partition(streamable);
        let buffer = stream_buffer(&flexible);
        let Some(weight_room) = usable.checked_sub(working + buffer) else {
            return Err(self.oom(
                device,
                working + buffer,
                usable,
                "lower the resolution or batch, or lower --reserve",
            ));
        };
        let fixed_bytes: u64 = fixed.iter().map(|u| u.2).sum();
        let Some(weight_room) = weight_room.checked_sub(fixed_bytes) else {
            return Err(self.oom(
                device,
                working + buffer + fixed_bytes,
                usable,
                "what cannot be streamed (models loaded whole, streamable models' base units) does not fit beside \
                 the job's working memory and stream buffer",
            ));
        };
        let cap = match state {
            VramState::NoVram => 0,
            VramState::Low => usable / 100 * u64::from(self.config.low_vram_weight_percent.min(100)),
            _ => u64::MAX,
        };
        let mut room = weight_room.min(cap);
        let mut target: BTreeSet<(ModelId, usize)> = fixed.iter().map(|u| (u.0, u.1)).collect();
        for &(id, i, bytes) in &self.fill_order(&flexible) {
            if bytes <= room {
                room -= bytes;
                target.insert((id, i));
            }
        }
        Ok((target, buffer))
    }

    /// Units in the order partial loading fills memory: whole small models first
    /// (each unit of a small model saves a copy per use just like a block of a
    /// big one, and small models finish sooner), then each model's units in
    /// execution order.
    fn fill_order(&self, units: &[UnitRef]) -> Vec<UnitRef> {
        let size_of = |id: ModelId| self.entry(id).map(|e| e.size()).unwrap_or(0);
        let mut ordered = units.to_vec();
        ordered.sort_by_cached_key(|&(id, i, _)| (size_of(id), id, i));
        ordered
    }

    fn resident_of(&self, models: &[ModelId]) -> u64 {
        models.iter().filter_map(|&id| self.entry(id).ok()).filter(|e| e.moves()).map(|e| e.resident_bytes()).sum()
    }

    fn oom(&self, device: DeviceSpec, needed: u64, usable: u64, hint: &str) -> Error {
        Error::OutOfMemory {
            stage: self.stage.clone(),
            device: device.to_string(),
            needed,
            usable,
            hint: hint.to_string(),
        }
    }

    /// Fills loads, shrinks and placements of `plan` for the job `models` given the target set.
    fn fill_placements(
        &self,
        plan: &mut DevicePlan,
        models: &[ModelId],
        target: &BTreeSet<(ModelId, usize)>,
    ) -> Result<()> {
        for &id in models {
            let e = self.entry(id)?;
            let mut placement =
                ModelPlacement { model: id, name: e.name.clone(), resident: Vec::new(), streamed: Vec::new() };
            let (mut load, mut shrink) = (Vec::new(), Vec::new());
            for (i, u) in e.units.iter().enumerate() {
                let keep = !e.moves() || target.contains(&(id, i));
                match (keep, u.resident) {
                    (true, false) => load.push(i),
                    (false, true) => shrink.push(i),
                    _ => {}
                }
                if keep {
                    placement.resident.push(i);
                } else {
                    placement.streamed.push(i);
                    plan.stream_per_use += u.bytes;
                }
            }
            if !load.is_empty() {
                plan.loads.push((id, load));
            }
            if !shrink.is_empty() {
                plan.shrink.push((id, shrink));
            }
            plan.placements.push(placement);
        }
        Ok(())
    }

    /// Picks what to evict from `device` to free `to_free` bytes: models outside
    /// the job, in policy order, each giving up units from its last backwards.
    /// Returns (victim, units, bytes, reason).
    fn choose_victims(
        &self,
        device: DeviceSpec,
        closure: &[ModelId],
        to_free: u64,
        lookahead: &[Vec<ModelId>],
    ) -> Result<Vec<Victim>> {
        let mut victims = Vec::new();
        if to_free == 0 {
            return Ok(victims);
        }
        let mut freed = 0;
        for id in self.eviction_order(device, closure, lookahead) {
            let e = self.entry(id)?;
            let mut units = Vec::new();
            let mut bytes = 0;
            for (i, u) in e.units.iter().enumerate().rev() {
                if freed + bytes >= to_free {
                    break;
                }
                if u.resident {
                    units.push(i);
                    bytes += u.bytes;
                }
            }
            freed += bytes;
            let why = self.eviction_reason(id, lookahead);
            let reason = format!(
                "{} needs {} more on {device}; policy {}: {why}",
                self.stage,
                Bytes(to_free),
                self.config.policy
            );
            victims.push((id, units, bytes, reason));
            if freed >= to_free {
                return Ok(victims);
            }
        }
        let pinned = "the rest is held by models that never leave this device (load device = offload device)";
        Err(self.oom(device, to_free, freed, pinned))
    }

    /// Resident models outside the job on `device`, in the order the policy
    /// evicts them.
    fn eviction_order(&self, device: DeviceSpec, closure: &[ModelId], lookahead: &[Vec<ModelId>]) -> Vec<ModelId> {
        let mut candidates: Vec<(ModelId, &Entry)> = self
            .live_ids()
            .filter(|id| !closure.contains(id))
            .filter_map(|id| self.entry(id).ok().map(|e| (id, e)))
            .filter(|(_, e)| e.moves() && e.load_device == device && e.resident_bytes() > 0)
            .collect();
        match self.config.policy {
            EvictionPolicy::FurthestNextUse => {
                let ahead: Vec<BTreeSet<ModelId>> =
                    lookahead.iter().map(|stage| self.job_closure(stage).into_iter().collect()).collect();
                let next = |id: &ModelId| ahead.iter().position(|s| s.contains(id)).unwrap_or(usize::MAX);
                candidates.sort_by_cached_key(|(id, e)| (Reverse(next(id)), !e.outputs_cached, e.last_used, *id));
            }
            EvictionPolicy::Lru => candidates.sort_by_key(|(id, e)| (e.last_used, *id)),
            EvictionPolicy::LargestFirst => candidates.sort_by_cached_key(|(id, e)| (Reverse(e.resident_bytes()), *id)),
            EvictionPolicy::ComfyUi => candidates.sort_by_cached_key(|(id, e)| {
                (Reverse(e.size() - e.resident_bytes()), self.holders(*id), e.size(), *id)
            }),
        }
        candidates.into_iter().map(|(id, _)| id).collect()
    }

    /// Handles plus owners that attach it: ComfyUI's refcount, as near as we have one.
    fn holders(&self, id: ModelId) -> usize {
        let owners = self
            .live_ids()
            .filter(|&o| self.entry(o).is_ok_and(|e| e.attachments.values().flatten().any(|c| *c == id)))
            .count();
        self.entry(id).map_or(0, |e| e.leases.len()) + owners
    }

    /// Why the policy picked `id`, in words, for the eviction event.
    fn eviction_reason(&self, id: ModelId, lookahead: &[Vec<ModelId>]) -> String {
        let Ok(e) = self.entry(id) else { return String::new() };
        match self.config.policy {
            EvictionPolicy::FurthestNextUse => {
                match lookahead.iter().position(|stage| self.job_closure(stage).contains(&id)) {
                    None if e.outputs_cached => "outputs cached and not needed by later stages".to_string(),
                    None => "not needed by later stages".to_string(),
                    Some(n) => format!("next needed {} stage(s) later, the furthest", n + 1),
                }
            }
            EvictionPolicy::Lru => format!("least recently used (job {})", e.last_used),
            EvictionPolicy::LargestFirst => format!("largest resident ({})", Bytes(e.resident_bytes())),
            EvictionPolicy::ComfyUi => format!(
                "comfyui key: offloaded {}, holders {}, size {}",
                Bytes(e.size() - e.resident_bytes()),
                self.holders(id),
                Bytes(e.size())
            ),
        }
    }

    /// Applies a device plan: evictions, shrinks, then loads. Returns the moves made.
    fn apply(&mut self, plan: &DevicePlan) -> Result<Vec<Move>> {
        let mut moves = Vec::new();
        for (id, units, reason) in &plan.evictions {
            moves.extend(self.offload_units(*id, units, Op::Evict, reason)?);
        }
        let state = self.config.state;
        for (id, units) in &plan.shrink {
            let reason =
                format!("{state} VRAM state keeps only part of it resident for this job; the rest is streamed");
            moves.extend(self.offload_units(*id, units, Op::Offload, &reason)?);
        }
        for (id, units) in &plan.loads {
            moves.extend(self.load_units(*id, units, plan)?);
        }
        Ok(moves)
    }

    fn load_units(&mut self, id: ModelId, units: &[usize], plan: &DevicePlan) -> Result<Vec<Move>> {
        let moves = self.move_units(id, units, true)?;
        let e = self.entry(id)?;
        let (name, device, role) = (e.name.clone(), e.load_device, e.role);
        let (resident, total) = (e.resident_units(), e.units.len());
        let first = e.units.iter().find(|u| !u.resident).map_or(String::new(), |u| u.name.clone());
        let bytes: u64 = moves.iter().map(|m| m.bytes).sum();
        if role != Role::Cache {
            self.traffic.h2d_bytes = self.traffic.h2d_bytes.saturating_add(bytes);
        }
        let (op, reason) = if resident == total {
            let how = if role == Role::Cache { "allocated on the device (outputs, not copied)" } else { "fits" };
            (
                Op::Load,
                format!(
                    "{how}: {} of working memory, {} usable",
                    Bytes(plan.working),
                    Bytes(self.usable_bytes(device))
                ),
            )
        } else {
            let why = format!(
                "{resident}/{total} units resident, the rest (first: {first}) streamed per use ({} stream buffer); {} VRAM state",
                Bytes(plan.buffer),
                self.config.state
            );
            (Op::PartialLoad, why)
        };
        self.emit(op, &name, bytes, device, &reason);
        Ok(moves)
    }

    fn offload_units(&mut self, id: ModelId, units: &[usize], op: Op, reason: &str) -> Result<Vec<Move>> {
        let moves = self.move_units(id, units, false)?;
        let bytes: u64 = moves.iter().map(|m| m.bytes).sum();
        if bytes > 0 {
            self.traffic.d2h_bytes = self.traffic.d2h_bytes.saturating_add(bytes);
            let (name, device) = self.entry(id).map(|e| (e.name.clone(), e.offload_device))?;
            self.emit(op, &name, bytes, device, reason);
        }
        Ok(moves)
    }

    fn offload_all(&mut self, id: ModelId, op: Op, reason: &str) -> Result<()> {
        let e = self.entry(id)?;
        if !e.moves() {
            return Ok(());
        }
        let units: Vec<usize> = e.units.iter().enumerate().filter(|(_, u)| u.resident).map(|(i, _)| i).collect();
        self.offload_units(id, &units, op, reason).map(|_| ())
    }

    /// Loads units of `id` into memory that is free now, evicting nothing.
    fn load_into_free(&mut self, id: ModelId, reason: &str) -> Result<()> {
        let e = self.entry(id)?;
        let device = e.load_device;
        let mut room = self.usable_bytes(device).saturating_sub(self.placed_bytes(device));
        let mut units = Vec::new();
        for (i, u) in e.units.iter().enumerate() {
            if !u.resident && u.bytes <= room {
                room -= u.bytes;
                units.push(i);
            }
        }
        let moves = self.move_units(id, &units, true)?;
        let bytes: u64 = moves.iter().map(|m| m.bytes).sum();
        self.traffic.h2d_bytes = self.traffic.h2d_bytes.saturating_add(bytes);
        let e = self.entry(id)?;
        let op = if e.resident_units() == e.units.len() { Op::Load } else { Op::PartialLoad };
        let name = e.name.clone();
        self.emit(op, &name, bytes, device, reason);
        Ok(())
    }

    /// Moves units between the load device (`to_load`) and the offload device,
    /// updating both devices' counts. Units already where they should be are skipped.
    fn move_units(&mut self, id: ModelId, units: &[usize], to_load: bool) -> Result<Vec<Move>> {
        let e = self.entry(id)?;
        let (from, to) = if to_load { (e.offload_device, e.load_device) } else { (e.load_device, e.offload_device) };
        let todo: Vec<(usize, u64)> = units
            .iter()
            .filter_map(|&i| e.units.get(i).filter(|u| u.resident != to_load).map(|u| (i, u.bytes)))
            .collect();
        let total: u64 = todo.iter().map(|(_, b)| b).sum();
        self.device_mut(to)?.place(total).map_err(|e| Error::Registry(format!("cannot move units: {e}")))?;
        self.device_mut(from)?.remove(total);
        let entry = self.entry_mut(id)?;
        let mut moves = Vec::with_capacity(todo.len());
        for (i, bytes) in todo {
            if let Some(u) = entry.units.get_mut(i) {
                u.resident = to_load;
            }
            moves.push(Move { model: id, unit: i, from, to, bytes });
        }
        Ok(moves)
    }
}

/// Device memory for streamed units in flight: the largest unit being used
/// plus the next one prefetched. Conservative: counts the two largest units
/// of the job whether or not they end up streamed.
fn stream_buffer(units: &[UnitRef]) -> u64 {
    let mut sizes: Vec<u64> = units.iter().map(|u| u.2).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.iter().take(2).sum()
}
