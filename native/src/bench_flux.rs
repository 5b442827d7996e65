//! `ipaflux bench --flux`: one Flux transformer step at FLUX.1-dev shapes
//! (hidden 3072, 24 heads, 1024² → 4096 image tokens, 512 text tokens) with
//! random weights, without the IP-Adapter, with cached IP K/V, and with K/V
//! recomputed every step (what a replaced-forward implementation does).
//! On the CPU the depth is reduced (default 1 double + 1 single block; FLUX.1
//! has 19 + 38) and the table says so. Prints time and peak memory (the
//! process's resident memory, or a device probe's); asserts nothing. Runs on
//! any candle device (`ipaflux gpu-check` runs it on CUDA at full depth),
//! synchronising the device around each timed run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::hooks::{AttentionHook, HookPoint, Hooks, Site};
use ipaflux_core::flux::ip::{IpAdapterHook, IpHookConfig, IpImage};
use ipaflux_core::flux::model::canonical_tensors;
use ipaflux_core::flux::sampler::{img_ids, token_grid};
use ipaflux_core::flux::stream::{blocks_of_units, unit_specs, BlockId, BlockSource, HostBlocks};
use ipaflux_core::flux::{Conditioning, FluxConfig, FluxModel};
use ipaflux_core::ip_adapter::{IpAdapterDims, IpProcessor};
use ipaflux_core::nn::{Attention, ExtraAttention, FusedModulation};
use ipaflux_core::registry::{BudgetedDevice, HostMemory, JobRequest, ModelSpec, Registry, RegistryConfig, Role};
use ipaflux_core::DeviceSpec;
use ipaflux_core::{IpAttentionConfig, IpKv};

use crate::{Error, Result};

/// What to run.
#[derive(Debug, Clone)]
pub struct FluxBenchOptions {
    pub size: usize,
    /// FLUX.1's shapes but 2 heads wide (hidden 256): smoke runs only.
    pub narrow: bool,
    pub txt_tokens: usize,
    pub depth: usize,
    pub depth_single: usize,
    pub runs: usize,
    pub dtype: DType,
    pub device: Device,
    pub attention: Attention,
    /// Fused LayerNorm + modulation and gated residuals, if any.
    pub modulation: Option<Arc<dyn FusedModulation>>,
    /// How peak memory is read.
    pub peak: Arc<dyn PeakMemory>,
}

impl FluxBenchOptions {
    /// On the CPU, f32, reference attention, peak RSS.
    pub fn cpu(size: usize, depth: usize, depth_single: usize, runs: usize, dtype: DType) -> Self {
        Self {
            size,
            narrow: false,
            txt_tokens: 512,
            depth,
            depth_single,
            runs,
            dtype,
            device: Device::Cpu,
            attention: Attention::reference(),
            modulation: None,
            peak: Arc::new(Rss),
        }
    }
}

/// A memory reading: the process's RSS on the CPU, the driver's used
/// memory on a GPU (sampled while the work runs). Both readings count from
/// the same origin, so `peak − in_use` before a step is what the step added.
pub trait PeakMemory: std::fmt::Debug + Send + Sync {
    /// Starts a new measurement.
    fn reset(&self);
    /// Peak bytes since the last reset (or since the start).
    fn peak(&self) -> Option<u64>;
    /// Bytes in use now.
    fn in_use(&self) -> Option<u64>;
    /// Peak bytes the platform saw this process hold since the last reset,
    /// what an allocator keeps cached for reuse included (CUDA's memory
    /// pool: what a card of the budget's size must have); [`Self::peak`]
    /// where there is no such cache.
    fn peak_held(&self) -> Option<u64> {
        self.peak()
    }
    /// Hands what an allocator caches back to the platform (CUDA's memory
    /// pool), as a job's stage boundary does; nothing where there is none.
    fn release_cache(&self) {}
}

/// The process's resident set: peak [`peak_rss`], now [`rss`]. A reset
/// asks Linux to restart the peak (`5` into `/proc/self/clear_refs`); where
/// that is refused the peak stays the process's lifetime peak.
#[derive(Debug, Clone, Copy)]
pub struct Rss;

impl PeakMemory for Rss {
    fn reset(&self) {
        if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
            tracing::debug!(target: "ipaflux::bench", "peak RSS not reset (/proc/self/clear_refs: {e})");
        }
    }
    fn peak(&self) -> Option<u64> {
        peak_rss()
    }
    fn in_use(&self) -> Option<u64> {
        rss()
    }
}

/// One row: what ran, its median time, and for the plain and IP steps the
/// memory in use before the timed runs and the peak during them.
pub struct FluxRow {
    pub name: String,
    pub ms: f64,
    pub memory: Option<StepMemory>,
    /// What the row's result keeps resident, by the probe (the K/V cache's row).
    pub resident_added: Option<u64>,
}

/// Memory around a timed step (the probe's readings: [`PeakMemory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepMemory {
    /// In use before the step: weights, inputs and whatever else is resident.
    pub before: u64,
    /// Peak during the step.
    pub peak: u64,
}

impl StepMemory {
    /// What the step itself added at its peak (activations, workspaces, allocator slack).
    pub fn working(&self) -> u64 {
        self.peak.saturating_sub(self.before)
    }
}

impl FluxRow {
    fn timing(name: impl Into<String>, ms: f64) -> Self {
        Self { name: name.into(), ms, memory: None, resident_added: None }
    }
}

/// Times `step` like [`time_ms`] with the probe's readings around it (the
/// device synchronised first, so nothing earlier is still in flight).
fn time_with_memory(o: &FluxBenchOptions, mut step: impl FnMut() -> Result<()>) -> Result<(f64, Option<StepMemory>)> {
    o.device.synchronize()?;
    let before = o.peak.in_use();
    o.peak.reset();
    let ms = time_ms(&o.device, o.runs, &mut step)?;
    let memory = match (before, o.peak.peak()) {
        (Some(before), Some(peak)) => Some(StepMemory { before, peak: peak.max(before) }),
        _ => None,
    };
    Ok((ms, memory))
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    status_kb("VmHWM:")
}

/// Resident set of this process now (Linux `VmRSS`).
pub fn rss() -> Option<u64> {
    status_kb("VmRSS:")
}

/// IP-Adapter without a cache: K/V from the processors at every block call.
struct RecomputeIp {
    processors: Vec<IpProcessor>,
    embeds: Tensor,
    cfg: IpAttentionConfig,
    scale: f64,
    attention: Attention,
}

impl AttentionHook for RecomputeIp {
    fn name(&self) -> &str {
        "ip-adapter (recomputed K/V)"
    }

    fn attention(&self, at: &HookPoint, q: &Tensor, attn: &Tensor) -> ipaflux_core::Result<Option<Tensor>> {
        let p = &self.processors[at.site.global_index(at.depth)];
        let kv = p.kv(&self.embeds, &self.cfg)?;
        Ok(Some(kv.attend_add(q, self.scale, attn, &self.attention)?))
    }
}

fn random(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?)
}

/// Median of `runs` timed calls, the device synchronised after each.
fn time_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let s = Instant::now();
        f()?;
        device.synchronize()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// A model with random weights (σ 0.02, QK-norm scales 1) and random inputs.
struct Setup {
    cfg: FluxConfig,
    model: FluxModel,
    img: Tensor,
    ids: Vec<[f32; 3]>,
    cond: Conditioning,
    rows: usize,
    cols: usize,
}

/// The model these options build.
pub fn bench_config(o: &FluxBenchOptions) -> FluxConfig {
    let cfg = FluxConfig { depth: o.depth, depth_single: o.depth_single, ..FluxConfig::dev() };
    if o.narrow {
        FluxConfig { hidden_size: 256, mlp_hidden: 1024, num_heads: 2, context_in_dim: 256, ..cfg }
    } else {
        cfg
    }
}

impl Setup {
    /// One forward at σ 0.7 with `hooks`.
    fn step(&self, hooks: &[&dyn AttentionHook]) -> Result<()> {
        self.model.forward(&self.img, &self.ids, &self.cond, 0.7, 0, Hooks::new(hooks))?;
        Ok(())
    }
}

fn setup(o: &FluxBenchOptions) -> Result<Setup> {
    let cfg = bench_config(o);
    let dev = &o.device;
    let mut map = BTreeMap::new();
    for (name, shape) in canonical_tensors(&cfg) {
        let t = if name.ends_with(".scale") {
            Tensor::ones(shape.as_slice(), o.dtype, dev)?
        } else {
            random(&shape, o.dtype, dev)?
        };
        map.insert(name, t);
    }
    let mut model = FluxModel::from_canonical(cfg.clone(), map, o.dtype, dev)?;
    model.set_attention(o.attention.clone());
    model.set_fused_modulation(o.modulation.clone());
    let (rows, cols) = token_grid(o.size, o.size);
    let img = random(&[1, rows * cols, cfg.in_channels], o.dtype, dev)?;
    let ids = img_ids(rows, cols);
    let cond = Conditioning {
        txt: random(&[1, o.txt_tokens, cfg.context_in_dim], o.dtype, dev)?,
        y: random(&[1, cfg.vec_in_dim], o.dtype, dev)?,
        guidance: Some(3.5),
    };
    Ok(Setup { cfg, model, img, ids, cond, rows, cols })
}

/// Only the plain step (no IP): median ms.
pub fn run_plain(o: &FluxBenchOptions) -> Result<f64> {
    let s = setup(o)?;
    s.step(&[])?;
    time_ms(&o.device, o.runs, || s.step(&[]))
}

/// An InstantX-sized adapter for `cfg`'s blocks (random weights: 128 tokens
/// of 4096 → K/V as wide as Flux) and a random image embedding for it.
fn random_adapter(cfg: &FluxConfig, o: &FluxBenchOptions) -> Result<(Vec<IpProcessor>, Tensor)> {
    let dev = &o.device;
    let dims = IpAdapterDims {
        id_dim: 1152,
        proj_hidden: 2304,
        num_tokens: 128,
        cross_dim: 4096,
        num_processors: cfg.num_blocks(),
        hidden: cfg.hidden_size,
    };
    let mut pmap = std::collections::HashMap::new();
    for i in 0..dims.num_processors {
        for n in ["to_k_ip", "to_v_ip"] {
            pmap.insert(format!("{i}.{n}.weight"), random(&[dims.hidden, dims.cross_dim], o.dtype, dev)?);
        }
    }
    let vb = ipaflux_core::candle_nn::VarBuilder::from_tensors(pmap, o.dtype, dev);
    let processors = (0..dims.num_processors)
        .map(|i| Ok(IpProcessor::new(&dims, vb.pp(i.to_string()))?))
        .collect::<Result<Vec<_>>>()?;
    let embeds = random(&[1, dims.num_tokens, dims.cross_dim], o.dtype, dev)?;
    Ok((processors, embeds))
}

/// The IP-Adapter hook over one image's cached K/V, attending with `o.attention`.
fn cached_hook(cfg: &FluxConfig, kv: Vec<IpKv>, o: &FluxBenchOptions) -> Result<IpAdapterHook> {
    Ok(IpAdapterHook::new(vec![IpImage { kv, weight: 1.0 }], IpHookConfig::default(), cfg)?
        .with_attention(o.attention.clone()))
}

/// The step without and with the IP-Adapter (one image, K/V cached): median
/// ms of each, for comparing kernels on both.
pub fn run_plain_and_ip(o: &FluxBenchOptions) -> Result<(f64, f64)> {
    let s = setup(o)?;
    let (processors, embeds) = random_adapter(&s.cfg, o)?;
    let ip_cfg = IpAttentionConfig::default();
    let kv = processors.iter().map(|p| p.kv(&embeds, &ip_cfg)).collect::<ipaflux_core::Result<Vec<_>>>()?;
    let hook = cached_hook(&s.cfg, kv, o)?;
    s.step(&[])?;
    let plain = time_ms(&o.device, o.runs, || s.step(&[]))?;
    s.step(&[&hook])?;
    let ip = time_ms(&o.device, o.runs, || s.step(&[&hook]))?;
    Ok((plain, ip))
}

/// Runs the three variants.
pub fn run(o: &FluxBenchOptions) -> Result<Vec<FluxRow>> {
    let s = setup(o)?;
    let (cfg, rows, cols) = (&s.cfg, s.rows, s.cols);
    let dev = &o.device;
    let ip_cfg = IpAttentionConfig::default();
    let step = |hooks: &[&dyn AttentionHook]| s.step(hooks);
    let mut out = Vec::new();
    let label = format!(
        "{}² ({} img + {} txt tokens), {}+{} blocks, {:?}",
        o.size,
        rows * cols,
        o.txt_tokens,
        o.depth,
        o.depth_single,
        o.dtype
    );
    step(&[])?; // warm-up: first-touch allocations, caches, kernel loading
    let (ms, memory) = time_with_memory(o, || step(&[]))?;
    out.push(FluxRow { name: format!("step, no IP: {label}"), ms, memory, resident_added: None });

    // The adapter is made only now, so the plain step's memory is Flux's
    // alone, as PyTorch's figure is (its processors are 2.87 GB at bf16).
    let (processors, embeds) = random_adapter(cfg, o)?;
    let kv_once = || -> Result<Vec<IpKv>> {
        Ok(processors.iter().map(|p| p.kv(&embeds, &ip_cfg)).collect::<ipaflux_core::Result<_>>()?)
    };
    kv_once()?; // warm-up
    dev.synchronize()?;
    let kv_before = o.peak.in_use();
    let t = Instant::now();
    let kv = kv_once()?;
    dev.synchronize()?;
    let kv_ms = t.elapsed().as_secs_f64() * 1e3;
    let kv_added = kv_before.zip(o.peak.in_use()).map(|(b, a)| a.saturating_sub(b));
    let kv_bytes: usize = kv.iter().map(IpKv::nbytes).sum();
    let hook = cached_hook(cfg, kv, o)?;
    step(&[&hook])?;
    let (ms_cached, memory) = time_with_memory(o, || step(&[&hook]))?;
    out.push(FluxRow { name: "step, IP with cached K/V".into(), ms: ms_cached, memory, resident_added: None });
    out.push(FluxRow {
        name: format!(
            "  K/V computed once per image ({} for these blocks)",
            ipaflux_core::registry::Bytes(kv_bytes as u64)
        ),
        ms: kv_ms,
        memory: None,
        resident_added: kv_added,
    });
    let recompute = RecomputeIp { processors, embeds, cfg: ip_cfg, scale: 1.0, attention: o.attention.clone() };
    step(&[&recompute])?;
    let ms_re = time_ms(dev, o.runs, || step(&[&recompute]))?;
    out.push(FluxRow::timing("step, IP with K/V recomputed per step", ms_re));

    // The IP branch alone, on queries of each block's shape: whole-step differences are
    // within the machine's noise, this is not.
    let heads = cfg.num_heads;
    let q_double = random(&[1, heads, rows * cols, cfg.head_dim()], o.dtype, dev)?;
    let q_single = random(&[1, heads, rows * cols + o.txt_tokens, cfg.head_dim()], o.dtype, dev)?;
    let attn_of = |q: &Tensor| -> Result<Tensor> { random(&[1, q.dim(2)?, cfg.hidden_size], o.dtype, dev) };
    let (a_double, a_single) = (attn_of(&q_double)?, attn_of(&q_single)?);
    let branch = |hook: &dyn AttentionHook| -> Result<()> {
        for site in (0..cfg.depth)
            .map(|index| Site::Double { index })
            .chain((0..cfg.depth_single).map(|index| Site::Single { index }))
        {
            let at = HookPoint { site, depth: cfg.depth, sigma: 0.7, step: 0, txt_len: o.txt_tokens };
            let (q, a) =
                if matches!(site, Site::Double { .. }) { (&q_double, &a_double) } else { (&q_single, &a_single) };
            hook.attention(&at, q, a)?;
        }
        Ok(())
    };
    branch(&hook)?;
    let ms = time_ms(dev, o.runs.max(3), || branch(&hook))?;
    out.push(FluxRow::timing("IP branch alone, cached K/V (all blocks of the step)", ms));
    branch(&recompute)?;
    let ms = time_ms(dev, o.runs.max(3), || branch(&recompute))?;
    out.push(FluxRow::timing("IP branch alone, K/V recomputed", ms));
    if let Some(ms) = fused_ip_extra_ms(o, cfg, rows * cols)? {
        out.push(FluxRow::timing("IP branch fused in the attention launch, cached K/V (its extra time)", ms));
    }
    Ok(out)
}

/// Where `o.attention` computes the IP term inside the block's attention
/// launch (`sdpa_merged_extra`; the fast CUDA kernel set), what that adds
/// to the attention alone over all blocks of a step: each block shape's
/// attention timed with and without the term (double blocks: on the image
/// rows; single blocks: on all rows). `None` where the attention does not
/// take it (the step then runs the branch above).
fn fused_ip_extra_ms(o: &FluxBenchOptions, cfg: &FluxConfig, img_tokens: usize) -> Result<Option<f64>> {
    const IP_TOKENS: usize = 128;
    let (dev, h, d) = (&o.device, cfg.num_heads, cfg.head_dim());
    let l = img_tokens + o.txt_tokens;
    let (q, k, v, q_pre) = (
        random(&[1, h, l, d], o.dtype, dev)?,
        random(&[1, h, l, d], o.dtype, dev)?,
        random(&[1, h, l, d], o.dtype, dev)?,
        random(&[1, h, l, d], o.dtype, dev)?,
    );
    let (k_ip, v_ip) = (random(&[1, h, IP_TOKENS, d], o.dtype, dev)?, random(&[1, h, IP_TOKENS, d], o.dtype, dev)?);
    let extra = |row0: usize| ExtraAttention { q: &q_pre, k: &k_ip, v: &v_ip, row0, scale: 1.0 };
    let Some(first) = o.attention.sdpa_merged_extra(&q, &k, &v, &extra(o.txt_tokens)) else { return Ok(None) };
    drop(first?);
    let runs = o.runs.max(3);
    let with = |row0: usize| {
        time_ms(dev, runs, || {
            if let Some(out) = o.attention.sdpa_merged_extra(&q, &k, &v, &extra(row0)) {
                drop(out?);
            }
            Ok(())
        })
    };
    let alone = time_ms(dev, runs, || {
        drop(o.attention.sdpa_merged(&q, &k, &v)?);
        Ok(())
    })?;
    let (double, single) = (with(o.txt_tokens)? - alone, with(0)? - alone);
    Ok(Some(o.depth as f64 * double + o.depth_single as f64 * single))
}

/// The table, with the IP overhead relative to the plain step and the cache size at full depth.
pub fn table(rows: &[FluxRow], o: &FluxBenchOptions) -> String {
    use std::fmt::Write as _;
    let bytes = |b: Option<u64>| b.map_or("-".to_string(), |b| ipaflux_core::registry::Bytes(b).to_string());
    let mut s = String::new();
    let base = rows.first().map_or(1.0, |r| r.ms);
    let _ = writeln!(
        s,
        "{:<72} {:>11} {:>9} {:>12} {:>12}",
        "flux step (CPU, random weights)", "ms", "vs plain", "peak RSS", "added"
    );
    for r in rows {
        let rel = if r.name.starts_with("step") {
            format!("{:+.2}%", (r.ms / base - 1.0) * 100.0)
        } else if r.name.starts_with("IP branch") {
            format!("{:.2}%", r.ms / base * 100.0)
        } else {
            "-".into()
        };
        let peak = bytes(r.memory.map(|m| m.peak));
        let added = bytes(r.memory.map(|m| m.working()).or(r.resident_added));
        let _ = writeln!(s, "{:<72} {:>11.1} {:>9} {:>12} {:>12}", r.name, r.ms, rel, peak, added);
    }
    let full = FluxConfig::dev();
    let per_image = full.num_blocks() * 2 * 128 * full.hidden_size * o.dtype.size_in_bytes();
    let _ = writeln!(
        s,
        "reduced depth: {}+{} of FLUX.1's {}+{} blocks (the IP share is per block, so it carries over). \
         `vs plain`: whole steps as a change, IP branch as a share of the plain step. \
         `added`: a step's peak over what was resident before it; for the K/V row, what the cache keeps. \
         Cached K/V at full depth: {} per reference image at {:?}",
        o.depth,
        o.depth_single,
        full.depth,
        full.depth_single,
        ipaflux_core::registry::Bytes(per_image as u64),
        o.dtype
    );
    s
}

/// Makes the source of the streamed blocks from their tensors (taken out of
/// the model on its device): pinned memory and a copy stream on CUDA
/// (`cuda::stream::PinnedBlocks`), [`HostBlocks`] elsewhere.
pub type SourceMaker<'a> = &'a dyn Fn(&BTreeMap<String, Tensor>, &[BlockId]) -> Result<Arc<dyn BlockSource>>;

/// The streamed run's figures.
#[derive(Debug, Clone)]
pub struct StreamedRun {
    /// The same step with every block resident (median ms), timed first.
    pub resident_ms: f64,
    pub resident_memory: Option<StepMemory>,
    /// In use before this run made anything (what earlier work left on the
    /// device: not the job's; the budget check subtracts it).
    pub leftover: Option<u64>,
    /// Median ms with the registry's plan executed.
    pub streamed_ms: f64,
    pub streamed_peak: Option<u64>,
    /// [`PeakMemory::peak_held`] over the streamed steps.
    pub streamed_peak_held: Option<u64>,
    pub resident_blocks: usize,
    pub streamed_blocks: usize,
    /// Bytes copied in per step.
    pub streamed_bytes: u64,
    pub weight_bytes: u64,
    /// What the job asked the registry for beyond weights.
    pub working_bytes: u64,
    /// The registry's predicted peak for the job (resident + stream buffer + working).
    pub planned_peak: u64,
}

/// One step all-resident, then the registry plans the model into `budget`
/// bytes of the device (units = [`unit_specs`], `working` bytes of
/// activations, or with `None` what the all-resident step used beyond its
/// weights' bytes by the peak probe, counted from before the model was made
/// (at least 1 GiB); two-block stream buffer), the streamed blocks go to
/// `make_source`, and the step runs again streamed. On the CPU (smoke runs)
/// the plan is made for a budgeted `cuda:0` and executed with [`HostBlocks`].
pub fn run_streamed(
    o: &FluxBenchOptions,
    budget: u64,
    working: Option<u64>,
    make_source: SourceMaker,
) -> Result<StreamedRun> {
    let dev = &o.device;
    dev.synchronize()?;
    let leftover = o.peak.in_use();
    let Setup { cfg, mut model, img, ids, cond, .. } = setup(o)?;
    let step = |m: &FluxModel| -> Result<()> {
        m.forward(&img, &ids, &cond, 0.7, 0, Hooks::none())?;
        Ok(())
    };
    step(&model)?;
    let (resident_ms, resident_memory) = time_with_memory(o, || step(&model))?;

    let units = unit_specs(&cfg, o.dtype);
    let weight_bytes: u64 = units.iter().map(|u| u.bytes).sum();
    // Everything this run added beyond the weights' own bytes (their
    // allocation slack included) counts as working memory; what was there
    // before it is not the job's.
    let working = match (working, resident_memory) {
        (Some(w), _) => w,
        (None, Some(m)) => m.peak.saturating_sub(leftover.unwrap_or(0)).saturating_sub(weight_bytes).max(1 << 30),
        (None, None) => {
            return Err(Error::Core(ipaflux_core::Error::Unsupported(
                "no peak-memory probe on this device to measure the step's working memory".into(),
            )))
        }
    };
    let job_device = DeviceSpec::Cuda(0);
    let mut reg = Registry::new(
        RegistryConfig::default(),
        vec![Box::new(BudgetedDevice::new(job_device, budget)), Box::new(HostMemory::unbounded())],
    )?;
    let spec = ModelSpec {
        name: "flux".into(),
        role: Role::Diffusion,
        load_device: job_device,
        offload_device: DeviceSpec::Cpu,
        units,
        weights_key: None,
        streamable: true,
        // Its embedders, which every block needs, as generate registers it.
        resident_units: 1,
    };
    let handle = reg.register(spec)?;
    let plan = reg.load_for_job(&JobRequest::new(job_device, &[handle.model]).working(working))?;
    let placement = plan
        .placements
        .iter()
        .find(|p| p.model == handle.model)
        .ok_or_else(|| Error::Core(ipaflux_core::Error::Registry("the plan has no placement for flux".into())))?;
    let blocks = blocks_of_units(&cfg, &placement.streamed)?;
    tracing::info!(target: "ipaflux::bench", resident = placement.resident.len(), streamed = blocks.len(), "flux streaming plan");

    let tensors = model.stream_blocks(&blocks)?;
    let source = make_source(&tensors, &blocks)?;
    drop(tensors);
    model.set_block_source(source);
    // The streamed blocks' device copies are gone; what the allocator kept of
    // them goes back, as `generate` starts sampling without them.
    o.peak.release_cache();
    dev.synchronize()?;
    step(&model)?;
    dev.synchronize()?;
    o.peak.reset();
    let streamed_ms = time_ms(dev, o.runs, || step(&model))?;
    Ok(StreamedRun {
        resident_ms,
        resident_memory,
        leftover,
        streamed_ms,
        streamed_peak: o.peak.peak(),
        streamed_peak_held: o.peak.peak_held(),
        resident_blocks: cfg.num_blocks() - blocks.len(),
        streamed_blocks: blocks.len(),
        streamed_bytes: plan.stream_bytes_per_use,
        weight_bytes,
        working_bytes: working,
        planned_peak: plan.peak_bytes,
    })
}

/// The plain source: [`HostBlocks`] on the CPU, copied to `device` on use.
pub fn host_source(device: &Device) -> impl Fn(&BTreeMap<String, Tensor>, &[BlockId]) -> Result<Arc<dyn BlockSource>> {
    let device = device.clone();
    move |tensors, blocks| {
        let source = HostBlocks::new(tensors.clone(), blocks, &Device::Cpu, &device)?;
        Ok(Arc::new(source) as Arc<dyn BlockSource>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_ip_steps_run_on_a_narrow_model() {
        // What gpu-check times each attention variant with, at a smoke size:
        // the adapter's K/V must fit the model's heads for the hooked step to run.
        let o = FluxBenchOptions { narrow: true, txt_tokens: 8, ..FluxBenchOptions::cpu(64, 1, 1, 1, DType::F32) };
        let (plain, ip) = run_plain_and_ip(&o).unwrap();
        assert!(plain > 0.0 && ip > 0.0, "{plain} {ip}");
    }
}
