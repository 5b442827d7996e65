//! `ipaflux bench --webgpu`: the SigLIP encoder at the real so400m shapes
//! (random weights; `layers` of the 27 encoder layers, embeddings and pooling
//! head whole) on the native wgpu adapter (the WGSL kernels of the browser
//! build) against candle on the CPU, and the WGSL matmul's GFLOP/s at 1024³.
//! The full 27-layer time is extrapolated from the per-layer cost, which is
//! measured as the difference of runs at `layers` and `layers + 1`.

use std::rc::Rc;
use std::time::Instant;

use anyhow::Result;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::SiglipVisionModel;
use ipaflux_gpu::bench::{matmul_gflops, random_pixels, random_store, so400m_with_layers};
use ipaflux_gpu::{GpuContext, GpuEncoder, GpuOptions, WeightFormat};

pub struct Options {
    pub layers: usize,
    pub runs: usize,
    pub formats: Vec<WeightFormat>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Median of `runs` timings of `f` (after one warm-up).
fn median(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        v.push(ms_since(t));
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn cpu_ms(layers: usize, runs: usize) -> Result<f64> {
    let cfg = so400m_with_layers(layers);
    let model = SiglipVisionModel::from_store(&cfg, random_store(&cfg)?, DType::F32, &Device::Cpu)?;
    let px = Tensor::from_vec(random_pixels(&cfg), (1, 3, cfg.image_size, cfg.image_size), &Device::Cpu)?;
    median(runs, || Ok(model.forward(&px).map(|_| ())?))
}

fn gpu_ms(ctx: &Rc<GpuContext>, layers: usize, runs: usize, format: WeightFormat) -> Result<f64> {
    let cfg = so400m_with_layers(layers);
    let enc = pollster::block_on(GpuEncoder::load(ctx.clone(), &cfg, random_store(&cfg)?, format))?;
    let px = random_pixels(&cfg);
    median(runs, || Ok(pollster::block_on(enc.pooled(&px, 1)).map(|_| ())?))
}

/// Full-depth estimate from runs at `l` and `l + 1` layers.
fn full(at_l: f64, at_l1: f64, l: usize) -> (f64, f64) {
    let per_layer = (at_l1 - at_l).max(0.0);
    (per_layer, at_l + per_layer * (27 - l.min(27)) as f64)
}

pub fn run(o: &Options) -> Result<String> {
    let ctx = Rc::new(GpuContext::new_blocking(&GpuOptions::default())?);
    let mut out = format!(
        "SigLIP so400m-patch14-384, random weights, batch 1; adapter: {}; candle CPU f32 on {} threads\n",
        ctx.adapter(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    out += &format!(
        "runs at {} and {} encoder layers, median of {}; 27-layer figure extrapolated per layer\n\n",
        o.layers,
        o.layers + 1,
        o.runs
    );
    out +=
        &format!("{:<26}{:>14}{:>14}{:>16}{:>12}\n", "path", "ms/layer", "ms (27 est.)", "× vs candle", "MB weights");
    // Encoder-layer weights at full depth (4 attention projections, 2 MLP matrices per layer).
    let layers_mb = |f: WeightFormat| (f.bytes(1152, 1152) * 4 + f.bytes(4304, 1152) * 2) as f64 * 27.0 / 1e6;
    let (c0, c1) = (cpu_ms(o.layers, o.runs)?, cpu_ms(o.layers + 1, o.runs)?);
    let (cl, cfull) = full(c0, c1, o.layers);
    out += &format!(
        "{:<26}{:>14.1}{:>14.0}{:>16}{:>12.0}\n",
        "candle CPU f32",
        cl,
        cfull,
        "1.00",
        layers_mb(WeightFormat::F32)
    );
    eprint!("{out}");
    for &format in &o.formats {
        let (g0, g1) = (gpu_ms(&ctx, o.layers, o.runs, format)?, gpu_ms(&ctx, o.layers + 1, o.runs, format)?);
        let (gl, gfull) = full(g0, g1, o.layers);
        out += &format!(
            "{:<26}{:>14.1}{:>14.0}{:>16.2}{:>12.0}\n",
            format!("wgpu {format}"),
            gl,
            gfull,
            cfull / gfull,
            layers_mb(format)
        );
        eprintln!("{}", out.lines().last().unwrap_or_default());
    }
    let gflops = pollster::block_on(matmul_gflops(&ctx, 1024, WeightFormat::F32, 5, || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    }))?;
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    let cpu = median(5, || Ok(a.matmul(&a.t()?).map(|_| ())?))?;
    out += &format!(
        "\nmatmul 1024³ f32: WGSL {gflops:.1} GFLOP/s; candle CPU {:.1} GFLOP/s\n",
        2.0 * 1024f64.powi(3) / (cpu / 1e3) / 1e9
    );
    out += "(the × column > 1 means faster than candle on the CPU; the weights column counts encoder layers only)\n";
    Ok(out)
}
