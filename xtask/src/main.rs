//! Project automation.
//!
//! - `cargo xtask test`: every check CI runs — installs the wasm32 target if
//!   missing, runs the lint (below, which also builds core, gpu and web for
//!   wasm32-unknown-unknown) and all workspace tests.
//!   Then, where Chromium, chromedriver, wasm-bindgen-cli and node exist (CI
//!   requires them), `web` and `web-test`.
//! - `cargo xtask lint`: clippy with warnings as errors, and rustfmt check.
//! - `cargo xtask web [--dev]`: builds `www/pkg` (wasm + JS bindings) and `www/assets`.
//! - `cargo xtask web-test`: wasm-bindgen tests in headless Chromium, then the
//!   page tests (`www/tests/pages.mjs`, playwright-core).
//! - `cargo xtask serve [PORT]`: serves `www/` locally (default port 8000).
//! - `cargo xtask cuda-check`: clippy on `ipaflux --features cuda`, with nvcc
//!   13.0 from PyPI (`scripts/cuda-env.sh`); no GPU needed; ~16 min on 2 cores.
//!   Then `scripts/kernel-emulation.sh`: our elementwise CUDA kernels run on the
//!   host (each CUDA thread a std::thread) against references (~10 s).
//! - `cargo xtask fixtures`: regenerates tests/fixtures with the PyTorch reference
//!   (needs `pip install torch transformers diffusers peft safetensors pillow gguf opencv-python-headless`; `PYTHON` picks the interpreter;
//!   `DEPTH_ANYTHING_V2`, a checkout of that repository, for the original Depth Anything goldens).

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

/// Ends with one plain `tests: N passed, N failed` line summed over every test
/// binary and browser test (cargo's own last line is that of the last doc-test
/// binary, often `0 passed`).
fn finish_summary(passed: u64, failed: u64, ok: bool) {
    println!("tests: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        exit(1);
    }
}

/// Runs `program args` echoing its output; counts cargo's `test result:` lines
/// and the page tests' `ok`/`FAIL` lines. Returns (passed, failed, exit ok).
fn counted(program: &str, args: &[&str], env: &[(&str, &str)]) -> (u64, u64, bool) {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: $ {program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("xtask: cannot start {program}: {e}");
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
            } else if line.starts_with("ok   ") {
                passed += 1;
            } else if line.starts_with("FAIL ") {
                failed += 1;
            }
        }
    }
    let status = child.wait().unwrap_or_else(|e| {
        eprintln!("xtask: {program} did not finish: {e}");
        exit(2)
    });
    (passed, failed, status.success())
}

/// rustfmt and clippy (warnings are errors; library code may not unwrap),
/// natively and for wasm32 (core, gpu, web: this also checks that core builds
/// for wasm32).
fn lint(cargo: &str) {
    ensure_wasm_target();
    run(cargo, &["fmt", "--all", "--check"]);
    run(cargo, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    let wasm = ["clippy", "-p", "ipaflux-core", "-p", "ipaflux-gpu", "-p", "ipaflux-web"];
    let rest = ["--target", "wasm32-unknown-unknown", "--lib", "--tests", "--", "-D", "warnings"];
    run(cargo, &[&wasm[..], &rest[..]].concat());
}

/// `cargo xtask cuda-check`: the `cuda` feature compiles (candle's kernels to PTX
/// with nvcc from PyPI, all our CUDA code under clippy) on a machine without a
/// GPU. Not linked, not run. Not part of `test` (candle's kernels alone take
/// about 16 minutes on 2 cores); CI runs it after `test` (`.ci/run`).
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
    // The elementwise kernels run on the host against their references (no GPU).
    run("bash", &["scripts/kernel-emulation.sh", &cu13]);
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

/// `cargo xtask web`: the wasm module (release, simd128) bound with
/// wasm-bindgen-cli into `www/pkg/`, and the bundled sample model, image and
/// golden embedding into `www/assets/`.
///
/// `release: false` (what `test` uses) builds with the dev profile, sharing the
/// dependencies the wasm-bindgen tests compile anyway (deps are optimised in
/// both profiles; the module is larger, with debug info).
fn build_web(cargo: &str, release: bool) {
    ensure_wasm_target();
    let mut args = vec!["build", "-p", "ipaflux-web", "--target", "wasm32-unknown-unknown"];
    if release {
        args.push("--release");
    }
    run(cargo, &args);
    let wasm = format!("target/wasm32-unknown-unknown/{}/ipaflux_web.wasm", if release { "release" } else { "debug" });
    run("wasm-bindgen", &["--target", "web", "--out-dir", "www/pkg", &wasm]);
    let copies = [
        ("tests/fixtures/siglip-vision/config.json", "www/assets/siglip/config.json"),
        ("tests/fixtures/siglip-vision/model.safetensors", "www/assets/siglip/model.safetensors"),
        ("tests/fixtures/ip-adapter.safetensors", "www/assets/ip-adapter.safetensors"),
        ("tests/fixtures/images/photo.jpg", "www/assets/photo.jpg"),
    ];
    for (from, to) in copies {
        let ok = std::path::Path::new(to).parent().map(std::fs::create_dir_all).transpose().is_ok()
            && std::fs::copy(from, to).is_ok();
        if !ok {
            eprintln!("xtask: cannot copy {from} to {to}");
            exit(1);
        }
    }
    match golden_pooled() {
        Ok(json) if std::fs::write("www/assets/golden-pooled.json", &json).is_ok() => {}
        other => {
            eprintln!("xtask: cannot write www/assets/golden-pooled.json: {:?}", other.err());
            exit(1);
        }
    }
    eprintln!("xtask: www/ is ready; `cargo xtask serve` serves it on http://127.0.0.1:8000/");
}

/// The golden pooled embedding of photo.jpg as a JSON array (read from the
/// f32 tensor in tests/fixtures/golden.safetensors).
fn golden_pooled() -> Result<String, String> {
    let bytes = std::fs::read("tests/fixtures/golden.safetensors").map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("short file")?) as usize;
    let header = std::str::from_utf8(bytes.get(8..8 + n).ok_or("short header")?).map_err(|e| e.to_string())?;
    let key = "\"pooled.photo_jpg\":";
    let at = header.find(key).ok_or("no pooled.photo_jpg")?;
    let offsets = &header[at..];
    let o = offsets.find("\"data_offsets\":[").ok_or("no data_offsets")? + 16;
    let end = offsets[o..].find(']').ok_or("bad offsets")? + o;
    let nums: Vec<usize> = offsets[o..end].split(',').filter_map(|v| v.trim().parse().ok()).collect();
    let [a, b] = nums[..] else { return Err("bad offsets".into()) };
    let data = bytes.get(8 + n + a..8 + n + b).ok_or("short data")?;
    let vals: Vec<String> =
        data.chunks_exact(4).map(|c| format!("{}", f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
    Ok(format!("[{}]", vals.join(",")))
}

/// `cargo xtask serve [PORT]`: serves www/ (static files, `.wasm` as
/// application/wasm) on 127.0.0.1.
fn serve(port: &str) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(format!("127.0.0.1:{port}")).unwrap_or_else(|e| {
        eprintln!("xtask: cannot listen on 127.0.0.1:{port}: {e}");
        exit(2)
    });
    if !std::path::Path::new("www/pkg/ipaflux_web.js").exists() {
        eprintln!("xtask: www/pkg is missing; run `cargo xtask web` first");
    }
    eprintln!("xtask: serving www/ on http://127.0.0.1:{port}/ (Ctrl-C to stop)");
    for stream in listener.incoming().map_while(Result::ok) {
        let mut stream = stream;
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_string();
        let rel = if path == "/" { "index.html".to_string() } else { path.trim_start_matches('/').to_string() };
        let body = if rel.split('/').any(|p| p == "..") { None } else { std::fs::read(format!("www/{rel}")).ok() };
        let kind = match rel.rsplit('.').next() {
            Some("html") => "text/html",
            Some("js" | "mjs") => "text/javascript",
            Some("css") => "text/css",
            Some("wasm") => "application/wasm",
            Some("json") => "application/json",
            Some("jpg") => "image/jpeg",
            Some("png") => "image/png",
            _ => "application/octet-stream",
        };
        let _ = match body {
            Some(b) => stream
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        b.len()
                    )
                    .as_bytes(),
                )
                .and_then(|_| stream.write_all(&b)),
            None => stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
        };
    }
}

/// `cargo xtask web-test`: the wasm-bindgen tests in headless Chromium (WebGPU
/// through SwiftShader, and the CPU fallback), then the page tests
/// (playwright-core) on `www/` as built (a dev build is made when `www/pkg` is
/// missing, and always on CI). Returns (passed, failed, ok).
fn web_test(cargo: &str) -> (u64, u64, bool) {
    let env = [
        ("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", "wasm-bindgen-test-runner"),
        ("CHROMEDRIVER", "/usr/bin/chromedriver"),
        ("WASM_BINDGEN_TEST_TIMEOUT", "600"),
    ];
    let (p1, f1, ok1) = counted(cargo, &["test", "-p", "ipaflux-web", "--target", "wasm32-unknown-unknown"], &env);
    if !std::path::Path::new("www/pkg/ipaflux_web.js").exists() || std::env::var_os("CI").is_some() {
        build_web(cargo, false);
    }
    if !std::path::Path::new("www/tests/node_modules/playwright-core").exists() {
        run("npm", &["install", "--prefix", "www/tests", "--no-audit", "--no-fund"]);
    }
    let (p2, f2, ok2) = counted("node", &["www/tests/pages.mjs"], &[]);
    (p1 + p2, f1 + f2, ok1 && ok2)
}

/// Whether this machine can run the browser tests (Chromium, its driver,
/// wasm-bindgen-cli, node). CI must: `.ci/run` installs them all.
fn browser_tools_present() -> bool {
    ["/usr/bin/chromium", "/usr/bin/chromedriver"].iter().all(|p| std::path::Path::new(p).exists())
        && ["wasm-bindgen", "wasm-bindgen-test-runner", "node", "npm"]
            .iter()
            .all(|t| Command::new(t).arg("--version").output().is_ok())
}

fn main() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "test" => {
            ensure_wasm_target();
            lint(&cargo);
            let (mut passed, mut failed, mut ok) = counted(&cargo, &["test", "--workspace", "--exclude", "xtask"], &[]);
            if browser_tools_present() {
                let (p, f, o) = web_test(&cargo);
                (passed, failed, ok) = (passed + p, failed + f, ok && o);
            } else if std::env::var_os("CI").is_some() {
                eprintln!(
                    "xtask: CI without the browser tools (chromium, chromedriver, wasm-bindgen-cli 0.2.130, node)"
                );
                exit(1);
            } else {
                eprintln!(
                    "xtask: SKIPPING the browser tests: chromium, chromedriver, wasm-bindgen-cli or node missing"
                );
            }
            finish_summary(passed, failed, ok);
        }
        "web" => build_web(&cargo, !std::env::args().any(|a| a == "--dev")),
        "web-test" => {
            let (p, f, ok) = web_test(&cargo);
            finish_summary(p, f, ok);
        }
        "serve" => serve(&std::env::args().nth(2).unwrap_or_else(|| "8000".into())),
        "lint" => lint(&cargo),
        "cuda-check" => cuda_lint(&cargo),
        "fixtures" => {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            run(&python, &["tests/reference/make_fixtures.py"]);
            run(&python, &["tests/reference/make_jpeg_fixtures.py"]);
            run(&python, &["tests/reference/make_schedule_fixtures.py"]);
            run(&python, &["tests/reference/make_flux_fixtures.py"]);
            run(&python, &["tests/reference/make_lora_fixtures.py"]);
            run(&python, &["tests/reference/make_pipeline_fixtures.py"]);
            run(&python, &["tests/reference/make_vae_fixtures.py"]);
            run(&python, &["tests/reference/make_img2img_fixtures.py"]);
            run(&python, &["tests/reference/make_cfg_fixtures.py"]);
            run(&python, &["tests/reference/make_redux_fixtures.py"]);
            run(&python, &["tests/reference/make_inpaint_fixtures.py"]);
            run(&python, &["tests/reference/make_fill_fixtures.py"]);
            run(&python, &["tests/reference/make_kontext_fixtures.py"]);
            run(&python, &["tests/reference/make_kontext_inpaint_fixtures.py"]);
            run(&python, &["tests/reference/make_control_fixtures.py"]);
            run(&python, &["tests/reference/make_controlnet_fixtures.py"]);
            run(&python, &["tests/reference/make_multi_controlnet_fixtures.py"]);
            run(&python, &["tests/reference/make_canny_fixtures.py"]);
            run(&python, &["tests/reference/make_depth_fixtures.py"]);
            // Its goldens come from a repository not on PyPI: a checkout must be given.
            if std::env::var_os("DEPTH_ANYTHING_V2").is_some() {
                run(&python, &["tests/reference/make_depth_original_fixtures.py"]);
            } else {
                eprintln!(
                    "xtask: skipping make_depth_original_fixtures.py: set DEPTH_ANYTHING_V2 to a checkout of \
                     github.com/DepthAnything/Depth-Anything-V2"
                );
            }
            run(&python, &["tests/reference/make_xlabs_fixtures.py"]);
            run(&python, &["tests/reference/make_kontext_ip_fixtures.py"]);
            run(&python, &["tests/reference/make_img2img_ip_fixtures.py"]);
            run(&python, &["tests/reference/make_controlnet_ip_fixtures.py"]);
            run(&python, &["tests/reference/make_ip_cfg_fixtures.py"]);
            run(&python, &["tests/reference/make_gguf_fixtures.py"]);
        }
        _ => {
            eprintln!("usage: cargo xtask <test|lint|web|web-test|serve [PORT]|cuda-check|fixtures>");
            exit(2);
        }
    }
}
