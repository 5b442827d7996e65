//! Project automation.
//!
//! - `cargo xtask test`: every check CI runs — installs the wasm32 target if
//!   missing, builds `ipaflux-core` for wasm32-unknown-unknown, runs the lint
//!   (below) and all workspace tests.
//! - `cargo xtask lint`: clippy with warnings as errors, and rustfmt check.
//! - `cargo xtask cuda-check`: clippy on `ipaflux --features cuda`, with nvcc
//!   13.0 from PyPI (`scripts/cuda-env.sh`); no GPU needed; ~16 min on 2 cores.
//! - `cargo xtask fixtures`: regenerates tests/fixtures with the PyTorch reference
//!   (needs `pip install torch transformers diffusers safetensors pillow`; `PYTHON` picks the interpreter).

use std::process::{exit, Command};

fn run(program: &str, args: &[&str]) {
    eprintln!("xtask: $ {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status().unwrap_or_else(|e| {
        eprintln!("xtask: cannot start {program}: {e}");
        exit(2)
    });
    if !status.success() {
        eprintln!("xtask: `{program} {}` failed ({status})", args.join(" "));
        exit(status.code().unwrap_or(1));
    }
}

/// Runs the workspace tests, echoing their output, and ends with one plain
/// `tests: N passed, N failed` line summed over every test binary (cargo's own
/// last line is that of the last doc-test binary, often `0 passed`).
fn test_with_summary(cargo: &str) {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: $ {cargo} test --workspace --exclude xtask");
    let mut child = Command::new(cargo)
        .args(["test", "--workspace", "--exclude", "xtask"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("xtask: cannot start cargo: {e}");
            exit(2)
        });
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0)
                };
                passed += count(" passed");
                failed += count(" failed");
            }
        }
    }
    let status = child.wait().unwrap_or_else(|e| {
        eprintln!("xtask: cargo test did not finish: {e}");
        exit(2)
    });
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        exit(status.code().unwrap_or(1).max(1));
    }
}

/// rustfmt and clippy (warnings are errors; library code may not unwrap).
fn lint(cargo: &str) {
    run(cargo, &["fmt", "--all", "--check"]);
    run(cargo, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
}

/// `cargo xtask cuda-check`: the `cuda` feature compiles (candle's kernels to PTX
/// with nvcc from PyPI, all our CUDA code under clippy) on a machine without a
/// GPU. Not linked, not run. Not part of `test`: candle's kernels alone take
/// about 16 minutes on 2 cores.
fn cuda_lint(cargo: &str) {
    let env = Command::new("bash").arg("scripts/cuda-env.sh").output();
    let cu13 = match env {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).to_string(),
                Err(e) => e.to_string(),
            };
            if std::env::var_os("CI").is_some() {
                eprintln!("xtask: cannot set up nvcc for the `cuda` feature check: {why}");
                exit(1);
            }
            eprintln!("xtask: SKIPPING the `cuda` feature check (no nvcc; scripts/cuda-env.sh failed): {why}");
            return;
        }
    };
    let path = format!("{cu13}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let args = ["clippy", "-p", "ipaflux", "--features", "cuda", "--all-targets", "--", "-D", "warnings"];
    eprintln!("xtask: $ CUDA_COMPUTE_CAP={cap} PATH={cu13}/bin:$PATH {cargo} {}", args.join(" "));
    let status = Command::new(cargo).args(args).env("PATH", path).env("CUDA_COMPUTE_CAP", cap).status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("xtask: the `cuda` feature does not compile ({s})");
            exit(s.code().unwrap_or(1));
        }
        Err(e) => {
            eprintln!("xtask: cannot start {cargo}: {e}");
            exit(2);
        }
    }
}

fn ensure_wasm_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-unknown-unknown"))
        .unwrap_or(false);
    if !installed {
        run("rustup", &["target", "add", "wasm32-unknown-unknown"]);
    }
}

fn main() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "test" => {
            ensure_wasm_target();
            run(&cargo, &["build", "-p", "ipaflux-core", "--target", "wasm32-unknown-unknown"]);
            lint(&cargo);
            test_with_summary(&cargo);
        }
        "lint" => lint(&cargo),
        "cuda-check" => cuda_lint(&cargo),
        "fixtures" => {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(&python, &["tests/reference/make_fixtures.py"]);
            run(&python, &["tests/reference/make_jpeg_fixtures.py"]);
            run(&python, &["tests/reference/make_schedule_fixtures.py"]);
            run(&python, &["tests/reference/make_flux_fixtures.py"]);
            run(&python, &["tests/reference/make_pipeline_fixtures.py"]);
        }
        _ => {
            eprintln!("usage: cargo xtask <test|lint|cuda-check|fixtures>");
            exit(2);
        }
    }
}
