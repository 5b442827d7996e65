//! With the `cuda` feature: compiles `src/cuda/attention/attention.cu` to PTX
//! with nvcc (`NVCC`, else `nvcc` on PATH) for `compute_$CUDA_COMPUTE_CAP`
//! (default 90: H100/H200). Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/cuda/attention/attention.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        panic!("cargo did not set OUT_DIR");
    };
    let out = PathBuf::from(out_dir).join("attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
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
