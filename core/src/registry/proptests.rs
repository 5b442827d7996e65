//! Property tests: thousands of random sequences of register / attach / load
//! for a job / preprocessing done / release / drop / end job, checking the
//! registry's invariants after every step and that nothing is left at the end.

use proptest::prelude::*;

use super::*;

const GPU: DeviceSpec = DeviceSpec::Cuda(0);
const MB: u64 = 1 << 20;
const CAPACITY: u64 = 256 * MB;

#[derive(Debug, Clone)]
enum Action {
    Register { mb: u64, units: usize, key: Option<u8>, role: u8, in_job: bool },
    Attach { owner: usize, key: u8, children: Vec<usize> },
    Detach { owner: usize, key: u8 },
    Job { models: Vec<usize>, working_mb: u64, lookahead: Vec<usize> },
    EmbeddingsReady { models: Vec<usize> },
    SetOffload(bool),
    SetState(u8),
    SetPolicy(u8),
    Release(usize),
    ReleaseAgain(usize),
    Drop(usize),
    EndJob,
}

fn action() -> impl Strategy<Value = Action> {
    let idx = || 0usize..64;
    prop_oneof![
        4 => (1u64..=120, 1usize..=8, proptest::option::of(0u8..4), 0u8..8, any::<bool>())
            .prop_map(|(mb, units, key, role, in_job)| Action::Register { mb, units, key, role, in_job }),
        2 => (idx(), 0u8..3, proptest::collection::vec(idx(), 0..4))
            .prop_map(|(owner, key, children)| Action::Attach { owner, key, children }),
        1 => (idx(), 0u8..3).prop_map(|(owner, key)| Action::Detach { owner, key }),
        4 => (proptest::collection::vec(idx(), 1..4), 0u64..160, proptest::collection::vec(idx(), 0..3))
            .prop_map(|(models, working_mb, lookahead)| Action::Job { models, working_mb, lookahead }),
        1 => proptest::collection::vec(idx(), 1..3).prop_map(|models| Action::EmbeddingsReady { models }),
        1 => any::<bool>().prop_map(Action::SetOffload),
        1 => (0u8..4).prop_map(Action::SetState),
        1 => (0u8..4).prop_map(Action::SetPolicy),
        2 => idx().prop_map(Action::Release),
        1 => idx().prop_map(Action::ReleaseAgain),
        1 => idx().prop_map(Action::Drop),
        1 => Just(Action::EndJob),
    ]
}

const STATES: [VramState; 4] = [VramState::Normal, VramState::Low, VramState::NoVram, VramState::High];

struct World {
    r: Registry,
    /// Live handles and whether a job owns them.
    handles: Vec<(ModelHandle, bool)>,
    released: Vec<ModelHandle>,
    job: JobId,
    jobs: Vec<JobId>,
}

impl World {
    fn pick(&self, i: usize) -> Option<ModelHandle> {
        (!self.handles.is_empty()).then(|| self.handles[i % self.handles.len()].0)
    }
    fn ids(&self, idx: &[usize]) -> Vec<ModelId> {
        idx.iter().filter_map(|&i| self.pick(i)).map(|h| h.model).collect()
    }
    fn snapshot(&self) -> (u64, u64, usize) {
        (self.r.placed_bytes(GPU), self.r.placed_bytes(DeviceSpec::Cpu), self.r.models().len())
    }
}

fn step(w: &mut World, a: Action) -> Result<(), TestCaseError> {
    match a {
        Action::Register { mb, units, key, role, in_job } => {
            let mut spec = ModelSpec::uniform("m", Role::ALL[role as usize % 8], GPU, mb * MB, units, "u");
            if let Some(k) = key {
                // The same key always means the same size here, as for real files.
                spec = ModelSpec::uniform("m", spec.role, GPU, (u64::from(k) + 1) * 10 * MB, units, "u");
                spec = spec.with_weights_key(format!("weights-{k}"));
            }
            let shared = spec.weights_key.as_deref().is_some_and(|k| w.r.find_weights(k).is_some());
            let before = w.snapshot();
            let handle = if in_job { w.r.register_in(w.job, spec) } else { w.r.register(spec) };
            if let Ok(h) = handle {
                w.handles.push((h, in_job));
                if shared {
                    let after = w.snapshot();
                    prop_assert_eq!((after.0, after.1), (before.0, before.1), "same weights counted twice");
                }
            }
        }
        Action::Attach { owner, key, children } => {
            if let Some(o) = w.pick(owner) {
                let kids = w.ids(&children);
                let _ = w.r.attach(o.model, &format!("k{key}"), &kids);
            }
        }
        Action::Detach { owner, key } => {
            if let Some(o) = w.pick(owner) {
                w.r.detach(o.model, &format!("k{key}"));
            }
        }
        Action::Job { models, working_mb, lookahead } => {
            let request = JobRequest::new(GPU, &w.ids(&models))
                .working(working_mb * MB)
                .lookahead(lookahead.iter().map(|&i| w.ids(&[i])).collect());
            let before = w.snapshot();
            match w.r.load_for_job(&request) {
                Ok(plan) => {
                    let usable = w.r.usable_bytes(GPU);
                    prop_assert!(plan.peak_bytes <= usable, "peak {} > usable {}", plan.peak_bytes, usable);
                    prop_assert!(w.r.placed_bytes(GPU) + plan.working_bytes + plan.stream_buffer_bytes <= usable);
                    w.r.stream(&plan, 3);
                }
                Err(_) => prop_assert_eq!(w.snapshot(), before, "a failed job changed residency"),
            }
        }
        Action::EmbeddingsReady { models } => {
            let ids = w.ids(&models);
            let _ = w.r.embeddings_ready(&ids);
        }
        Action::SetOffload(on) => {
            let _ = w.r.set_offload_preprocessing(on);
        }
        Action::SetState(s) => w.r.set_state(STATES[s as usize % 4]),
        Action::SetPolicy(p) => w.r.set_policy(EvictionPolicy::ALL[p as usize % 4]),
        Action::Release(i) => {
            if let Some(h) = w.pick(i) {
                w.handles.retain(|x| x.0 != h);
                w.r.release(h);
                w.released.push(h);
            }
        }
        Action::ReleaseAgain(i) => {
            if !w.released.is_empty() {
                let h = w.released[i % w.released.len()];
                let before = w.snapshot();
                prop_assert_eq!(w.r.release(h), Released::AlreadyReleased);
                prop_assert_eq!(w.snapshot(), before);
            }
        }
        Action::Drop(i) => {
            // Forgetting a handle a job owns: ending the job releases it. (A handle
            // registered outside any job is the caller's to release; no finalizer.)
            if let Some(h) = w.pick(i) {
                w.handles.retain(|x| !(x.0 == h && x.1));
            }
        }
        Action::EndJob => {
            w.r.end_job(w.job);
            w.handles.retain(|h| !h.1);
            w.job = w.r.begin_job("job");
            w.jobs.push(w.job);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn registry_invariants_hold_over_random_sequences(
        reserve_mb in 0u64..64,
        margin_mb in 0u64..32,
        actions in proptest::collection::vec(action(), 1..40),
    ) {
        let config = RegistryConfig {
            reserve_bytes: reserve_mb * MB,
            safety_margin_bytes: margin_mb * MB,
            ..RegistryConfig::default()
        };
        let devices: Vec<Box<dyn MemoryDevice>> =
            vec![Box::new(BudgetedDevice::new(GPU, CAPACITY)), Box::new(HostMemory::unbounded())];
        let mut r = match Registry::new(config, devices) {
            Ok(r) => r,
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let job = r.begin_job("job");
        let mut w = World { r, handles: Vec::new(), released: Vec::new(), job, jobs: vec![job] };
        for a in actions {
            step(&mut w, a)?;
            if let Err(e) = w.r.audit() {
                return Err(TestCaseError::fail(e.to_string()));
            }
            prop_assert!(w.r.placed_bytes(GPU) <= CAPACITY - reserve_mb * MB);
        }
        // Cleanup: release what is held, end every job; nothing may remain.
        for (h, _) in std::mem::take(&mut w.handles) {
            w.r.release(h);
        }
        for j in w.jobs.clone() {
            w.r.end_job(j);
            prop_assert_eq!(w.r.end_job(j), 0);
        }
        prop_assert!(w.r.models().is_empty(), "leaked: {:?}", w.r.models());
        prop_assert_eq!(w.snapshot(), (0, 0, 0));
    }
}
