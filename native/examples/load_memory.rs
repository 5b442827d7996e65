//! Host memory of loading a FLUX.1-dev-shaped checkpoint (1 double + 1 single
//! block, f32 zeros, 2.3 GB) into a bf16 model on the CPU, through the mapped
//! store (each tensor read as the model takes it) or the copying parser (the
//! whole file read into host tensors first). One process per measurement:
//!
//! ```sh
//! cargo run -p ipaflux --example load_memory -- write /tmp/flux-1-1.safetensors
//! cargo run -p ipaflux --example load_memory -- mapped /tmp/flux-1-1.safetensors
//! cargo run -p ipaflux --example load_memory -- copied /tmp/flux-1-1.safetensors
//! cargo run -p ipaflux --example load_memory -- write-gguf /tmp/flux-1-1.gguf
//! cargo run -p ipaflux --example load_memory -- gguf-kept /tmp/flux-1-1.gguf
//! cargo run -p ipaflux --example load_memory -- gguf-dequantized /tmp/flux-1-1.gguf
//! ```
//!
//! `write-gguf` writes the same model as GGUF, matrices in Q8_0 (zero
//! blocks), vectors in F32; `gguf-kept` loads it with the quantized weights
//! kept as blocks, `gguf-dequantized` converts them to bf16 as they load.
//!
//! Prints the peak of the process's anonymous resident memory during the
//! load (sampled every millisecond: what the load allocates; the mapped
//! file's pages are page cache the kernel can drop), its peak resident set
//! (VmHWM, file pages included) and, with the model loaded, its anonymous
//! and file-backed resident memory (Linux).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::model::canonical_tensors;
use ipaflux_core::flux::{FluxConfig, FluxLoad, FluxModel, GgufWeights};
use ipaflux_core::TensorStore;

fn status(fields: &[&str]) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .filter(|l| fields.iter().any(|f| l.starts_with(f)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// RssAnon in kB.
fn rss_anon_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(path)) = (args.get(1), args.get(2)) else {
        bail!("usage: load_memory write|mapped|copied|write-gguf|gguf-kept|gguf-dequantized FILE");
    };
    let path = Path::new(path);
    let cfg = FluxConfig { depth: 1, depth_single: 1, ..FluxConfig::dev() };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon_kb());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(rss_anon_kb())
        })
    };
    let model = match mode.as_str() {
        "write" => {
            let tensors: HashMap<String, Tensor> = canonical_tensors(&cfg)
                .into_iter()
                .map(|(n, s)| Ok((n, Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu)?)))
                .collect::<Result<_>>()?;
            ipaflux_core::candle_core::safetensors::save(&tensors, path).context("writing")?;
            println!("wrote {}", path.display());
            return Ok(());
        }
        "mapped" => {
            let files = ipaflux::load::load_flux(path)?;
            FluxModel::from_store(files.weights, None, DType::BF16, &Device::Cpu)?
        }
        "write-gguf" => return write_gguf(&cfg, path),
        "gguf-kept" | "gguf-dequantized" => {
            let gguf = if mode == "gguf-kept" { GgufWeights::Quantized } else { GgufWeights::Dequantized };
            let files = ipaflux::load::load_flux(path)?;
            let load = FluxLoad { dtype: DType::BF16, device: &Device::Cpu, streamed: &[], gguf, loras: &[] };
            FluxModel::from_store_with(files.weights, None, &load)?.0
        }
        "copied" => {
            let map = ipaflux::load::map_file(path)?;
            let store = TensorStore::from_safetensors(&map, &path.display().to_string())?;
            drop(map);
            FluxModel::from_store(store, None, DType::BF16, &Device::Cpu)?
        }
        other => bail!("unknown mode {other}"),
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak_anon = sampler.join().map_err(|_| anyhow::anyhow!("sampler thread panicked"))?;
    println!(
        "{mode}: model of {} blocks loaded; peak RssAnon during the load {:.2} GB; now {}",
        model.cfg.num_blocks(),
        peak_anon as f64 * 1024.0 / 1e9,
        status(&["VmHWM", "RssAnon", "RssFile"])
    );
    Ok(())
}

/// Bytes of one Q8_0 block (f16 scale, 32 signed bytes) and its elements.
const Q8_0: (u32, usize, usize) = (8, 34, 32);

/// The model of `cfg` as a GGUF v3 file: matrices as zero Q8_0 blocks, vectors as F32 zeros.
fn write_gguf(cfg: &FluxConfig, path: &Path) -> Result<()> {
    use std::io::Write;
    let tensors = canonical_tensors(cfg);
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend(1u64.to_le_bytes());
    let string = |h: &mut Vec<u8>, s: &str| {
        h.extend((s.len() as u64).to_le_bytes());
        h.extend(s.as_bytes());
    };
    string(&mut header, "general.architecture");
    header.extend(8u32.to_le_bytes());
    string(&mut header, "flux");
    let mut sizes = Vec::new();
    let mut offset = 0u64;
    for (name, shape) in &tensors {
        let (ty, bytes) = match shape.as_slice() {
            [rows, cols] => (Q8_0.0, rows * cols / Q8_0.2 * Q8_0.1),
            _ => (0, shape.iter().product::<usize>() * 4),
        };
        string(&mut header, name);
        header.extend((shape.len() as u32).to_le_bytes());
        shape.iter().rev().for_each(|&d| header.extend((d as u64).to_le_bytes()));
        header.extend(ty.to_le_bytes());
        header.extend(offset.to_le_bytes());
        offset += (bytes as u64).div_ceil(32) * 32;
        sizes.push(bytes);
    }
    header.resize(header.len().div_ceil(32) * 32, 0);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).context("creating")?);
    f.write_all(&header)?;
    for bytes in sizes {
        f.write_all(&vec![0u8; bytes.div_ceil(32) * 32])?;
    }
    f.flush()?;
    println!("wrote {}", path.display());
    Ok(())
}
