//! The `ipaflux` command line. See README.md for the commands.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipaflux::{bench, demo, encode, load, plan};
use ipaflux_core::registry::{parse_bytes, scenario, EvictionPolicy, RegistryConfig, VramState};
use ipaflux_core::{DeviceSpec, Precision};

#[derive(Parser)]
#[command(name = "ipaflux", version, about = "Image-prompt conditioning for FLUX.1 (InstantX IP-Adapter)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Encode a reference image: SigLIP pooled embedding and IP-Adapter image prompt embeddings.
    Encode {
        /// SigLIP folder (config.json + model.safetensors or a sharded index), or its Hugging Face cache entry.
        #[arg(long)]
        siglip: PathBuf,
        /// IP-Adapter checkpoint: InstantX ip-adapter.bin or a flat .safetensors.
        #[arg(long)]
        ip_adapter: PathBuf,
        /// Reference image (PNG, JPEG or WebP).
        #[arg(long)]
        image: PathBuf,
        /// Output safetensors file (f32 `pooled` [1, D] and `image_prompt_embeds` [1, T, C]).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "f32")]
        dtype: Precision,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Run the main job on bundled tiny random models: encode the bundled sample image.
    Demo {
        /// Also write the embeddings to this safetensors file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the memory registry through a whole job on a simulated device and print what it does.
    Plan {
        /// Memory of the simulated device: bytes or a size like `24GiB`.
        #[arg(long)]
        vram: String,
        /// VRAM state: normal, low, no or high.
        #[arg(long, default_value = "normal")]
        state: VramState,
        /// Memory to keep free for other programs, like ComfyUI's --reserve-vram.
        #[arg(long, default_value = "0")]
        reserve: String,
        /// Offload image encoder, projection and IP processors once embeddings exist.
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        offload_preprocessing: String,
        /// Eviction policy: furthest-next-use, lru, largest-first or comfyui.
        #[arg(long, default_value = "furthest-next-use")]
        policy: EvictionPolicy,
        /// A built-in scenario (flux-dev-ipadapter) or a scenario JSON file (schema in ARCHITECTURE.md).
        #[arg(long, default_value = "flux-dev-ipadapter")]
        scenario: String,
        /// Sampler steps (the uses of stages with "repeat": "steps").
        #[arg(long, default_value_t = scenario::DEFAULT_STEPS)]
        steps: u64,
        /// Print JSON: {events, summary, stages}.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark the encoder at the real so400m shapes (random weights, CPU f32), against PyTorch when available.
    Bench {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the 4.8 GB projection.
        #[arg(long)]
        no_projection: bool,
        /// Skip the PyTorch comparison.
        #[arg(long)]
        no_torch: bool,
        /// Only the memory registry's decision overhead (fast; no encoder).
        #[arg(long)]
        registry_only: bool,
        /// Python interpreter with torch and transformers.
        #[arg(long, env = "IPAFLUX_PYTHON", default_value = "python3")]
        python: String,
    },
}

fn print_stages(stages: &[(&str, std::time::Duration)]) {
    for (name, d) in stages {
        eprintln!("  {name:<18} {:>9.2} ms", d.as_secs_f64() * 1e3);
    }
}

fn summarize(name: &str, t: &ipaflux_core::candle_core::Tensor) -> anyhow::Result<String> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
    Ok(format!("{name:<20} {:?}  mean {mean:+.5}  std {std:.5}  first {:?}", t.dims(), &v[..v.len().min(4)]))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Cmd::Encode { siglip, ip_adapter, image, out, dtype, device } => {
            let dev = device.to_candle()?;
            let t = Instant::now();
            let files = load::load_siglip_dir(&siglip)?;
            let adapter = load::load_ip_adapter(&ip_adapter)?;
            let encoder = encode::Encoder::new(&files.config, files.preprocess, files.weights, &adapter, dtype, dev)?;
            let load_time = t.elapsed();
            tracing::info!(dims = ?encoder.adapter.dims, "IP-Adapter loaded");
            let bytes = std::fs::read(&image).with_context(|| format!("{}: cannot read the image", image.display()))?;
            let enc = encoder.encode(&bytes, &image.display().to_string())?;
            let t = Instant::now();
            encode::write_embeddings(&out, &enc)?;
            eprintln!("stage times ({dtype}, {device}):");
            print_stages(&[("load", load_time)]);
            print_stages(&enc.stages);
            print_stages(&[("write", t.elapsed())]);
            eprintln!("wrote {}", out.display());
        }
        Cmd::Demo { out } => {
            let (enc, kv, encoder) = demo::run(Precision::F32)?;
            println!("ipaflux demo: bundled tiny SigLIP + IP-Adapter (random weights), bundled sample image");
            println!("{}", summarize("pooled", &enc.pooled)?);
            println!("{}", summarize("image_prompt_embeds", &enc.image_prompt_embeds)?);
            let kv_bytes: usize = kv.iter().map(|k| k.nbytes()).sum();
            println!(
                "IP K/V for {} blocks: {:?} each, {} bytes in all",
                kv.len(),
                kv.first().map(|k| k.k.dims().to_vec()),
                kv_bytes
            );
            println!("adapter dims: {:?}", encoder.adapter.dims);
            println!("stage times:");
            for (name, d) in &enc.stages {
                println!("  {name:<18} {:>9.2} ms", d.as_secs_f64() * 1e3);
            }
            if let Some(path) = out {
                encode::write_embeddings(&path, &enc)?;
                println!("wrote {}", path.display());
            }
        }
        Cmd::Plan { vram, state, reserve, offload_preprocessing, policy, scenario: name, steps, json } => {
            let config = RegistryConfig {
                state,
                reserve_bytes: parse_bytes(&reserve).context("--reserve")?,
                offload_preprocessing: offload_preprocessing == "on",
                policy,
                ..RegistryConfig::default()
            };
            let options = scenario::PlanOptions { vram_bytes: parse_bytes(&vram).context("--vram")?, config, steps };
            let report = scenario::run(&plan::load_scenario(&name)?, &options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", plan::render(&report));
            }
        }
        Cmd::Bench { runs, no_projection, no_torch, registry_only, python } => {
            if !registry_only {
                let opts = bench::BenchOptions { runs, projection: !no_projection, python, compare_torch: !no_torch };
                let rows = bench::run(&opts)?;
                print!("{}", bench::table(&rows, runs));
            }
            let quiet = tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                bench::registry_overhead(20_000)
            })?;
            let logged = bench::registry_overhead(20_000)?;
            print!("{}", bench::registry_table(&quiet, &logged));
        }
    }
    Ok(())
}
