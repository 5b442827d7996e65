//! With the `cuda` feature: compiles our kernels (`src/cuda/*/<name>.cu`) to
//! PTX with nvcc (`NVCC`, else `nvcc` on PATH) for `compute_$CUDA_COMPUTE_CAP`
//! (default 90: H100/H200), as `$OUT_DIR/<name>.ptx`; for compute capability
//! 90 also attention's `wgmma` version alone for `compute_90a`
//! (`attention_wgmma.ptx`; empty for other capabilities, where that version
//! does not exist). Without the feature: nothing.

use std::path::PathBuf;
use std::process::Command;

/// The attention kernels' source (also built a second time for `wgmma`).
const ATTENTION: &str = "src/cuda/attention/attention.cu";

/// A header both kernel sources include.
const SHARED_HEADER: &str = "src/cuda/store16.cuh";

/// Our kernels: (source, PTX file name).
const KERNELS: [(&str, &str); 3] = [
    (ATTENTION, "attention.ptx"),
    ("src/cuda/modulation/modulation.cu", "modulation.ptx"),
    ("src/cuda/ip_term/ip_term.cu", "ip_term.ptx"),
];

fn main() {
    for (source, _) in KERNELS {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed={SHARED_HEADER}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        panic!("cargo did not set OUT_DIR");
    };
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for (source, ptx) in KERNELS {
        compile(&nvcc, &format!("compute_{cap}"), &[], source, &PathBuf::from(&out_dir).join(ptx));
    }
    // `wgmma` is Hopper's alone, in the architecture-specific target.
    let wgmma = PathBuf::from(&out_dir).join("attention_wgmma.ptx");
    if cap == "90" {
        compile(&nvcc, "compute_90a", &["-DIPAFLUX_WGMMA_ONLY"], ATTENTION, &wgmma);
    } else if let Err(e) = std::fs::write(&wgmma, "") {
        panic!("cannot write {}: {e}", wgmma.display());
    }
}

fn compile(nvcc: &str, arch: &str, defines: &[&str], source: &str, out: &std::path::Path) {
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", &format!("-arch={arch}")])
        .args(defines)
        .arg("-o")
        .arg(out)
        .arg(source)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {source} ({s})"),
        Err(e) => panic!(
            "cannot run {nvcc} for the `cuda` feature ({e}); put CUDA 13.0's nvcc on PATH (scripts/cuda-env.sh installs one)"
        ),
    }
}
