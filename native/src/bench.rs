//! `ipaflux bench`: the encoder at the real so400m shapes with random weights,
//! f32 on the CPU, against PyTorch on the same machine when it is importable.
//! A benchmark prints a table; it asserts nothing.

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::ip_adapter::{IpAdapterDims, MlpProjection};
use ipaflux_core::siglip::expected_tensors;
use ipaflux_core::{SiglipVisionConfig, SiglipVisionModel};

use crate::Result;

const TORCH_SCRIPT: &str = include_str!("../../tests/reference/bench_torch.py");

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runs: usize,
    pub projection: bool,
    pub python: String,
    pub compare_torch: bool,
}

/// One row of the table.
pub struct Row {
    pub name: String,
    pub ours_ms: f64,
    pub torch_ms: Option<f64>,
}

fn random_tensors(shapes: &[(String, Vec<usize>)]) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (name, shape) in shapes {
        map.insert(name.clone(), Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu)?);
    }
    Ok(map)
}

fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn torch_times(opts: &BenchOptions) -> Option<HashMap<String, f64>> {
    let ok = Command::new(&opts.python).args(["-c", "import torch, transformers"]).output().ok()?.status.success();
    if !ok {
        tracing::warn!(python = %opts.python, "PyTorch/transformers not importable: no comparison");
        return None;
    }
    tracing::info!("running the same shapes through PyTorch");
    let out = Command::new(&opts.python)
        .args(["-c", TORCH_SCRIPT, &opts.runs.to_string(), if opts.projection { "1" } else { "0" }])
        .output()
        .ok()?;
    if !out.status.success() {
        tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "PyTorch bench failed");
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last()?).ok()?;
    let mut m = HashMap::new();
    for key in ["siglip_ms", "projection_ms"] {
        if let Some(x) = v.get(key).and_then(|x| x.as_f64()) {
            m.insert(key.to_string(), x);
        }
    }
    Some(m)
}

/// A row with our median time for `f` (PyTorch's is filled in later).
fn timed_row<T>(name: &str, runs: usize, mut f: impl FnMut() -> ipaflux_core::Result<T>) -> Result<Row> {
    let ours_ms = median_ms(runs, || {
        f()?;
        Ok(())
    })?;
    Ok(Row { name: name.into(), ours_ms, torch_ms: None })
}

/// Runs the benchmark and returns its rows.
pub fn run(opts: &BenchOptions) -> Result<Vec<Row>> {
    let cfg = SiglipVisionConfig::so400m_patch14_384();
    tracing::info!("building SigLIP so400m with random weights (f32)");
    let vb = ipaflux_core::candle_nn::VarBuilder::from_tensors(
        random_tensors(&expected_tensors(&cfg))?,
        DType::F32,
        &Device::Cpu,
    );
    let siglip = SiglipVisionModel::new(&cfg, vb)?;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 384, 384), &Device::Cpu)?;
    tracing::info!(runs = opts.runs, "timing SigLIP");
    let mut rows = vec![timed_row("siglip so400m 384² b1", opts.runs, || siglip.forward(&pixels))?];
    drop(siglip);
    if opts.projection {
        let dims = IpAdapterDims {
            id_dim: 1152,
            proj_hidden: 2304,
            num_tokens: 128,
            cross_dim: 4096,
            num_processors: 0,
            hidden: 3072,
        };
        tracing::info!("building the projection with random weights (f32, 4.8 GB)");
        let shapes: Vec<_> = dims
            .expected_tensors()
            .into_iter()
            .filter_map(|(n, s)| n.strip_prefix("image_proj.").map(|n| (n.to_string(), s)))
            .collect();
        let vb = ipaflux_core::candle_nn::VarBuilder::from_tensors(random_tensors(&shapes)?, DType::F32, &Device::Cpu);
        let proj = MlpProjection::new(&dims, vb)?;
        let pooled = Tensor::randn(0f32, 1.0, (1, 1152), &Device::Cpu)?;
        rows.push(timed_row("projection 1152→128×4096", opts.runs, || proj.forward(&pooled))?);
    }
    if opts.compare_torch {
        if let Some(t) = torch_times(opts) {
            for row in &mut rows {
                let key = if row.name.starts_with("siglip") { "siglip_ms" } else { "projection_ms" };
                row.torch_ms = t.get(key).copied();
            }
        }
    }
    Ok(rows)
}

/// Decision overhead of the memory registry (no tensors move).
#[derive(Debug, Clone)]
pub struct RegistryBench {
    pub models: usize,
    pub units: usize,
    pub calls: usize,
    pub median_us: f64,
    pub p99_us: f64,
    /// Calls that evicted something or streamed (so the timing covers real decisions).
    pub calls_with_eviction: usize,
    /// Timeline events per call, on average (each is also a `tracing` event).
    pub events_per_call: f64,
}

/// Times `Registry::load_for_job` with 100 registered models of 10 units each
/// on a 24 GiB budgeted device: jobs of 3 models with a 3-stage lookahead,
/// cycling so that most calls must evict.
pub fn registry_overhead(calls: usize) -> Result<RegistryBench> {
    use ipaflux_core::registry::{
        BudgetedDevice, HostMemory, JobRequest, MemoryDevice, ModelSpec, Registry, RegistryConfig, Role,
    };
    use ipaflux_core::DeviceSpec;
    const MODELS: usize = 100;
    const UNITS: usize = 10;
    let gpu = DeviceSpec::Cuda(0);
    let devices: Vec<Box<dyn MemoryDevice>> =
        vec![Box::new(BudgetedDevice::new(gpu, 24 << 30)), Box::new(HostMemory::unbounded())];
    let mut registry = Registry::new(RegistryConfig::default(), devices)?;
    let mut ids = Vec::new();
    for i in 0..MODELS {
        let bytes = (200 + (i as u64 * 7919) % 1800) << 20;
        let spec = ModelSpec::uniform(&format!("model-{i}"), Role::Other, gpu, bytes, UNITS, "block");
        ids.push(registry.register(spec)?.model);
    }
    for i in (0..MODELS).step_by(10) {
        registry.attach(ids[i], "adapter", &[ids[(i + 1) % MODELS]])?;
    }
    // A fixed pseudo-random job sequence (LCG), same every run.
    let mut state = 12345u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize % MODELS
    };
    let stages: Vec<Vec<_>> = (0..calls + 3).map(|_| vec![ids[next()], ids[next()], ids[next()]]).collect();
    let mut times = Vec::with_capacity(calls);
    let mut evicting = 0;
    let mut events = 0;
    for i in 0..calls {
        let request = JobRequest::new(gpu, &stages[i]).working(1 << 30).lookahead(stages[i + 1..i + 4].to_vec());
        let before = registry.traffic().d2h_bytes;
        let t = Instant::now();
        let plan = registry.load_for_job(&request)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if registry.traffic().d2h_bytes > before || plan.streams() {
            evicting += 1;
        }
        events += registry.drain_events().len();
    }
    registry.audit()?;
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times.get(((times.len() - 1) as f64 * q) as usize).copied().unwrap_or(f64::NAN);
    Ok(RegistryBench {
        models: MODELS,
        units: MODELS * UNITS,
        calls,
        median_us: pick(0.5),
        p99_us: pick(0.99),
        calls_with_eviction: evicting,
        events_per_call: events as f64 / calls.max(1) as f64,
    })
}

/// The registry lines of the bench output: `quiet` timed with tracing events
/// discarded (the decision itself, timeline still recorded), `logged` with the
/// process's subscriber printing them (what a user at the default log level pays).
pub fn registry_table(quiet: &RegistryBench, logged: &RegistryBench) -> String {
    let mut s = format!("{:<40} {:>10} {:>10}\n", "registry load_for_job", "median µs", "p99 µs");
    for (name, r) in
        [("decision (events recorded, not printed)", quiet), ("decision + events printed to stderr", logged)]
    {
        s += &format!("{:<40} {:>10.1} {:>10.1}\n", name, r.median_us, r.p99_us);
    }
    s += &format!(
        "({} calls each; {} models, {} units; {} calls evicted or streamed; {:.1} timeline events per call; \
         target: median < 50 µs)\n",
        quiet.calls, quiet.models, quiet.units, quiet.calls_with_eviction, quiet.events_per_call
    );
    s
}

/// The table as text.
pub fn table(rows: &[Row], runs: usize) -> String {
    let mut s = format!(
        "ipaflux bench — CPU f32, batch 1, random weights, median of {runs} runs, {} threads\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    s += &format!("{:<28} {:>12} {:>12} {:>8}\n", "stage", "ipaflux ms", "pytorch ms", "ratio");
    for r in rows {
        let (t, ratio) = match r.torch_ms {
            Some(t) => (format!("{t:.1}"), format!("{:.2}×", r.ours_ms / t)),
            None => ("-".into(), "-".into()),
        };
        s += &format!("{:<28} {:>12.1} {:>12} {:>8}\n", r.name, r.ours_ms, t, ratio);
    }
    s
}
