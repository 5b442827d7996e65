//! The `ipaflux` command line. See README.md for the commands.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipaflux::{bench, demo, encode, load};
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
        Cmd::Bench { runs, no_projection, no_torch, python } => {
            let opts = bench::BenchOptions { runs, projection: !no_projection, python, compare_torch: !no_torch };
            let rows = bench::run(&opts)?;
            print!("{}", bench::table(&rows, runs));
        }
    }
    Ok(())
}
