//! `ipaflux gpu-check`: what we claim on a GPU, checked and measured in one
//! run, one table (`scripts/gpu-check.sh` runs it on the lent GPU machine).
//!
//! - **Parity** on the committed fixtures: the device against the CPU and
//!   against the PyTorch goldens (SigLIP, one Flux forward with the
//!   IP-Adapter): f32 ≤ 1e-4, bf16 ≤ 2e-2 (relative max error); the fused
//!   attention against the reference path at real shapes; on CUDA, SigLIP
//!   replayed from a CUDA graph bit-identical to its eager calls.
//! - **Registry vs driver** (CUDA): SigLIP so400m's weights loaded, offloaded
//!   to pinned memory and reloaded through the registry over several jobs; the
//!   registry's resident bytes against the driver's used bytes (less the
//!   memory pool's cache: `cuda::pool`) within 5 %, and nothing left after
//!   each job's end releases that cache; each reload's values equal the
//!   originals.
//! - **Benchmarks** (random weights at the real shapes, bf16, medians of
//!   `runs`, device synchronised): SigLIP so400m (eager; on CUDA also with
//!   the memory pool releasing at each sync, and replayed from a CUDA graph),
//!   the projection, one
//!   FLUX.1-dev step at 1024² and 512² with and without the IP-Adapter, host ↔
//!   device copies. With `--torch FILE` (written by scripts/gpu_bench_torch.py
//!   on the same card) each figure gets PyTorch's beside it and the ratio.
//!
//! Checks fail the command (exit ≠ 0); benchmarks only report. `--quick`
//! shrinks the models so the same code runs anywhere in seconds (the CLI
//! tests run it on the CPU so it cannot rot).
//! - **Streaming**: FLUX.1-dev planned by the registry into a 12 GiB budget
//!   and run with the streamed blocks copied in from pinned memory on a
//!   second stream, against the same step all-resident; the peak (driver
//!   and memory pool: `cuda::check::DriverPeak`) within the budget and every
//!   block prefetched are checks.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::candle_nn::VarBuilder;
use ipaflux_core::flux::hooks::{AttentionHook, Hooks};
use ipaflux_core::flux::ip::{IpAdapterHook, IpHookConfig, IpImage, IpWeight};
use ipaflux_core::flux::sampler::img_ids;
use ipaflux_core::flux::stream::unit_specs;
use ipaflux_core::flux::{Conditioning, FluxLoad, FluxModel, GgufWeights};
use ipaflux_core::ip_adapter::{IpAdapterDims, MlpProjection};
use ipaflux_core::nn::{sdpa, Attention, ExtraAttention, FusedLinear, FusedModulation};
use ipaflux_core::registry::DEFAULT_SAFETY_MARGIN;
use ipaflux_core::siglip::expected_tensors;
use ipaflux_core::{IpAdapter, IpAttentionConfig, IpKv, SiglipVisionConfig, SiglipVisionModel, VNorm};

use crate::bench_flux::{self, FluxBenchOptions, PeakMemory};
use crate::load::{load_flux, load_ip_adapter, load_siglip_dir};
use crate::{Error, Result};

/// Tolerances of the parity checks (relative max error against the f32 reference).
pub const F32_TOL: f32 = 1e-4;
pub const HALF_TOL: f32 = 2e-2;

/// What to run.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The device under test.
    pub device: Device,
    /// `tests/fixtures` of this repository.
    pub fixtures: PathBuf,
    /// Median of this many timed runs (after one warm-up).
    pub runs: usize,
    /// Small models instead of the real shapes (for CPU smoke runs).
    pub quick: bool,
    /// Run only these sections; all when empty.
    pub sections: Vec<Section>,
    /// The default kernel set, checked and used in the benchmarks and the
    /// streamed step, if this build has one.
    pub default_set: Option<KernelSetUnderTest>,
    /// Other fused kernels to check and time beside it (other versions, `[B, H, L, D]` output).
    pub alternatives: Vec<Attention>,
    /// Other attention kernels the default set could take instead (merged-heads
    /// output): their epilogues are checked and the default step is timed with each.
    pub attention_variants: Vec<Attention>,
    /// Other fused Flux kernels (LayerNorm + modulation, …) the default set
    /// could take instead: each is checked through the Flux fixture and the
    /// default step is timed with it.
    pub modulation_variants: Vec<Arc<dyn FusedModulation>>,
    /// Linear layers with their epilogues SigLIP could take (cuBLASLt's on
    /// CUDA): checked through the SigLIP fixture and timed.
    pub linear_variant: Option<Arc<dyn FusedLinear>>,
    /// The baseline kernel set, checked and timed beside the default.
    pub baseline: Option<KernelSetUnderTest>,
    /// PyTorch's figures from the same card (`scripts/gpu_bench_torch.py --json`).
    pub torch: Option<HashMap<String, f64>>,
    /// How the Flux benchmark reads peak memory.
    pub peak: Arc<dyn PeakMemory>,
}

/// A kernel set ([`crate::KernelSet`]): its attention and its fused Flux
/// kernels (LayerNorm + modulation, gated residuals, …).
#[derive(Debug, Clone)]
pub struct KernelSetUnderTest {
    pub attention: Attention,
    pub modulation: Arc<dyn FusedModulation>,
}

impl CheckOptions {
    /// The default set's attention, if this build has one.
    fn default_attention(&self) -> Option<&Attention> {
        self.default_set.as_ref().map(|s| &s.attention)
    }

    /// The default set's fused Flux kernels, if this build has them.
    fn default_modulation(&self) -> Option<Arc<dyn FusedModulation>> {
        self.default_set.as_ref().map(|s| s.modulation.clone())
    }
}

/// Reads the JSON object of numbers `scripts/gpu_bench_torch.py` writes (other values are skipped).
pub fn read_torch_figures(path: &Path) -> Result<HashMap<String, f64>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    let obj =
        value.as_object().ok_or_else(|| Error::Io { path: path.to_path_buf(), reason: "not a JSON object".into() })?;
    Ok(obj.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect())
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: Section,
    pub what: String,
    pub ours: String,
    /// The limit for a check, PyTorch's figure for a benchmark.
    pub reference: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Fail,
    /// A benchmark: ratio or remark.
    Info(String),
}

/// The whole report. With `progress`, each row is also written to stderr
/// as it is made (`gpu-check: row: | … |`), so a run stopped part-way (the
/// GPU machine's time limit) still leaves its finished rows in the log.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub progress: bool,
}

impl Row {
    /// The row as a line of [`Report::table`].
    fn markdown(&self) -> String {
        let v = match &self.verdict {
            Verdict::Pass => "PASS".to_string(),
            Verdict::Fail => "**FAIL**".to_string(),
            Verdict::Info(n) => n.clone(),
        };
        format!("| {} | {} | {} | {} | {} |", self.section, self.what, self.ours, self.reference, v)
    }
}

impl Report {
    fn push(&mut self, row: Row) {
        if self.progress {
            eprintln!("gpu-check: row: {}", row.markdown());
        }
        self.rows.push(row);
    }

    pub fn check(&mut self, section: Section, what: impl Into<String>, err: f32, tol: f32) {
        let pass = err.is_finite() && err <= tol;
        self.push(Row {
            section,
            what: what.into(),
            ours: format!("{err:.2e}"),
            reference: format!("≤ {tol:.0e}"),
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
        });
    }

    pub fn bool_check(&mut self, section: Section, what: impl Into<String>, ours: String, limit: String, ok: bool) {
        let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
        self.push(Row { section, what: what.into(), ours, reference: limit, verdict });
    }

    pub fn info(&mut self, section: Section, what: impl Into<String>, ours: String, reference: String, note: String) {
        self.push(Row { section, what: what.into(), ours, reference, verdict: Verdict::Info(note) });
    }

    fn failed(&mut self, section: Section, what: &str, e: &dyn std::fmt::Display) {
        eprintln!("gpu-check: {section}: {what}: {e}");
        self.push(Row {
            section,
            what: what.to_string(),
            ours: "error".into(),
            reference: String::new(),
            verdict: Verdict::Fail,
        });
    }

    /// Number of failed checks.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.verdict == Verdict::Fail).count()
    }

    /// The table (Markdown).
    pub fn table(&self) -> String {
        let mut s =
            String::from("| section | what | ours | limit / PyTorch | result |\n| --- | --- | --- | --- | --- |\n");
        for r in &self.rows {
            let _ = writeln!(s, "{}", r.markdown());
        }
        let _ = writeln!(
            s,
            "\n{} checks, {} failed",
            self.rows.iter().filter(|r| r.verdict == Verdict::Pass).count() + self.failures(),
            self.failures()
        );
        s
    }
}

/// `max |a − b| / max |b|` in f32.
pub fn rel_max_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    if ours.dims() != reference.dims() {
        return Err(Error::Core(ipaflux_core::Error::Shape(format!(
            "comparing {:?} with {:?}",
            ours.dims(),
            reference.dims()
        ))));
    }
    let a = ours.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = reference.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let diff =
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    Ok(diff / scale)
}

/// Bytes in GiB (2³⁰), for the table.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes in MiB (2²⁰), for the table.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Median wall time of `runs` calls in ms, the device synchronised after each (one warm-up first).
pub fn time_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
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

fn dev_name(d: &Device) -> &'static str {
    if d.is_cuda() {
        "cuda"
    } else if d.is_cpu() {
        "cpu"
    } else {
        "device"
    }
}

/// Which of attention version 8's checks run (`--wgmma`). Version 8 has not
/// run on a GPU yet: `gpu-check.sh` runs it alone first (`only`), and leaves
/// it out of the main run (`exclude`) if that failed, so a fault in it (one
/// that spoils the CUDA context) cannot cost the other rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Wgmma {
    /// With every other kernel.
    #[default]
    Include,
    /// Not at all.
    Exclude,
    /// Only version 8 among the alternatives and the default set's variants.
    Only,
}

/// A part of the check that runs alone with `--section` (each has its own rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The fixtures on the device against the CPU and the PyTorch goldens.
    Parity,
    /// Fused attention kernels at the real shapes against f32.
    Attention,
    /// Registry accounting against the driver (CUDA).
    Registry,
    /// Benchmarks beside PyTorch's figures.
    Bench,
    /// Flux streamed in a budget.
    Stream,
}

/// The name in the table's first column: the one clap derives for the command line.
impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// Runs everything (or `o.sections`); never stops at a failure (each section
/// reports its own). Without the fixtures nothing can be checked, so nothing runs.
pub fn run(o: &CheckOptions) -> Report {
    let mut r = Report { progress: true, ..Report::default() };
    if !o.fixtures.join("flux").is_dir() {
        let e = format!("{}: not this repository's tests/fixtures (give --fixtures)", o.fixtures.display());
        r.failed(Section::Parity, "fixtures", &e);
        return r;
    }
    type Step = fn(&CheckOptions, &mut Report) -> Result<()>;
    let mut steps: Vec<(Section, Step)> = vec![
        (Section::Parity, parity_siglip),
        (Section::Parity, parity_flux),
        (Section::Parity, parity_flux_gguf),
        (Section::Parity, crate::pipeline_check::parity_pipelines),
        (Section::Attention, attention_real_shapes),
    ];
    #[cfg(feature = "cuda")]
    steps.extend([
        (Section::Registry, crate::cuda::check::registry_vs_driver as Step),
        (Section::Bench, crate::cuda::check::transfers),
    ]);
    steps.extend([
        (Section::Bench, bench_encoder as Step),
        (Section::Bench, bench_flux_steps),
        (Section::Stream, bench_flux_streamed),
    ]);
    for (section, f) in steps {
        if !o.sections.is_empty() && !o.sections.contains(&section) {
            continue;
        }
        if let Err(e) = f(o, &mut r) {
            r.failed(section, "section stopped", &e);
        }
        // What a section freed stays in the CUDA memory pool for reuse; the
        // next section starts without it, as a new job would.
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &o.device {
            if let Err(e) = crate::cuda::pool::release_freed_memory(d.cuda_stream().context()) {
                r.failed(section, "releasing the memory pool's cache", &e);
            }
        }
    }
    r
}

/// All tensors of a safetensors file; errors name the file.
fn load_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    ipaflux_core::candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Io { path: path.to_path_buf(), reason: e.to_string() })
}

fn siglip_pixels(fixtures: &Path) -> Result<Tensor> {
    let path = fixtures.join("pixels_u8.safetensors");
    let all = load_file(&path)?;
    let u8s = all.get("photo_jpg").ok_or_else(|| Error::Io { path, reason: "no `photo_jpg` tensor".into() })?;
    Ok(((u8s.to_dtype(DType::F32)? / 127.5)? - 1.0)?)
}

/// Which kernels a SigLIP fixture run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SiglipKernels {
    Reference,
    /// The default set's fused attention.
    FusedAttention,
    /// That and `linear_variant`'s linear layers.
    FusedLinear,
}

fn siglip_fixture(
    o: &CheckOptions,
    dtype: DType,
    device: &Device,
    kernels: SiglipKernels,
) -> Result<SiglipVisionModel> {
    let files = load_siglip_dir(&o.fixtures.join("siglip-vision"))?;
    let mut m = SiglipVisionModel::from_store(&files.config, files.weights, dtype, device)?;
    if let (true, Some(a)) = (kernels != SiglipKernels::Reference, o.default_attention()) {
        m.set_attention(a.clone());
    }
    if kernels == SiglipKernels::FusedLinear {
        m.set_fused_linear(o.linear_variant.clone());
    }
    Ok(m)
}

/// SigLIP tiny fixture: the device against the CPU, f32 and bf16 (reference
/// and fused attention, and the linear layers' epilogues where this build has them).
fn parity_siglip(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let dev = &o.device;
    let pixels = siglip_pixels(&o.fixtures)?;
    let want = siglip_fixture(o, DType::F32, &Device::Cpu, SiglipKernels::Reference)?.forward(&pixels)?;
    let mut cases =
        vec![(DType::F32, SiglipKernels::Reference, F32_TOL), (DType::BF16, SiglipKernels::Reference, HALF_TOL)];
    if o.default_attention().is_some() {
        cases.push((DType::BF16, SiglipKernels::FusedAttention, HALF_TOL));
    }
    if let Some(linear) = &o.linear_variant {
        cases.push((DType::BF16, SiglipKernels::FusedLinear, HALF_TOL));
        r.info(
            Section::Parity,
            "SigLIP's linear layers in the last case",
            linear.name().into(),
            String::new(),
            String::new(),
        );
    }
    for (dtype, kernels, tol) in cases {
        let m = siglip_fixture(o, dtype, dev, kernels)?;
        let got = m.forward(&pixels.to_device(dev)?)?;
        let label = match kernels {
            SiglipKernels::Reference => "reference attention",
            SiglipKernels::FusedAttention => "fused attention",
            SiglipKernels::FusedLinear => "fused attention, linear layers with their epilogues",
        };
        r.check(
            Section::Parity,
            format!("SigLIP tiny pooled, {} {dtype:?} ({label}) vs CPU f32", dev_name(dev)),
            rel_max_err(&got, &want)?,
            tol,
        );
    }
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let kernels =
            if o.default_attention().is_some() { SiglipKernels::FusedAttention } else { SiglipKernels::Reference };
        let model = siglip_fixture(o, DType::BF16, dev, kernels)?;
        let second = (pixels.flip(&[3])? * 0.5)?;
        graph_identity(r, model, &[pixels.to_device(dev)?, second.to_device(dev)?], "SigLIP tiny, bf16")?;
    }
    Ok(())
}

/// The largest |a − b| over two tensors of one shape, in f32.
#[cfg(feature = "cuda")]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A CUDA graph of `model`'s forward replayed on each of `inputs`, then on
/// the first again, against eager calls: bit-identical, or a failed row
/// (a capture that fails is a failed row too, with its reason). Gives the
/// model back.
#[cfg(feature = "cuda")]
fn graph_identity(
    r: &mut Report,
    model: SiglipVisionModel,
    inputs: &[Tensor],
    label: &str,
) -> Result<SiglipVisionModel> {
    use crate::cuda::graph::GraphedEncoder;
    let eager = inputs.iter().map(|p| model.forward(p)).collect::<Result<Vec<_>, _>>()?;
    let what = format!("{label}: CUDA graph replays vs eager calls ({} inputs, then the first again)", inputs.len());
    let graph = match GraphedEncoder::capture(model, inputs.first().map_or(1, |p| p.dims()[0])) {
        Ok(g) => g,
        Err(failed) => {
            r.bool_check(
                Section::Parity,
                what,
                format!("capture failed: {}", failed.error),
                "bit-identical".into(),
                false,
            );
            return Ok(failed.model);
        }
    };
    let mut worst = 0f32;
    for i in (0..inputs.len()).chain([0]) {
        worst = worst.max(max_abs_diff(&graph.forward(&inputs[i])?, &eager[i])?);
    }
    r.bool_check(Section::Parity, what, format!("max |diff| {worst:.2e}"), "bit-identical (0)".into(), worst == 0.0);
    Ok(graph.into_model())
}

/// Flux tiny fixture with the IP-Adapter (InstantX variant, weight 0.7): the
/// device against diffusers' golden output and against the CPU.
fn parity_flux(o: &CheckOptions, r: &mut Report) -> Result<()> {
    const ROWS: usize = 4;
    const COLS: usize = 6;
    const SIGMA: f64 = 0.75;
    let dev = &o.device;
    let gold = load_file(&o.fixtures.join("flux/golden.safetensors"))?;
    let get = |k: &str| {
        gold.get(k)
            .cloned()
            .ok_or_else(|| Error::Io { path: o.fixtures.join("flux/golden.safetensors"), reason: format!("no `{k}`") })
    };
    let want = get("out.ip_instantx")?;
    let ip_store = load_ip_adapter(&o.fixtures.join("ip-adapter.safetensors"))?;
    let forward = |dtype: DType, device: &Device, kernels: Kernels| -> Result<Tensor> {
        let files = load_flux(&o.fixtures.join("flux/flux-tiny-bfl.safetensors"))?;
        let axes = files.axes_dim.or(Some(vec![4, 6, 6]));
        let mut m = FluxModel::from_store(files.weights, axes, dtype, device)?;
        let set = match kernels {
            Kernels::Reference => None,
            Kernels::Default | Kernels::Variant(_) | Kernels::Modulation(_) => o.default_set.as_ref(),
            Kernels::Baseline => o.baseline.as_ref(),
        };
        let mut attention = Attention::reference();
        if let Some(set) = set {
            attention = match kernels {
                Kernels::Variant(i) => o.attention_variants[i].clone(),
                _ => set.attention.clone(),
            };
            m.set_fused_modulation(Some(match kernels {
                Kernels::Modulation(i) => o.modulation_variants[i].clone(),
                _ => set.modulation.clone(),
            }));
        }
        m.set_attention(attention.clone());
        let adapter = IpAdapter::from_store(&ip_store, DType::F32, device)?;
        let embeds = get("in.embeds_a")?.to_device(device)?;
        let cfg = IpAttentionConfig { head_dim: m.cfg.head_dim(), v_norm: VNorm::InstantX };
        let kv = adapter
            .kv_all(&embeds, &cfg)?
            .into_iter()
            .map(|kv| Ok(IpKv { k: kv.k.to_dtype(dtype)?, v: kv.v.to_dtype(dtype)? }))
            .collect::<Result<Vec<_>>>()?;
        let hook_cfg = IpHookConfig { weight: IpWeight::Constant(0.7), ..IpHookConfig::default() };
        let hook = IpAdapterHook::new(vec![IpImage { kv, weight: 1.0 }], hook_cfg, &m.cfg)?.with_attention(attention);
        let cond = Conditioning {
            txt: get("in.txt")?.to_device(device)?,
            y: get("in.y")?.to_device(device)?,
            guidance: Some(3.5),
        };
        let hooks: [&dyn AttentionHook; 1] = [&hook];
        Ok(m.forward(&get("in.img")?.to_device(device)?, &img_ids(ROWS, COLS), &cond, SIGMA, 0, Hooks::new(&hooks))?)
    };
    let cpu = forward(DType::F32, &Device::Cpu, Kernels::Reference)?;
    let mut cases = vec![(DType::F32, Kernels::Reference, F32_TOL), (DType::BF16, Kernels::Reference, HALF_TOL)];
    if o.default_attention().is_some() {
        cases.push((DType::BF16, Kernels::Default, HALF_TOL));
        // The attention kernels the default set could take instead, in the whole model.
        cases.extend((0..o.attention_variants.len()).map(|i| (DType::BF16, Kernels::Variant(i), HALF_TOL)));
        cases.extend((0..o.modulation_variants.len()).map(|i| (DType::BF16, Kernels::Modulation(i), HALF_TOL)));
    }
    if o.baseline.is_some() {
        cases.push((DType::BF16, Kernels::Baseline, HALF_TOL));
    }
    for (dtype, kernels, tol) in cases {
        let got = forward(dtype, dev, kernels)?;
        let label = match kernels {
            Kernels::Reference => "reference attention".to_string(),
            Kernels::Default => "default fused kernels".to_string(),
            Kernels::Variant(i) => format!("default set with {}", o.attention_variants[i].name()),
            Kernels::Modulation(i) => format!("default set with {}", o.modulation_variants[i].name()),
            Kernels::Baseline => "baseline kernels".to_string(),
        };
        let name = dev_name(dev);
        r.check(
            Section::Parity,
            format!("Flux tiny + IP, {name} {dtype:?} ({label}) vs diffusers"),
            rel_max_err(&got, &want)?,
            tol,
        );
        r.check(
            Section::Parity,
            format!("Flux tiny + IP, {name} {dtype:?} ({label}) vs CPU f32"),
            rel_max_err(&got, &cpu)?,
            tol,
        );
    }
    Ok(())
}

/// The tiny Flux from its GGUF fixture, kept quantized on the device (each
/// layer dequantized by candle's kernels as it runs) with the default fused
/// kernels, against the CPU with the weights dequantized at load.
fn parity_flux_gguf(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let gold = load_file(&o.fixtures.join("flux/golden.safetensors"))?;
    let get = |k: &str| {
        gold.get(k)
            .cloned()
            .ok_or_else(|| Error::Io { path: o.fixtures.join("flux/golden.safetensors"), reason: format!("no `{k}`") })
    };
    let forward = |dtype: DType, device: &Device, gguf: GgufWeights| -> Result<Tensor> {
        let files = load_flux(&o.fixtures.join("flux/flux-tiny-bfl.gguf"))?;
        let load = FluxLoad { dtype, device, streamed: &[], gguf, loras: &[] };
        let (mut m, _) = FluxModel::from_store_with(files.weights, Some(vec![4, 6, 6]), &load)?;
        if let (false, Some(set)) = (device.is_cpu(), o.default_set.as_ref()) {
            m.set_attention(set.attention.clone());
            m.set_fused_modulation(Some(set.modulation.clone()));
        }
        let cond = Conditioning {
            txt: get("in.txt")?.to_device(device)?,
            y: get("in.y")?.to_device(device)?,
            guidance: Some(3.5),
        };
        let x = get("in.img")?.to_device(device)?.to_dtype(dtype)?;
        Ok(m.forward(&x, &img_ids(4, 6), &cond, 0.75, 0, Hooks::new(&[]))?)
    };
    let cpu = forward(DType::F32, &Device::Cpu, GgufWeights::Dequantized)?;
    let name = dev_name(&o.device);
    for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, HALF_TOL)] {
        let got = forward(dtype, &o.device, GgufWeights::Quantized)?;
        r.check(
            Section::Parity,
            format!("Flux tiny GGUF kept quantized, {name} {dtype:?} vs CPU f32 dequantized at load"),
            rel_max_err(&got, &cpu)?,
            tol,
        );
    }
    Ok(())
}

/// Which kernels a parity run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Reference,
    /// The default set (`default_set`).
    Default,
    /// The default set with `attention_variants[i]` as its attention.
    Variant(usize),
    /// The default set with `modulation_variants[i]` as its fused Flux kernels.
    Modulation(usize),
    Baseline,
}

fn randn(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
}

/// Fused vs reference attention at Flux's and SigLIP's real shapes, bf16, both against f32.
fn attention_real_shapes(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let Some(fused) = o.default_attention() else {
        r.info(
            Section::Attention,
            "fused attention",
            "n/a".into(),
            String::new(),
            "this build has no fused kernel".into(),
        );
        return Ok(());
    };
    let dev = &o.device;
    // (name, [B, H, L, S, D])
    let shapes: Vec<(&str, [usize; 5])> = if o.quick {
        vec![("small", [1, 2, 100, 100, 72])]
    } else {
        vec![
            ("Flux 1024² joint", [1, 24, 4608, 4608, 128]),
            ("Flux 512² joint", [1, 24, 1536, 1536, 128]),
            ("IP-Adapter 1024² (128 image tokens)", [1, 24, 4608, 128, 128]),
            ("SigLIP so400m", [1, 16, 729, 729, 72]),
        ]
    };
    let reference = Attention::reference();
    let kernels: Vec<&Attention> = std::iter::once(fused).chain(&o.alternatives).collect();
    // Separate transpose, scale and add after the kernel, to time the epilogues against.
    let plain = o.baseline.as_ref().map_or(fused, |b| &b.attention);
    for (name, [b, h, l, s, d]) in shapes {
        let (q, k, v) = (
            randn(&[b, h, l, d], DType::BF16, dev)?,
            randn(&[b, h, s, d], DType::BF16, dev)?,
            randn(&[b, h, s, d], DType::BF16, dev)?,
        );
        let exact = sdpa(&q.to_dtype(DType::F32)?, &k.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?)?;
        let naive = reference.sdpa(&q, &k, &v)?;
        let e_naive = rel_max_err(&naive, &exact)?;
        let t_naive = time_ms(dev, o.runs, || {
            drop(reference.sdpa(&q, &k, &v)?);
            Ok(())
        })?;
        let flop = 4.0 * (b * h * l * s * d) as f64;
        let scores = gib((b * h * l * s * 2) as u64);
        for kernel in &kernels {
            let ours = kernel.sdpa(&q, &k, &v)?;
            r.check(
                Section::Attention,
                format!("{name} [{b},{h},{l}|{s},{d}] bf16 {} vs f32 (reference bf16: {e_naive:.2e})", kernel.name()),
                rel_max_err(&ours, &exact)?,
                HALF_TOL,
            );
            let t_fused = time_ms(dev, o.runs, || {
                drop(kernel.sdpa(&q, &k, &v)?);
                Ok(())
            })?;
            r.info(
                Section::Attention,
                format!(
                    "  {} vs reference time (reference materialises {scores:.2} GiB of bf16 scores)",
                    kernel.name()
                ),
                format!("{t_fused:.3} ms ({:.0} TFLOP/s)", flop / t_fused / 1e9),
                format!("{t_naive:.3} ms (ours, reference)"),
                format!("{:.2}×", t_fused / t_naive),
            );
        }
        // The default set's epilogues, with its own kernel and the variants it may take instead.
        for attention in std::iter::once(fused).chain(&o.attention_variants) {
            merged_epilogue(o, r, attention, plain, name, (&q, &k, &v), &exact)?;
            if s == l && (d == 128 || o.quick) && attention.takes_extra() {
                fused_ip_term(o, r, attention, name, (&q, &k, &v), &exact)?;
            }
        }
    }
    Ok(())
}

/// An attention's merged-heads epilogue, plain and adding a scaled term to a
/// base (the IP-Adapter's use), against f32; timed against `plain`'s kernel
/// followed by candle's transpose copy, scale and add.
fn merged_epilogue(
    o: &CheckOptions,
    r: &mut Report,
    attention: &Attention,
    plain: &Attention,
    name: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    exact: &Tensor,
) -> Result<()> {
    const SCALE: f64 = 0.7;
    let exact = ipaflux_core::nn::merge_heads(exact)?;
    let base = randn(exact.dims(), DType::BF16, &o.device)?;
    let want_add = (base.to_dtype(DType::F32)? + (&exact * SCALE)?)?;
    let merged = attention.sdpa_merged(q, k, v)?;
    r.check(
        Section::Attention,
        format!("{name}: {} heads merged vs f32", attention.name()),
        rel_max_err(&merged, &exact)?,
        HALF_TOL,
    );
    let added = attention.sdpa_merged_add(q, k, v, &base, SCALE)?;
    r.check(
        Section::Attention,
        format!("{name}: {} base + {SCALE}·attention vs f32", attention.name()),
        rel_max_err(&added, &want_add)?,
        HALF_TOL,
    );
    if k.dim(2)? <= 512 {
        // The query as a double block passes the IP term's: its image rows, a narrow of longer rows.
        let l = q.dim(2)?;
        let rows = Tensor::cat(&[q, q], 2)?.narrow(2, l, l)?;
        let added = attention.sdpa_merged_add(&rows, k, v, &base, SCALE)?;
        r.check(
            Section::Attention,
            format!("{name}: {} base + {SCALE}·attention, the query a narrow of longer rows, vs f32", attention.name()),
            rel_max_err(&added, &want_add)?,
            HALF_TOL,
        );
    }
    let t_epilogue = time_ms(&o.device, o.runs, || {
        drop(attention.sdpa_merged_add(q, k, v, &base, SCALE)?);
        Ok(())
    })?;
    let t_separate = time_ms(&o.device, o.runs, || {
        drop(plain.sdpa_merged_add(q, k, v, &base, SCALE)?);
        Ok(())
    })?;
    r.info(
        Section::Attention,
        format!("  base + s·attention, heads merged: in the epilogue vs {} + transpose + scale + add", plain.name()),
        format!("{t_epilogue:.3} ms"),
        format!("{t_separate:.3} ms"),
        format!("{:.2}×", t_epilogue / t_separate),
    );
    Ok(())
}

/// The IP-Adapter's term (128 image tokens, pre-RoPE query) fused into an
/// attention's launch (`sdpa_merged_extra`), on the image rows of a
/// double block (from the 512th) and on all rows (single block), against f32;
/// timed against the same attention and the term in two launches (its own
/// epilogue add).
fn fused_ip_term(
    o: &CheckOptions,
    r: &mut Report,
    attention: &Attention,
    name: &str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    exact: &Tensor,
) -> Result<()> {
    const SCALE: f64 = 0.8;
    const IP_TOKENS: usize = 128;
    let (b, h, l, d) = q.dims4()?;
    let dev = &o.device;
    let (q_ip, k_ip, v_ip) = (
        randn(&[b, h, l, d], DType::BF16, dev)?,
        randn(&[b, h, IP_TOKENS, d], DType::BF16, dev)?,
        randn(&[b, h, IP_TOKENS, d], DType::BF16, dev)?,
    );
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let exact_main = ipaflux_core::nn::merge_heads(exact)?;
    let exact_ip = (ipaflux_core::nn::merge_heads(&sdpa(&f32(&q_ip)?, &f32(&k_ip)?, &f32(&v_ip)?)?)? * SCALE)?;
    let txt = if o.quick { l / 3 } else { 512.min(l) };
    for (row0, site) in [(txt, "double block: rows from the first image token"), (0, "single block: all rows")] {
        let extra = ExtraAttention { q: &q_ip, k: &k_ip, v: &v_ip, row0, scale: SCALE };
        let Some(got) = attention.sdpa_merged_extra(q, k, v, &extra) else {
            let what = format!("{name}: IP term fused into {}", attention.name());
            r.bool_check(Section::Attention, what, "not taken".into(), "taken".into(), false);
            return Ok(());
        };
        let term = Tensor::cat(&[exact_ip.narrow(1, 0, row0)?.zeros_like()?, exact_ip.narrow(1, row0, l - row0)?], 1)?;
        r.check(
            Section::Attention,
            format!("{name}: {} + IP term (S = {IP_TOKENS}) in one launch, {site}, vs f32", attention.name()),
            rel_max_err(&got?, &(&exact_main + term)?)?,
            HALF_TOL,
        );
    }
    let extra = ExtraAttention { q: &q_ip, k: &k_ip, v: &v_ip, row0: 0, scale: SCALE };
    let t_fused = time_ms(dev, o.runs, || {
        drop(attention.sdpa_merged_extra(q, k, v, &extra).transpose()?);
        Ok(())
    })?;
    let t_main = time_ms(dev, o.runs, || {
        drop(attention.sdpa_merged(q, k, v)?);
        Ok(())
    })?;
    let t_two = time_ms(dev, o.runs, || {
        let attn = attention.sdpa_merged(q, k, v)?;
        drop(attention.sdpa_merged_add(&q_ip, &k_ip, &v_ip, &attn, SCALE)?);
        Ok(())
    })?;
    r.info(
        Section::Attention,
        format!("  attention + IP term: one launch vs two (attention alone {t_main:.3} ms)"),
        format!("{t_fused:.3} ms (IP +{:.3} ms)", t_fused - t_main),
        format!("{t_two:.3} ms (IP +{:.3} ms)", t_two - t_main),
        format!("{:.2}×", t_fused / t_two),
    );
    Ok(())
}

/// Random device weights for named shapes: matrices ~ N(0, 1/fan_in), norm scales ~ 1, biases small.
pub fn random_weights(list: &[(String, Vec<usize>)], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::with_capacity(list.len());
    for (name, shape) in list {
        let fan_in = if shape.len() >= 2 { shape[1..].iter().product::<usize>() } else { 1 };
        let t = if shape.len() >= 2 {
            Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, shape.as_slice(), device)?
        } else if name.ends_with("bias") {
            Tensor::randn(0f32, 0.02, shape.as_slice(), device)?
        } else {
            (Tensor::randn(0f32, 0.02, shape.as_slice(), device)? + 1.0)?
        };
        map.insert(name.clone(), t.to_dtype(dtype)?);
    }
    Ok(map)
}

pub fn siglip_config(quick: bool) -> SiglipVisionConfig {
    let real = SiglipVisionConfig::so400m_patch14_384();
    if quick {
        SiglipVisionConfig { num_hidden_layers: 2, image_size: 112, ..real }
    } else {
        real
    }
}

fn ratio_row(r: &mut Report, o: &CheckOptions, what: String, ours_ms: f64, torch_key: &str, target: Option<f64>) {
    let torch = o.torch.as_ref().and_then(|t| t.get(torch_key).copied());
    let (reference, note) = match torch {
        Some(t) => {
            let ratio = ours_ms / t;
            let verdict = match target {
                Some(x) if ratio <= x => format!("{ratio:.2}× (target ≤ {x}×: met)"),
                Some(x) => format!("{ratio:.2}× (target ≤ {x}×: **not met**)"),
                None => format!("{ratio:.2}×"),
            };
            (format!("{t:.2} ms"), verdict)
        }
        None => ("—".into(), "no PyTorch figure".into()),
    };
    r.info(Section::Bench, what, format!("{ours_ms:.2} ms"), reference, note);
}

/// Calls timed for SigLIP with the fused attention (`SIGLIP_RUNS` in scripts/gpu_bench_torch.py).
const SIGLIP_RUNS: usize = 30;

/// SigLIP so400m batch 1 (reference and fused attention) and the projection, bf16.
fn bench_encoder(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let dev = &o.device;
    let dtype = if dev.is_cpu() { DType::F32 } else { DType::BF16 };
    let cfg = siglip_config(o.quick);
    let weights = random_weights(&expected_tensors(&cfg), dtype, dev)?;
    let bytes: usize = weights.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let mut model = SiglipVisionModel::new(&cfg, VarBuilder::from_tensors(weights, dtype, dev))?;
    let pixels = randn(&[1, 3, cfg.image_size, cfg.image_size], dtype, dev)?;
    let label = if o.quick { "SigLIP (2 layers, 112²)" } else { "SigLIP so400m batch 1" };
    let ms = time_ms(dev, o.runs, || {
        drop(model.forward(&pixels)?);
        Ok(())
    })?;
    ratio_row(
        r,
        o,
        format!("{label}, {dtype:?}, reference attention ({:.2} GiB weights)", gib(bytes as u64)),
        ms,
        "siglip_ms",
        None,
    );
    if let Some(a) = o.default_attention() {
        model.set_attention(a.clone());
        // As many calls as PyTorch's SigLIP figure (scripts/gpu_bench_torch.py): both launch-bound.
        let ms = time_ms(dev, o.runs.max(SIGLIP_RUNS), || {
            drop(model.forward(&pixels)?);
            Ok(())
        })?;
        ratio_row(r, o, format!("{label}, {dtype:?}, fused attention (median)"), ms, "siglip_ms", Some(1.0));
        ratio_row(
            r,
            o,
            format!("  the same median against PyTorch's fastest of {SIGLIP_RUNS} calls"),
            ms,
            "siglip_min_ms",
            Some(1.0),
        );
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            let releasing = crate::cuda::check::with_pool_releasing(dev, || {
                time_ms(dev, o.runs.max(SIGLIP_RUNS), || {
                    drop(model.forward(&pixels)?);
                    Ok(())
                })
            })?;
            r.info(
                Section::Bench,
                "  the same, the memory pool handing freed memory back at each sync (CUDA's default)",
                format!("{releasing:.2} ms"),
                format!("{ms:.2} ms (pool keeps it: ipaflux's setting)"),
                format!("keeping saves {:.2} ms a call", releasing - ms),
            );
            model = bench_graph(o, r, model, &pixels, &format!("{label}, {dtype:?}, fused attention"))?;
        }
        if let Some(linear) = &o.linear_variant {
            model.set_fused_linear(Some(linear.clone()));
            let with = format!("{label}, {dtype:?}, fused attention, {}", linear.name());
            // A variant not yet run on a GPU: its failure is a row, not the end of the section.
            match time_ms(dev, o.runs.max(SIGLIP_RUNS), || {
                drop(model.forward(&pixels)?);
                Ok(())
            }) {
                Ok(ms) => {
                    ratio_row(r, o, format!("{with} (median)"), ms, "siglip_ms", Some(1.0));
                    // Both launch savings together: fewer kernels, replayed as a graph.
                    #[cfg(feature = "cuda")]
                    if dev.is_cuda() {
                        model = bench_graph(o, r, model, &pixels, &with)?;
                    }
                }
                Err(e) => r.bool_check(
                    Section::Bench,
                    format!("{with} (median)"),
                    format!("failed: {e}"),
                    "runs".into(),
                    false,
                ),
            }
            model.set_fused_linear(None);
        }
    }
    drop(model);

    let dims = IpAdapterDims {
        id_dim: 1152,
        proj_hidden: 2304,
        num_tokens: if o.quick { 8 } else { 128 },
        cross_dim: if o.quick { 256 } else { 4096 },
        num_processors: 57,
        hidden: 3072,
    };
    let names: Vec<(String, Vec<usize>)> = dims
        .expected_tensors()
        .into_iter()
        .filter_map(|(n, s)| n.strip_prefix("image_proj.").map(|n| (n.to_string(), s)))
        .collect();
    let proj = MlpProjection::new(&dims, VarBuilder::from_tensors(random_weights(&names, dtype, dev)?, dtype, dev))?;
    let pooled = randn(&[1, dims.id_dim], dtype, dev)?;
    let ms = time_ms(dev, o.runs.max(10), || {
        drop(proj.forward(&pooled)?);
        Ok(())
    })?;
    ratio_row(
        r,
        o,
        format!("projection 1152→2304→{}×{}, {dtype:?}", dims.num_tokens, dims.cross_dim),
        ms,
        "projection_ms",
        None,
    );
    Ok(())
}

/// The encoder as a CUDA graph: bit-identity with eager calls, capture
/// time, the graph pool's reservation, and the replay's median beside
/// PyTorch's eager call (the steady state of repeated encodes; a one-off
/// encode pays the capture). Gives the model back.
#[cfg(feature = "cuda")]
fn bench_graph(
    o: &CheckOptions,
    r: &mut Report,
    model: SiglipVisionModel,
    pixels: &Tensor,
    label: &str,
) -> Result<SiglipVisionModel> {
    use crate::cuda::graph::GraphedEncoder;
    let other = (pixels.flip(&[2])? * 0.5)?;
    let model = graph_identity(r, model, &[pixels.clone(), other], label)?;
    let t = Instant::now();
    let graph = match GraphedEncoder::capture(model, pixels.dims()[0]) {
        Ok(g) => g,
        Err(failed) => return Ok(failed.model), // the identity row above has failed with the reason
    };
    let capture_ms = t.elapsed().as_secs_f64() * 1e3;
    let ms = time_ms(&o.device, o.runs.max(SIGLIP_RUNS), || {
        drop(graph.forward(pixels)?);
        Ok(())
    })?;
    r.info(
        Section::Bench,
        format!("{label}, CUDA graph: capture (an eager call, capture, first replay)"),
        format!("{capture_ms:.1} ms"),
        "—".into(),
        format!("graph pool {:.1} MiB", mib(graph.reserved_bytes())),
    );
    ratio_row(r, o, format!("{label}, CUDA graph replay (median)"), ms, "siglip_ms", Some(1.0));
    ratio_row(
        r,
        o,
        format!("  the same median against PyTorch's fastest of {SIGLIP_RUNS} calls"),
        ms,
        "siglip_min_ms",
        Some(1.0),
    );
    Ok(graph.into_model())
}

/// One Flux step at 1024² and 512² (full FLUX.1-dev depth unless quick), IP
/// overhead; then at the first size the default set with its attention
/// variants, and the baseline kernel set, where this build has them.
fn bench_flux_steps(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let dev = &o.device;
    let dtype = if dev.is_cpu() { DType::F32 } else { DType::BF16 };
    let (depth, single, sizes) = if o.quick { (1, 1, vec![128]) } else { (19, 38, vec![1024, 512]) };
    let attention = o.default_attention().cloned().unwrap_or_default();
    let fused_mod = if o.default_set.is_some() { " + the default set's fused Flux kernels" } else { "" };
    let base = FluxBenchOptions {
        size: sizes[0],
        narrow: o.quick,
        txt_tokens: if o.quick { 32 } else { 512 },
        depth,
        depth_single: single,
        runs: o.runs,
        dtype,
        device: dev.clone(),
        attention: attention.clone(),
        modulation: o.default_modulation(),
        peak: o.peak.clone(),
    };
    let mut default_steps = Vec::new();
    for &size in &sizes {
        let label =
            format!("Flux {depth}+{single} blocks step {size}², {dtype:?}, {} attention{fused_mod}", attention.name());
        default_steps.push(step_rows(o, r, &FluxBenchOptions { size, ..base.clone() }, label)?);
    }
    // The default step with the other attention kernels the default set could take.
    if let Some(&(plain, ip)) = default_steps.first() {
        let torch = o.torch.as_ref().and_then(|t| t.get(&format!("flux_{}_ms", base.size)).copied());
        for attention in &o.attention_variants {
            let opts = FluxBenchOptions { attention: attention.clone(), runs: o.runs.min(3), ..base.clone() };
            let (v_plain, v_ip) = bench_flux::run_plain_and_ip(&opts)?;
            let vs_torch = torch.map_or(String::new(), |t| format!("; {:.3}× PyTorch's step", v_plain / t));
            r.info(
                Section::Bench,
                format!("  default step {}² without / with IP, with {}", base.size, attention.name()),
                format!("{v_plain:.2} / {v_ip:.2} ms (IP {:+.2} %)", (v_ip - v_plain) / v_plain * 100.0),
                format!("{plain:.2} / {ip:.2} ms"),
                format!("{:.3}× / {:.3}× the default's{vs_torch}", v_plain / plain, v_ip / ip),
            );
        }
    }
    // The default step with the other fused Flux kernels the default set could take.
    if let Some(&(plain, ip)) = default_steps.first() {
        let torch = o.torch.as_ref().and_then(|t| t.get(&format!("flux_{}_ms", base.size)).copied());
        for modulation in &o.modulation_variants {
            let what = format!("  default step {}² without / with IP, with {}", base.size, modulation.name());
            let opts = FluxBenchOptions { modulation: Some(modulation.clone()), runs: o.runs.min(3), ..base.clone() };
            // A variant not yet run on a GPU: its failure is a row, not the end of the section.
            match bench_flux::run_plain_and_ip(&opts) {
                Ok((v_plain, v_ip)) => {
                    let vs_torch = torch.map_or(String::new(), |t| format!("; {:.3}× PyTorch's step", v_plain / t));
                    r.info(
                        Section::Bench,
                        what,
                        format!("{v_plain:.2} / {v_ip:.2} ms (IP {:+.2} %)", (v_ip - v_plain) / v_plain * 100.0),
                        format!("{plain:.2} / {ip:.2} ms"),
                        format!("{:.3}× / {:.3}× the default's{vs_torch}", v_plain / plain, v_ip / ip),
                    );
                }
                Err(e) => r.bool_check(Section::Bench, what, format!("failed: {e}"), "runs".into(), false),
            }
        }
    }
    // The baseline set, what the default is compared with.
    if let Some(b) = &o.baseline {
        let opts =
            FluxBenchOptions { attention: b.attention.clone(), modulation: Some(b.modulation.clone()), ..base.clone() };
        let label = format!("Flux {depth}+{single} blocks step {}², {dtype:?}, baseline kernels", base.size);
        let (b_plain, b_ip) = step_rows(o, r, &opts, label)?;
        if let Some(&(plain, ip)) = default_steps.first() {
            r.info(
                Section::Bench,
                format!("default vs baseline kernel set, step {}² without / with IP", base.size),
                format!("{plain:.2} / {ip:.2} ms"),
                format!("{b_plain:.2} / {b_ip:.2} ms"),
                format!("{:.3}× / {:.3}×", plain / b_plain, ip / b_ip),
            );
        }
    }
    // Diagnostics last: where the default step's time goes.
    if o.default_attention().is_some() && !o.quick {
        // `base` at full size is the 1024² step (`sizes[0]`).
        let opts = FluxBenchOptions { runs: o.runs.min(3), modulation: None, ..base.clone() };
        if o.default_set.is_some() {
            let ms = bench_flux::run_plain(&opts)?;
            ratio_row(
                r,
                o,
                format!(
                    "Flux {depth}+{single} step 1024², {dtype:?}, {} attention, candle's separate modulation ops",
                    attention.name()
                ),
                ms,
                "flux_1024_ms",
                None,
            );
        }
        let opts = FluxBenchOptions { attention: Attention::reference(), modulation: o.default_modulation(), ..opts };
        let ms = bench_flux::run_plain(&opts)?;
        ratio_row(
            r,
            o,
            format!("Flux {depth}+{single} step 1024², {dtype:?}, reference attention{fused_mod}"),
            ms,
            "flux_1024_ms",
            None,
        );
        let skip = FluxBenchOptions { attention: Attention::fused(Arc::new(NoAttention)), ..opts };
        let ms = bench_flux::run_plain(&skip)?;
        ratio_row(
            r,
            o,
            "  diagnostic: the same step with attention replaced by V (everything but attention)".into(),
            ms,
            "flux_1024_ms",
            None,
        );
    }
    Ok(())
}

/// One `bench_flux` run: the plain step against PyTorch, its peak memory,
/// the IP-Adapter's overhead and branch times. Returns the step's time
/// without and with the IP-Adapter (cached K/V).
fn step_rows(o: &CheckOptions, r: &mut Report, opts: &FluxBenchOptions, label: String) -> Result<(f64, f64)> {
    let size = opts.size;
    let rows = bench_flux::run(opts)?;
    let find = |prefix: &str| rows.iter().find(|row| row.name.starts_with(prefix)).map(|row| row.ms);
    let (Some(plain), Some(cached)) = (find("step, no IP"), find("step, IP with cached")) else {
        return Err(Error::Core(ipaflux_core::Error::Shape("bench rows missing".into())));
    };
    let memory = rows.iter().find_map(|row| row.memory);
    ratio_row(r, o, label, plain, &format!("flux_{size}_ms"), if size == 1024 { Some(0.9) } else { None });
    if let Some(m) = memory {
        let torch = |key: &str| o.torch.as_ref().and_then(|t| t.get(&format!("flux_{size}_{key}")).copied());
        let probe = if o.device.is_cpu() { "process RSS" } else { "driver-reported use less the memory pool's cache" };
        r.info(
            Section::Bench,
            format!("  peak memory during the step, weights included ({probe})"),
            format!("{:.2} GiB", gib(m.peak)),
            torch("peak_gib").map_or("—".into(), |t| format!("{t:.2} GiB (torch max allocated)")),
            String::new(),
        );
        let torch_working = torch("peak_gib").zip(torch("before_gib")).map(|(p, b)| (p - b) * 1024.0);
        r.info(
            Section::Bench,
            format!("  the step's own memory: peak − in use before it ({:.2} GiB)", gib(m.before)),
            format!("{:.0} MiB", mib(m.working())),
            torch_working.map_or("—".into(), |t| format!("{t:.0} MiB (torch)")),
            torch_working.map_or(String::new(), |t| format!("{:.2}×", mib(m.working()) / t)),
        );
    }
    let overhead = (cached - plain) / plain * 100.0;
    r.info(
        Section::Bench,
        format!("  with IP-Adapter, cached K/V ({size}²)"),
        format!("{cached:.2} ms"),
        "—".into(),
        format!(
            "overhead {overhead:+.2} % of the step (target ≤ 0.5 %; whole-step differences include run-to-run noise)"
        ),
    );
    for row in rows.iter().filter(|row| row.name.starts_with("IP branch") || row.name.starts_with("  K/V")) {
        let key = if row.name.contains("recomputed") {
            format!("ip_recomputed_ms_{size}")
        } else if row.name.contains("cached") {
            format!("ip_cached_ms_{size}")
        } else {
            String::new()
        };
        let torch = o.torch.as_ref().and_then(|t| t.get(&key).copied());
        let share = row.ms / plain * 100.0;
        r.info(
            Section::Bench,
            format!("  {} ({size}²)", row.name.trim()),
            format!("{:.2} ms ({share:.2} % of the step)", row.ms),
            torch.map_or("—".into(), |t| format!("{t:.2} ms")),
            torch.map_or(String::new(), |t| format!("{:.2}×", row.ms / t)),
        );
    }
    let kv_added = rows.iter().find(|row| row.name.starts_with("  K/V")).and_then(|row| row.resident_added);
    if let Some(added) = kv_added {
        // Issue 4's target is per image at full depth; a reduced run is scaled by its blocks.
        let full = ipaflux_core::flux::FluxConfig::dev().num_blocks();
        let per_image = mib(added) * full as f64 / (opts.depth + opts.depth_single).max(1) as f64;
        let probe = if o.device.is_cpu() { "process RSS" } else { "driver-reported use less the memory pool's cache" };
        r.info(
            Section::Bench,
            format!("  memory the cached K/V of one image keeps ({probe}, for {full} blocks)"),
            format!("{per_image:.1} MiB"),
            "—".into(),
            if o.device.is_cpu() {
                "not judged on the CPU (freed heap is reused without growing the RSS)".into()
            } else {
                format!("target ≤ 100 MiB: {}", if per_image <= 100.0 { "met" } else { "**not met**" })
            },
        );
    }
    Ok((plain, cached))
}

/// The budget FLUX.1-dev is streamed in (the target case).
const STREAM_BUDGET: u64 = 12 << 30;

/// FLUX.1-dev at 1024² planned by the registry into a 12 GiB device and run
/// streamed (CUDA: pinned memory, prefetch on a second stream), beside the
/// same step all-resident; the driver's peak against the budget is a check.
/// Quick runs: the narrow model in its weights less 10 % (and the margin), on any device.
fn bench_flux_streamed(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let dev = &o.device;
    let dtype = if dev.is_cpu() { DType::F32 } else { DType::BF16 };
    let (depth, single) = if o.quick { (2, 2) } else { (19, 38) };
    let opts = FluxBenchOptions {
        size: if o.quick { 128 } else { 1024 },
        narrow: o.quick,
        txt_tokens: if o.quick { 32 } else { 512 },
        depth,
        depth_single: single,
        runs: o.runs.min(3),
        dtype,
        device: dev.clone(),
        attention: o.default_attention().cloned().unwrap_or_default(),
        modulation: o.default_modulation(),
        peak: o.peak.clone(),
    };
    let weights: u64 = unit_specs(&bench_flux::bench_config(&opts), dtype).iter().map(|u| u.bytes).sum();
    // Quick: the registry's 1 GiB safety margin plus 90 % of the weights.
    let (budget, working) =
        if o.quick { (DEFAULT_SAFETY_MARGIN + weights / 10 * 9, Some(1 << 20)) } else { (STREAM_BUDGET, None) };
    let host = bench_flux::host_source(dev);
    #[cfg(feature = "cuda")]
    let pinned = std::cell::RefCell::new(None::<Arc<crate::cuda::stream::PinnedBlocks>>);
    #[cfg(feature = "cuda")]
    let cuda_source = |t: &std::collections::BTreeMap<String, Tensor>,
                       b: &[ipaflux_core::flux::BlockId]|
     -> Result<Arc<dyn ipaflux_core::flux::BlockSource>> {
        let source = Arc::new(crate::cuda::stream::PinnedBlocks::new(t.clone(), b, dev)?);
        *pinned.borrow_mut() = Some(source.clone());
        Ok(source as Arc<dyn ipaflux_core::flux::BlockSource>)
    };
    #[cfg(feature = "cuda")]
    let make: bench_flux::SourceMaker = if dev.is_cuda() { &cuda_source } else { &host };
    #[cfg(not(feature = "cuda"))]
    let make: bench_flux::SourceMaker = &host;
    let run = bench_flux::run_streamed(&opts, budget, working, make)?;
    let label = format!("Flux {depth}+{single} step {}², {dtype:?}", opts.size);
    r.info(
        Section::Stream,
        format!("{label}, all resident ({:.2} GiB weights)", gib(run.weight_bytes)),
        format!("{:.2} ms", run.resident_ms),
        run.resident_memory.map_or("—".into(), |m| {
            let left = run.leftover.unwrap_or(0);
            format!(
                "peak {:.2} GiB, {:.2} GiB in use before the step, {:.2} GiB before the model was made",
                gib(m.peak),
                gib(m.before),
                gib(left)
            )
        }),
        String::new(),
    );
    let ratio = run.streamed_ms / run.resident_ms;
    let budget_gib = gib(budget);
    r.info(
        Section::Stream,
        format!(
            "{label}, streamed in a {budget_gib:.2} GiB budget: {} blocks resident, {} streamed ({:.2} GiB copied per step)",
            run.resident_blocks,
            run.streamed_blocks,
            gib(run.streamed_bytes)
        ),
        format!("{:.2} ms", run.streamed_ms),
        format!("{:.2} ms all-resident", run.resident_ms),
        format!("{ratio:.2}× (target ≤ 2×: {})", if ratio <= 2.0 { "met" } else { "**not met**" }),
    );
    let copy_gbs = run.streamed_bytes as f64 / (run.streamed_ms / 1e3) / 1e9;
    r.info(
        Section::Stream,
        "  copy rate needed to hide the stream behind compute".to_string(),
        format!("{:.1} GB/s", run.streamed_bytes as f64 / (run.resident_ms / 1e3) / 1e9),
        format!("{copy_gbs:.1} GB/s achieved over the streamed step"),
        format!("registry planned peak {:.2} GiB (working {:.2} GiB)", gib(run.planned_peak), gib(run.working_bytes)),
    );
    #[cfg(feature = "cuda")]
    if let Some(p) = pinned.borrow().as_ref() {
        let s = p.stats();
        r.bool_check(
            Section::Stream,
            "  every streamed block was prefetched (copied on the second stream ahead of use)",
            format!("{} of {} fetches", s.prefetched, s.fetches),
            "all".into(),
            s.fetches > 0 && s.prefetched == s.fetches,
        );
    }
    if let (Some(live), Some(held), false) = (run.streamed_peak, run.streamed_peak_held, dev.is_cpu()) {
        // What this run put on the device: earlier sections' leftovers are
        // not the job's (each section starts with the pool's cache released,
        // so the leftover is the same by either reading).
        let left = run.leftover.unwrap_or(0);
        let (live, held) = (live.saturating_sub(left), held.saturating_sub(left));
        r.bool_check(
            Section::Stream,
            "  driver-measured peak of the streamed step within the budget, the memory pool's cache included (less what was there before the run)",
            format!("{:.2} GiB (live allocations {:.2} GiB)", gib(held), gib(live)),
            format!("≤ {budget_gib:.2} GiB"),
            held <= budget,
        );
    }
    Ok(())
}

/// A diagnostic stand-in for attention that returns V: a step timed with it
/// measures everything but attention. Never used for results.
#[derive(Debug)]
struct NoAttention;

impl ipaflux_core::nn::FusedAttention for NoAttention {
    fn name(&self) -> &'static str {
        "none (diagnostic)"
    }
    fn attend(&self, _q: &Tensor, _k: &Tensor, v: &Tensor) -> Option<ipaflux_core::Result<Tensor>> {
        Some(Ok(v.clone()))
    }
}
