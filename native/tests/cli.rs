#![allow(clippy::unwrap_used)]
//! The `ipaflux` binary on good and bad input: every failure is one clear
//! message naming the file and the problem, a non-zero exit, and no panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ipaflux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn encode(siglip: &PathBuf, adapter: &PathBuf, image: &PathBuf, out: &PathBuf) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .arg("encode")
        .arg("--siglip")
        .arg(siglip)
        .arg("--ip-adapter")
        .arg(adapter)
        .arg("--image")
        .arg(image)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Asserts a clean failure whose stderr mentions every needle.
fn assert_fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

fn good() -> (PathBuf, PathBuf, PathBuf) {
    (fixture("siglip-vision"), fixture("ip-adapter.bin"), fixture("images/wide.png"))
}

#[test]
fn encode_writes_f32_embeddings() {
    let (s, a, i) = good();
    let out_path = tmp("ok.safetensors");
    let out = encode(&s, &a, &i, &out_path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("siglip") && err.contains("projection") && err.contains(" ms"), "stage times missing: {err}");
    let t = ipaflux_core::candle_core::safetensors::load(&out_path, &ipaflux_core::candle_core::Device::Cpu).unwrap();
    assert_eq!(t["pooled"].dims(), &[1, 32]);
    assert_eq!(t["image_prompt_embeds"].dims(), &[1, 8, 64]);
    assert_eq!(t["pooled"].dtype(), ipaflux_core::candle_core::DType::F32);
}

#[test]
fn missing_file() {
    let (s, a, _) = good();
    let img = fixture("images/does-not-exist.png");
    assert_fails(&encode(&s, &a, &img, &tmp("x.safetensors")), &["does-not-exist.png"]);
    assert_fails(
        &encode(&fixture("nope"), &a, &fixture("images/wide.png"), &tmp("x.safetensors")),
        &["nope", "no such folder"],
    );
}

#[test]
fn truncated_safetensors() {
    let (_, _, i) = good();
    let bytes = std::fs::read(fixture("ip-adapter.safetensors")).unwrap();
    let cut = tmp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        &encode(&fixture("siglip-vision"), &cut, &i, &tmp("x.safetensors")),
        &["cut.safetensors", "safetensors"],
    );
    // A corrupt header is reported too.
    let mut bad = bytes.clone();
    bad[10] = b'!';
    std::fs::write(&cut, &bad).unwrap();
    assert_fails(&encode(&fixture("siglip-vision"), &cut, &i, &tmp("x.safetensors")), &["cut.safetensors"]);
}

#[test]
fn truncated_torch_zip() {
    let (s, _, i) = good();
    let bytes = std::fs::read(fixture("ip-adapter.bin")).unwrap();
    let cut = tmp("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(&encode(&s, &cut, &i, &tmp("x.safetensors")), &["cut.bin"]);
}

#[test]
fn malicious_pickle_is_refused_and_nothing_runs() {
    let marker = PathBuf::from("/tmp/ipaflux-pickle-executed");
    let _ = std::fs::remove_file(&marker);
    let (s, _, i) = good();
    let out = encode(&s, &fixture("evil.bin"), &i, &tmp("x.safetensors"));
    assert_fails(&out, &["evil.bin", "refused", "posix.system"]);
    assert!(!marker.exists(), "the pickle's payload ran");
}

#[test]
fn wrong_shapes_listed_in_one_error() {
    let (s, _, i) = good();
    let out = encode(&s, &fixture("ip-adapter-bad-shapes.safetensors"), &i, &tmp("x.safetensors"));
    assert_fails(
        &out,
        &[
            "ip-adapter-bad-shapes.safetensors",
            "3 problem(s)",
            "missing tensor `ip_adapter.3.to_k_ip.weight`",
            "`ip_adapter.1.to_v_ip.weight` has shape [48, 65], expected [48, 64]",
            "unexpected tensor `ip_adapter.0.extra.weight`",
        ],
    );
}

#[test]
fn non_image_zero_sized_and_huge_images() {
    let (s, a, _) = good();
    assert_fails(
        &encode(&s, &a, &fixture("images/not-an-image.png"), &tmp("x.safetensors")),
        &["not-an-image.png", "not a PNG"],
    );
    let empty = tmp("empty.png");
    std::fs::write(&empty, b"").unwrap();
    assert_fails(&encode(&s, &a, &empty, &tmp("x.safetensors")), &["empty.png", "empty"]);
    // A real PNG header declaring 9000×9000 (81 MP): refused before decoding.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(9000u32.to_be_bytes());
    ihdr.extend(9000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png.extend([0, 0, 0, 0]);
    png.extend(b"IDAT");
    png.extend(crc32(b"IDAT").to_be_bytes());
    let huge = tmp("huge.png");
    std::fs::write(&huge, &png).unwrap();
    assert_fails(&encode(&s, &a, &huge, &tmp("x.safetensors")), &["huge.png", "megapixels"]);
}

#[test]
fn unknown_device_and_dtype() {
    let (s, a, i) = good();
    let out = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["encode", "--dtype", "f64", "--siglip"])
        .arg(&s)
        .arg("--ip-adapter")
        .arg(&a)
        .arg("--image")
        .arg(&i)
        .arg("--out")
        .arg(tmp("x.safetensors"))
        .output()
        .unwrap();
    assert_fails(&out, &["f64"]);
}

#[test]
fn demo_runs() {
    let out = Command::new(env!("CARGO_BIN_EXE_ipaflux")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("image_prompt_embeds") && stdout.contains("[1, 8, 64]"), "{stdout}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}
