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
fn demo_runs_the_whole_pipeline_and_is_byte_identical() {
    let run = |name: &str| {
        let path = tmp(name);
        let out = Command::new(env!("CARGO_BIN_EXE_ipaflux")).arg("demo").arg("--out").arg(&path).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (stdout, std::fs::read(&path).unwrap())
    };
    let (stdout, a) = run("demo-a.png");
    for needle in ["timeline", "register", "release", "flux", "ip-kv-cache", "sampling", "vae decode", "128×128"] {
        assert!(stdout.contains(needle), "demo output lacks `{needle}`: {stdout}");
    }
    assert!(a.starts_with(b"\x89PNG") && a.windows(10).any(|w| w == b"parameters"), "no PNG with parameters");
    let (_, b) = run("demo-b.png");
    assert!(a == b, "the demo PNG differs between runs");
}

/// `ipaflux generate` on the tiny fixtures (diffusers-layout Flux folder, HF-style text encoder folders).
fn generate(extra: &[&str], out: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(generate_args(extra, out)).output().unwrap()
}

/// [`generate`]'s arguments.
fn generate_args(extra: &[&str], out: &std::path::Path) -> Vec<String> {
    let f = |r: &str| fixture(r).display().to_string();
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--flux".into(),
        f("flux/transformer"),
        "--t5".into(),
        f("pipeline/t5"),
        "--clip".into(),
        f("pipeline/clip"),
        "--vae".into(),
        f("pipeline/ae.safetensors"),
        "--ip-adapter".into(),
        f("ip-adapter.bin"),
        "--siglip".into(),
        f("siglip-vision"),
        "--prompt".into(),
        "a cat".into(),
        "--width".into(),
        "64".into(),
        "--height".into(),
        "48".into(),
        "--steps".into(),
        "2".into(),
        "--t5-max-len".into(),
        "16".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    // An option given in `extra` replaces the default above; others are appended.
    let base = args.len();
    let mut extra = extra.iter().map(|s| s.to_string()).peekable();
    while let Some(a) = extra.next() {
        match args[..base].iter().position(|x| *x == a) {
            Some(i) if a.starts_with("--") && extra.peek().is_some() => args[i + 1] = extra.next().unwrap(),
            _ => args.push(a),
        }
    }
    args
}

#[test]
fn generate_with_images_and_with_embeds() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let wide = fixture("images/wide.png").display().to_string();
    let out1 = tmp("gen-two-images.png");
    let o = generate(&["--image", &photo, "--image", &wide, "--ip-weight", "0.8,0.4", "--verbose"], &out1);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("timeline"));
    let png = std::fs::read(&out1).unwrap();
    assert!(png.windows(10).any(|w| w == b"\"weight\":0"), "parameters chunk lacks the weights");

    // Embeddings from `ipaflux encode` give the same image as the image itself.
    let emb = tmp("gen-photo.safetensors");
    let e = encode(&fixture("siglip-vision"), &fixture("ip-adapter.bin"), &fixture("images/photo.jpg"), &emb);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let (a, b) = (tmp("gen-from-image.png"), tmp("gen-from-embeds.png"));
    assert!(generate(&["--image", &photo], &a).status.success());
    let o = generate(&["--embeds", &emb.display().to_string()], &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pixels = |p: &PathBuf| {
        let d = png_pixels(&std::fs::read(p).unwrap());
        assert_eq!(d.len(), 64 * 48 * 3);
        d
    };
    assert_eq!(pixels(&a), pixels(&b), "--embeds and --image differ");
    // A different reference changes the picture.
    assert_ne!(pixels(&a), pixels(&out1));
}

#[test]
fn generate_in_f16_runs_t5_in_bf16_and_stays_near_f32() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (a, b) = (tmp("gen-f32.png"), tmp("gen-f16.png"));
    let o = generate(&["--image", &photo], &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = generate(&["--image", &photo, "--dtype", "f16"], &b);
    assert!(o.status.success(), "f16 failed: {}", String::from_utf8_lossy(&o.stderr));
    let (pa, pb) = (png_pixels(&std::fs::read(&a).unwrap()), png_pixels(&std::fs::read(&b).unwrap()));
    let max = pa.iter().zip(&pb).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    // Half precision through every model of the tiny pipeline: a few levels, not noise.
    assert!(max <= 12, "f16 vs f32: max |diff| {max}/255");
    // bf16 on the CPU: the VAE (both halves), CLIP's vision tower and Depth Anything
    // build in f32 there (candle's CPU convolutions have no bf16 path); all of them run.
    let f = |r: &str| fixture(r).display().to_string();
    let bf16 = [
        "--dtype",
        "bf16",
        "--flux",
        &f("control/transformer"),
        "--vae",
        &f("img2img/ae.safetensors"),
        "--init-image",
        &f("img2img/init.png"),
        "--control-image",
        &photo,
        "--control-depth",
        &f("depth/model"),
        "--ip-adapter",
        &f("xlabs/ip_adapter.safetensors"),
        "--clip-vision",
        &f("xlabs/image_encoder"),
    ];
    let o = generate(&[&bf16[..], &["--image", &photo]].concat(), &b);
    assert!(o.status.success(), "bf16 failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn generate_applies_loras_and_refuses_bad_ones_before_any_work() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (plain, with, zero) = (tmp("gen-lora-none.png"), tmp("gen-lora.png"), tmp("gen-lora-zero.png"));
    let kohya = fixture("flux/lora-kohya.safetensors").display().to_string();
    let peft = fixture("flux/lora-peft.safetensors").display().to_string();
    assert!(generate(&["--image", &photo], &plain).status.success());
    let o = generate(&["--image", &photo, "--lora", &format!("{kohya}:0.8"), "--lora", &peft], &with);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("lora-kohya.safetensors: 30 modules on 30 Flux weights, strength 0.8"), "{err}");
    assert!(err.contains("text encoders: 4 CLIP and 4 T5 modules, strength 0.8"), "{err}");
    let png = std::fs::read(&with).unwrap();
    assert!(png.windows(10).any(|w| w == b"\"loras\":[{"), "parameters chunk lacks the LoRAs");
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    assert_ne!(pixels(&with), pixels(&plain), "the LoRAs changed nothing");
    // Strength 0 is no LoRA, to the byte; the text encoders' part alone changes the picture.
    assert!(generate(&["--image", &photo, "--lora", &format!("{kohya}:0")], &zero).status.success());
    assert_eq!(pixels(&zero), pixels(&plain));
    let text_only = tmp("gen-lora-text.png");
    let o = generate(&["--image", &photo, "--lora", &format!("{kohya}:0:1")], &text_only);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(pixels(&text_only), pixels(&plain), "the text encoders' LoRA changed nothing");
    // Not a LoRA, a strength out of range: one message, before any model runs.
    let flux = fixture("flux/flux-tiny-bfl.safetensors").display().to_string();
    let o = generate(&["--image", &photo, "--lora", &flux], &zero);
    assert_fails(&o, &["flux-tiny-bfl.safetensors", "not a usable Flux LoRA"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("sampling"), "failed late");
    assert_fails(&generate(&["--image", &photo, "--lora", &format!("{kohya}:1000")], &zero), &["outside -100..100"]);
}

#[test]
fn a_batch_makes_the_images_of_its_seeds_one_by_one() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (five, six, batch) = (tmp("gen-seed5.png"), tmp("gen-seed6.png"), tmp("gen-batch.png"));
    assert!(generate(&["--image", &photo, "--seed", "5"], &five).status.success());
    assert!(generate(&["--image", &photo, "--seed", "6"], &six).status.success());
    let o = generate(&["--image", &photo, "--seed", "5", "--batch", "2"], &batch);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("wrote 2 images") && err.contains("seeds 5..=6"), "{err}");
    assert!(!batch.exists(), "a batch writes STEM-SEED.png, not --out itself");
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let (b5, b6) = (tmp("gen-batch-5.png"), tmp("gen-batch-6.png"));
    assert_eq!(pixels(&b5), pixels(&five), "image 0 of the batch is not the seed-5 image");
    assert_eq!(pixels(&b6), pixels(&six), "image 1 of the batch is not the seed-6 image");
    assert_ne!(pixels(&b5), pixels(&b6));
    let png = std::fs::read(&b6).unwrap();
    assert!(png.windows(8).any(|w| w == b"\"seed\":6"), "the PNG's parameters carry its own seed");
    assert_fails(&generate(&["--image", &photo, "--batch", "0"], &batch), &["batch 0 is outside 1..=1024"]);
}

#[test]
fn generate_takes_a_diffusers_vae_folder() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (ae, diffusers) = (tmp("gen-vae-ae.png"), tmp("gen-vae-diffusers.png"));
    assert!(generate(&["--image", &photo], &ae).status.success());
    let o = generate(&["--image", &photo, "--vae", &fixture("pipeline/vae").display().to_string()], &diffusers);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    assert_eq!(pixels(&ae), pixels(&diffusers), "the two VAE layouts decode differently");
    let o = generate(&["--image", &photo, "--vae", &fixture("siglip-vision").display().to_string()], &diffusers);
    assert_fails(&o, &["no ae.safetensors here, nor a diffusers VAE"]);
}

#[test]
fn generate_from_an_init_image() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (init, vae) = (fixture("img2img/init.png").display().to_string(), fixture("img2img/ae.safetensors"));
    let vae = vae.display().to_string();
    let (plain, full, half) = (tmp("gen-i2i-plain.png"), tmp("gen-i2i-1.png"), tmp("gen-i2i-half.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["--image", &photo, "--vae", &vae, "--steps", "4"], &plain);
    // Strength 1 starts from pure noise at σ = 1: the text-to-image picture, exactly.
    run(&["--image", &photo, "--vae", &vae, "--steps", "4", "--init-image", &init, "--strength", "1"], &full);
    assert_eq!(pixels(&plain), pixels(&full), "strength 1 must ignore the init image");
    // Half: 2 of 4 steps from the (resized) init image; another picture, and the PNG says so.
    run(&["--image", &photo, "--vae", &vae, "--steps", "4", "--init-image", &init, "--strength", "0.5"], &half);
    assert_ne!(pixels(&plain), pixels(&half));
    let png = String::from_utf8_lossy(&std::fs::read(&half).unwrap()).into_owned();
    assert!(png.contains("\"init_image\":{") && png.contains("\"strength\":0.5"), "the PNG's parameters");
    // Without --width/--height the output takes the init image's size (96×64).
    let mut args = generate_args(&["--image", &photo, "--vae", &vae, "--init-image", &init], &half);
    for flag in ["--width", "--height"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = png::Decoder::new(std::io::Cursor::new(std::fs::read(&half).unwrap())).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (96, 64));
    // Refused before any model runs: a decoder-only VAE, a strength out of range, a strength alone.
    let o = generate(&["--image", &photo, "--init-image", &init], &half);
    assert_fails(&o, &["has only the decoder", "ae.safetensors"]);
    let o = generate(&["--image", &photo, "--vae", &vae, "--init-image", &init, "--strength", "0"], &half);
    assert_fails(&o, &["strength 0 is outside (0, 1]"]);
    assert_fails(&generate(&["--image", &photo, "--strength", "0.5"], &half), &["--init-image"]);
    let o = generate(
        &["--image", &photo, "--vae", &vae, "--init-image", &fixture("reference.json").display().to_string()],
        &half,
    );
    assert_fails(&o, &["reference.json"]);
}

#[test]
fn generate_inpaints_with_a_mask() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (init, vae) = (fixture("img2img/init.png").display().to_string(), fixture("img2img/ae.safetensors"));
    let (vae, mask) = (vae.display().to_string(), fixture("inpaint/mask.png").display().to_string());
    let (free, painted) = (tmp("gen-inpaint-free.png"), tmp("gen-inpaint.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let base = ["--image", &photo, "--vae", &vae, "--init-image", &init, "--steps", "4"];
    run(&base, &free);
    run(&[&base[..], &["--mask", &mask]].concat(), &painted);
    assert_ne!(pixels(&free), pixels(&painted), "the mask changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&painted).unwrap()).into_owned();
    assert!(png.contains("\"mask\":\"") && png.contains("mask.png"), "the PNG's parameters name the mask");
    // An all-black mask keeps everything: the final latents are the init image's, whatever the
    // strength and seed, so two such runs give the same pixels.
    let black = tmp("black-mask.png");
    let file = std::fs::File::create(&black).unwrap();
    let mut enc = png::Encoder::new(file, 64, 48);
    enc.set_color(png::ColorType::Grayscale);
    enc.write_header().unwrap().write_image_data(&[0u8; 64 * 48]).unwrap();
    let black = black.display().to_string();
    let (a, b) = (tmp("gen-keep-a.png"), tmp("gen-keep-b.png"));
    run(&[&base[..], &["--mask", &black, "--strength", "1"]].concat(), &a);
    run(&[&base[..], &["--mask", &black, "--strength", "0.5", "--seed", "9"]].concat(), &b);
    assert_eq!(pixels(&a), pixels(&b), "an all-black mask must keep the init image");
    assert_fails(&generate(&["--image", &photo, "--mask", &mask], &a), &["--init-image"]);
}

#[test]
fn generate_with_flux_fill() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (fill, init) =
        (fixture("fill/transformer").display().to_string(), fixture("img2img/init.png").display().to_string());
    let (vae, mask) =
        (fixture("img2img/ae.safetensors").display().to_string(), fixture("inpaint/mask.png").display().to_string());
    let out = tmp("gen-fill.png");
    let base = ["--flux", &fill, "--image", &photo, "--vae", &vae, "--init-image", &init, "--guidance", "30"];
    let o = generate(&[&base[..], &["--mask", &mask]].concat(), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(png.contains("\"strength\":1.0"), "FLUX.1 Fill's default strength is 1, as diffusers'");
    // Fill needs the mask; the other Flux takes none of Fill's channels.
    assert_fails(&generate(&base, &out), &["FLUX.1 Fill", "--mask"]);
    assert_fails(&generate(&["--flux", &fill, "--image", &photo], &out), &["FLUX.1 Fill"]);
}

#[test]
fn generate_with_flux_control() {
    let f = |r: &str| fixture(r).display().to_string();
    let (control_flux, vae, edges) = (f("control/transformer"), f("img2img/ae.safetensors"), f("control/control.png"));
    let (init, mask) = (f("img2img/init.png"), f("inpaint/mask.png"));
    let (a, b) = (tmp("gen-control-a.png"), tmp("gen-control-b.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf, sized: bool| {
        let mut args =
            generate_args(&[&["--flux", &control_flux, "--vae", &vae, "--guidance", "30"], extra].concat(), out);
        if !sized {
            for flag in ["--width", "--height"] {
                let i = args.iter().position(|a| a == flag).unwrap();
                args.drain(i..i + 2);
            }
        }
        let o = Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Without --width/--height the output takes the control image's size rounded down to 16 (40×24 → 32×16).
    run(&["--control-image", &edges], &a, false);
    let info = png::Decoder::new(std::io::Cursor::new(std::fs::read(&a).unwrap())).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (32, 16));
    let png = String::from_utf8_lossy(&std::fs::read(&a).unwrap()).into_owned();
    assert!(png.contains("\"control_image\":[\"") && png.contains("control.png"), "the PNG's parameters name it");
    // Another control image, same seed: another picture.
    run(&["--control-image", &edges], &a, true);
    run(&["--control-image", &init], &b, true);
    assert_ne!(pixels(&a), pixels(&b), "the control image changed nothing");
    // With an init image and a mask (diffusers' FluxControlInpaintPipeline).
    run(&["--control-image", &edges, "--init-image", &init, "--mask", &mask], &b, true);
    let png = String::from_utf8_lossy(&std::fs::read(&b).unwrap()).into_owned();
    assert!(png.contains("\"strength\":0.6"), "image-to-image keeps diffusers' default strength");
    // Refused before any model runs: the Control model without its image, a
    // control image for another Flux, with a Kontext image, or a decoder-only VAE.
    let control = ["--flux", &control_flux, "--vae", &vae];
    assert_fails(&generate(&control, &a), &["FLUX.1 Canny/Depth", "--control-image"]);
    assert_fails(&generate(&["--vae", &vae, "--control-image", &edges], &a), &["goes with FLUX.1 Canny or Depth"]);
    let kontext = [&control[..], &["--control-image", &edges, "--kontext-image", &init]].concat();
    assert_fails(&generate(&kontext, &a), &["not FLUX.1 Canny/Depth"]);
    let decoder_only = ["--flux", &control_flux, "--control-image", &edges];
    assert_fails(&generate(&decoder_only, &a), &["has only the decoder"]);
    // A FLUX.1 Canny/Depth LoRA makes the plain Flux the Control model.
    let lora = f("control/lora-bfl.safetensors");
    let o = generate(&["--vae", &vae, "--lora", &lora, "--control-image", &edges, "--guidance", "30"], &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("widens Flux's input to 128 channels") && err.contains("replaces 14 QK-norm"), "{err}");
    assert_fails(&generate(&["--vae", &vae, "--lora", &lora], &a), &["FLUX.1 Canny/Depth", "--control-image"]);
    // A photo as the control image, turned into its Canny edges first.
    let photo = f("images/photo.jpg");
    run(&["--control-image", &photo, "--control-canny", "100,200"], &b, true);
    let png = String::from_utf8_lossy(&std::fs::read(&b).unwrap()).into_owned();
    assert!(png.contains("photo.jpg (Canny 100,200)"), "the PNG's parameters say the edges were made");
    assert_fails(
        &generate(&[&control[..], &["--control-image", &photo, "--control-canny", "100"]].concat(), &a),
        &["LOW,HIGH"],
    );
}

#[test]
fn generate_with_a_controlnet() {
    let f = |r: &str| fixture(r).display().to_string();
    let (canny, union, vae, edges) =
        (f("controlnet/canny"), f("controlnet/union"), f("img2img/ae.safetensors"), f("control/control.png"));
    let (a, b) = (tmp("gen-controlnet-a.png"), tmp("gen-controlnet-b.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let ok = |extra: &[&str], out: &PathBuf| {
        let o = generate(&[&["--vae", &vae, "--control-image", &edges], extra].concat(), out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let log = ok(&["--controlnet", &canny, "--controlnet-scale", "0.7", "--verbose"], &a);
    let entry = |event: &str| log.lines().any(|l| l.contains(&format!(" {event} ")) && l.contains(" controlnet "));
    assert!(entry("register") && entry("release"), "the registry's timeline shows its entry:\n{log}");
    let png = String::from_utf8_lossy(&std::fs::read(&a).unwrap()).into_owned();
    assert!(png.contains("\"controlnet\":[{") && png.contains("\"scale\":0.7"), "the PNG's parameters hold it");
    // ComfyUI's percents, whole schedule: the same picture as diffusers' whole window.
    ok(&["--controlnet", &canny, "--controlnet-scale", "0.7", "--controlnet-start-percent", "0"], &b);
    assert_eq!(pixels(&a), pixels(&b), "percent 0..1 is every step");
    // At scale 0 its residuals are zeros: the picture is plain Flux's, to the byte.
    ok(&["--controlnet", &canny, "--controlnet-scale", "0"], &b);
    let plain = tmp("gen-controlnet-plain.png");
    let o = generate(&["--vae", &vae], &plain);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pixels(&b), pixels(&plain), "scale 0 changed the picture");
    assert_ne!(pixels(&a), pixels(&plain), "the ControlNet changed nothing");
    // A Union net in a mode, by name or number; with true CFG.
    ok(&["--controlnet", &union, "--controlnet-mode", "depth", "--controlnet-start", "0.5"], &a);
    ok(&["--controlnet", &union, "--controlnet-mode", "2", "--controlnet-start", "0.5"], &b);
    assert_eq!(pixels(&a), pixels(&b));
    ok(&["--controlnet", &union, "--controlnet-mode", "canny", "--true-cfg", "2", "--negative-prompt", "dog"], &b);
    // A Union net given no mode takes the map made: Canny edges, mode canny, as if named.
    let photo = f("images/photo.jpg");
    let canny_map = ["--vae", &vae, "--control-image", &photo, "--control-canny", "100,200", "--controlnet", &union];
    let o = generate(&canny_map, &a);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && log.contains("Union ControlNet: mode 0 (canny)"), "{log}");
    assert!(generate(&[&canny_map[..], &["--controlnet-mode", "0"]].concat(), &b).status.success());
    assert_eq!(pixels(&a), pixels(&b));
    // XLabs' kind reads the control image's pixels: a decoder-only VAE will do (the default here).
    for xlabs in [f("controlnet/xlabs"), f("controlnet/xlabs-original.safetensors")] {
        let o = generate(&["--control-image", &edges, "--controlnet", &xlabs], &b);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Refused before any model runs.
    let base = ["--vae", &vae, "--control-image", &edges];
    let with = |extra: &[&str]| generate(&[&base[..], extra].concat(), &a);
    assert_fails(&with(&["--controlnet", &union]), &["Union ControlNet", "--controlnet-mode"]);
    assert_fails(&with(&["--controlnet", &canny, "--controlnet-mode", "pose"]), &["no modes"]);
    assert_fails(&with(&["--controlnet", &union, "--controlnet-mode", "scribble"]), &["canny, tile, depth"]);
    assert_fails(&with(&["--controlnet", &canny, "--controlnet-start", "0.8", "--controlnet-end", "0.2"]), &["window"]);
    let late = ["--controlnet", &canny, "--controlnet-start-percent", "0.8", "--controlnet-end-percent", "0.2"];
    assert_fails(&with(&late), &["start percent is after"]);
    assert_fails(
        &with(&["--controlnet", &canny, "--controlnet-start", "0.1", "--controlnet-start-percent", "0.1"]),
        &["cannot be used with"],
    );
    assert_fails(&with(&["--controlnet", &f("flux/transformer")]), &["not a Flux ControlNet"]);
    assert_fails(&generate(&["--vae", &vae, "--controlnet", &canny], &a), &["--control-image"]);
    let control_flux = ["--flux", &f("control/transformer"), "--controlnet", &canny];
    assert_fails(&with(&control_flux), &["goes with FLUX.1-dev or schnell"]);
}

#[test]
fn generate_with_several_controlnets() {
    let f = |r: &str| fixture(r).display().to_string();
    let (canny, union, vae, edges, photo) = (
        f("controlnet/canny"),
        f("controlnet/union"),
        f("img2img/ae.safetensors"),
        f("control/control.png"),
        f("images/photo.jpg"),
    );
    let (a, b) = (tmp("gen-multi-a.png"), tmp("gen-multi-b.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let ok = |extra: &[&str], out: &PathBuf| {
        let o = generate(&[&["--vae", &vae], extra].concat(), out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    // Nets of different sizes (1+2 and 2+0 blocks), each mapped by its own depth. A second net at
    // scale 0 adds zeros: the first net's picture, to the byte.
    ok(&["--control-image", &edges, "--controlnet", &canny, "--controlnet-scale", "0.7"], &a);
    let pair = ["--control-image", &edges, "--controlnet", &canny, "--controlnet", &union];
    let scaled = ["--controlnet-scale", "0.7", "--controlnet-scale", "0", "--verbose"];
    let log = ok(&[&pair[..], &["--controlnet-mode", "none", "--controlnet-mode", "depth"], &scaled[..]].concat(), &b);
    assert!(pixels(&a) == pixels(&b), "a second net at scale 0 changed the picture");
    let entry = |name: &str| log.lines().any(|l| l.contains(" register ") && l.contains(&format!(" {name} ")));
    assert!(entry("controlnet") && entry("controlnet-2"), "one registry entry per file:\n{log}");
    let png = String::from_utf8_lossy(&std::fs::read(&b).unwrap()).into_owned();
    assert!(png.contains("\"mode\":null") && png.contains("\"mode\":2"), "the PNG's parameters hold both nets");
    ok(
        &[&pair[..], &["--controlnet-scale", "0.7", "--controlnet-mode", "none", "--controlnet-mode", "depth"]]
            .concat(),
        &b,
    );
    assert!(pixels(&a) != pixels(&b), "the second net changed nothing");

    // One Union net in two modes, each on its own map of one photo (Shakker-Labs' Union-Pro
    // example): the same file is loaded once; the modes follow the maps; the same picture as the
    // maps written by `ipaflux canny` / `ipaflux depth` and given as they are.
    let depth_model = f("depth/model");
    let knobs = [
        "--controlnet-scale",
        "0.5",
        "--controlnet-scale",
        "0.8",
        "--controlnet-start",
        "0",
        "--controlnet-start",
        "0.3",
    ];
    let maps = [
        &["--control-image", &photo, "--control-image", &photo, "--control-map", "canny", "--control-map", "depth"][..],
        &["--control-depth", &depth_model, "--controlnet", &union, "--controlnet", &union, "--verbose"],
        &knobs,
    ]
    .concat();
    let log = ok(&maps, &a);
    assert!(
        log.contains("Union ControlNet 1: mode 0 (canny)") && log.contains("Union ControlNet 2: mode 2 (depth)"),
        "{log}"
    );
    assert!(!log.contains(" controlnet-2 "), "the same file was registered twice:\n{log}");
    let made = |cmd: &str, flag: &str, value: &str, out: &PathBuf| {
        let o = Command::new(env!("CARGO_BIN_EXE_ipaflux")).args([cmd, &photo, flag, value, "--out"]).arg(out).output();
        assert!(o.as_ref().unwrap().status.success(), "{}", String::from_utf8_lossy(&o.unwrap().stderr));
    };
    let (edge_map, depth_map) = (tmp("multi-photo-edges.png"), tmp("multi-photo-depth.png"));
    made("canny", "--low", "100", &edge_map);
    made("depth", "--model", &depth_model, &depth_map);
    let (edge_map, depth_map) = (edge_map.display().to_string(), depth_map.display().to_string());
    let given = [
        &["--control-image", &edge_map, "--control-image", &depth_map][..],
        &["--controlnet", &union, "--controlnet", &union, "--controlnet-mode", "canny", "--controlnet-mode", "depth"],
        &knobs,
    ]
    .concat();
    ok(&given, &b);
    assert!(pixels(&a) == pixels(&b), "each net did not read its own map");
    // With the first at scale 0: the second net alone on its own image, to the byte.
    let images = ["--control-image", &edge_map, "--control-image", &depth_map];
    let twice =
        ["--controlnet", &union, "--controlnet", &union, "--controlnet-mode", "canny", "--controlnet-mode", "depth"];
    let second = ["--controlnet-scale", "0", "--controlnet-scale", "0.8", "--controlnet-start", "0.3"];
    ok(&[&images[..], &twice[..], &second[..]].concat(), &a);
    let alone = ["--control-image", &depth_map, "--controlnet", &union, "--controlnet-mode", "depth"];
    ok(&[&alone[..], &["--controlnet-scale", "0.8", "--controlnet-start", "0.3"]].concat(), &b);
    assert!(pixels(&a) == pixels(&b), "the second net did not read the second image");

    // Refused before any model runs.
    let with = |extra: &[&str]| generate(&[&["--vae", &vae], extra].concat(), &a);
    let three = ["--control-image", &edges, "--control-image", &edges, "--control-image", &edges];
    assert_fails(
        &with(&[&three[..], &["--controlnet", &canny, "--controlnet", &canny]].concat()),
        &["3 control images for 2"],
    );
    let scales = ["--controlnet-scale", "1", "--controlnet-scale", "1", "--controlnet-scale", "1"];
    assert_fails(&with(&[&pair[..], &scales[..]].concat()), &["3 --controlnet-scale values for 2"]);
    assert_fails(&with(&[&pair[..], &["--controlnet-mode", "depth"]].concat()), &["ControlNet 1 (", "no modes"]);
    let both = ["--control-image", &photo, "--control-canny", "100,200", "--control-depth", &depth_model];
    assert_fails(&with(&[&both[..], &["--controlnet", &canny]].concat()), &["--control-map"]);
    let unused = ["--control-image", &photo, "--control-depth", &depth_model, "--control-map", "canny"];
    assert_fails(&with(&[&unused[..], &["--controlnet", &canny]].concat()), &["no depth map would be made"]);
    let flux_control = ["--flux", &f("control/transformer"), "--control-image", &edges, "--control-image", &edges];
    assert_fails(&with(&flux_control), &["one control image, and 2"]);
}

#[test]
fn canny_writes_opencvs_edges() {
    let out = tmp("canny-photo.png");
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["canny", &fixture("images/photo.jpg").display().to_string(), "--low", "50", "--high", "200", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = png_pixels(&std::fs::read(fixture("canny/photo.50-200.png")).unwrap());
    let ours: Vec<u8> = png_pixels(&std::fs::read(&out).unwrap()).chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(ours, want, "not OpenCV's edge map");
}

#[test]
fn depth_writes_depth_anythings_map() {
    let out = tmp("depth-photo.png");
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["depth", &fixture("images/photo.jpg").display().to_string(), "--model"])
        .arg(fixture("depth/model"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // transformers' map (make_depth_fixtures.py); truncation may move a level by one.
    let want = png_pixels(&std::fs::read(fixture("depth/model.photo.png")).unwrap());
    let ours: Vec<u8> = png_pixels(&std::fs::read(&out).unwrap()).chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(ours.len(), want.len());
    assert!(ours.iter().zip(&want).all(|(a, b)| a.abs_diff(*b) <= 1), "not transformers' depth map");
    assert!(ours.iter().zip(&want).filter(|(a, b)| a == b).count() * 100 >= want.len() * 99);
    // A folder that is not a Depth Anything model is named.
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["depth", &fixture("images/photo.jpg").display().to_string(), "--model"])
        .arg(fixture("xlabs/image_encoder"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(&o, &["config.json", "depth_anything"]);
}

#[test]
fn generate_with_control_depth() {
    let f = |r: &str| fixture(r).display().to_string();
    let (control_flux, vae, photo) = (f("control/transformer"), f("img2img/ae.safetensors"), f("images/photo.jpg"));
    let (map, a, b) = (tmp("gen-depth-map.png"), tmp("gen-depth-a.png"), tmp("gen-depth-b.png"));
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["depth", &photo, "--model", &f("depth/model"), "--out"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let control = ["--flux", &control_flux, "--vae", &vae, "--guidance", "10"];
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(&[&control[..], extra].concat(), out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // A photo with --control-depth makes what its depth map as --control-image makes;
    // the depth model is a registry entry, loaded in a stage of its own and released there.
    let depth = ["--control-image", &photo, "--control-depth", &f("depth/model"), "--verbose"];
    let o = generate(&[&control[..], &depth[..]].concat(), &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let timeline = String::from_utf8_lossy(&o.stdout);
    assert!(timeline.lines().any(|l| l.contains("register") && l.contains(" depth ")), "{timeline}");
    let released = |l: &str| l.contains("control map") && l.contains("release") && l.contains(" depth ");
    assert!(timeline.lines().any(released), "{timeline}");
    run(&["--control-image", &map.display().to_string()], &b);
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    assert_eq!(pixels(&a), pixels(&b), "--control-depth is not the depth map as the control image");
    run(&["--control-image", &photo], &b);
    assert_ne!(pixels(&a), pixels(&b), "the depth map changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&a).unwrap()).into_owned();
    assert!(png.contains("photo.jpg (depth map)"), "the PNG's parameters say the depth map was made");
    // An original V2 checkpoint file, as ComfyUI's preprocessor loads it: the same equivalence.
    let pth = f("depth/original/depth_anything_v2_tiny.pth");
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["depth", &photo, "--model", &pth, "--out"])
        .arg(&map)
        .output();
    assert!(o.as_ref().unwrap().status.success(), "{}", String::from_utf8_lossy(&o.unwrap().stderr));
    let depth = ["--control-image", &photo, "--control-depth", &pth];
    run(&depth, &a);
    run(&["--control-image", &map.display().to_string()], &b);
    assert_eq!(pixels(&a), pixels(&b), "--control-depth with a .pth is not its depth map as the control image");
    let both = ["--control-image", &photo, "--control-depth", &f("depth/model"), "--control-canny", "100,200"];
    assert_fails(&generate(&[&control[..], &both[..]].concat(), &a), &["--control-canny"]);
    // A depth folder with a tensor missing is refused before any model runs.
    let broken = tmp("depth-broken");
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("depth/model").join(file), broken.join(file)).unwrap();
    }
    let dev = ipaflux_core::candle_core::Device::Cpu;
    let mut weights =
        ipaflux_core::candle_core::safetensors::load(fixture("depth/model/model.safetensors"), &dev).unwrap();
    weights.remove("head.conv3.bias").unwrap();
    ipaflux_core::candle_core::safetensors::save(&weights, broken.join("model.safetensors")).unwrap();
    let o = generate(
        &[&control[..], &["--control-image", &photo, "--control-depth", &broken.display().to_string()]].concat(),
        &a,
    );
    assert_fails(&o, &["model.safetensors", "missing tensor `head.conv3.bias`"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("stage done"), "a model ran before the refusal");
}

#[test]
fn generate_with_xlabs_ip_adapter() {
    let f = |r: &str| fixture(r).display().to_string();
    let (adapter, clip, photo) = (f("xlabs/ip_adapter.safetensors"), f("xlabs/image_encoder"), f("images/photo.jpg"));
    let (plain, with, zero) = (tmp("gen-xlabs-plain.png"), tmp("gen-xlabs.png"), tmp("gen-xlabs-0.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let xlabs = ["--ip-adapter", &adapter, "--clip-vision", &clip, "--image", &photo];
    run(&[], &plain);
    run(&[&xlabs[..], &["--ip-weight", "0.8", "--verbose"]].concat(), &with);
    run(&[&xlabs[..], &["--ip-weight", "0"]].concat(), &zero);
    assert_ne!(pixels(&plain), pixels(&with), "XLabs' adapter changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&with).unwrap()).into_owned();
    assert!(png.contains("\"ip_adapter\":\"xlabs\""), "the PNG's parameters name the adapter");
    assert_eq!(pixels(&plain), pixels(&zero), "weight 0 is exactly no adapter");
    // It reads images with CLIP, not SigLIP, and takes no InstantX embeddings.
    let no_clip = ["--ip-adapter", &adapter, "--image", &photo];
    assert_fails(&generate(&no_clip, &plain), &["XLabs", "--clip-vision"]);
    let embeds = tmp("xlabs-embeds.safetensors");
    let e = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["encode", "--siglip", &f("siglip-vision"), "--ip-adapter", &f("ip-adapter.bin"), "--image", &photo])
        .arg("--out")
        .arg(&embeds)
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let with_embeds = ["--ip-adapter", &adapter, "--embeds", &embeds.display().to_string()];
    assert_fails(&generate(&with_embeds, &plain), &["XLabs", "--embeds"]);
}

#[test]
fn generate_with_a_kontext_image() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (init, vae) = (fixture("img2img/init.png").display().to_string(), fixture("img2img/ae.safetensors"));
    let vae = vae.display().to_string();
    let (plain, edited) = (tmp("gen-kontext-plain.png"), tmp("gen-kontext.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |args: Vec<String>| {
        let o = Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let kontext = ["--image", &photo, "--vae", &vae, "--kontext-image", &init, "--kontext-auto-resize", "off"];
    // Without --width/--height the output takes the Kontext image's size (96×64).
    let mut args = generate_args(&kontext, &edited);
    for flag in ["--width", "--height"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    run(args);
    let info = png::Decoder::new(std::io::Cursor::new(std::fs::read(&edited).unwrap())).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (96, 64));
    run(generate_args(&["--image", &photo, "--vae", &vae, "--width", "96", "--height", "64"], &plain));
    assert_ne!(pixels(&plain), pixels(&edited), "the Kontext image changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&edited).unwrap()).into_owned();
    assert!(png.contains("\"kontext_image\":\"") && png.contains("init.png"), "the PNG's parameters name it");
    // Kontext inpainting: the same picture as init image and reference, with a mask.
    let mask = fixture("inpaint/mask.png").display().to_string();
    let inpainted = tmp("gen-kontext-inpaint.png");
    let mut args = generate_args(&[&kontext[..], &["--init-image", &init, "--mask", &mask]].concat(), &inpainted);
    for flag in ["--width", "--height"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    run(args);
    let info = png::Decoder::new(std::io::Cursor::new(std::fs::read(&inpainted).unwrap())).read_info().unwrap();
    assert_eq!((info.info().width, info.info().height), (96, 64));
    assert_ne!(pixels(&inpainted), pixels(&edited), "the mask changed nothing");
    // A decoder-only VAE cannot encode it; FLUX.1 Fill does not take it.
    assert_fails(&generate(&["--image", &photo, "--kontext-image", &init], &plain), &["has only the decoder"]);
    let (fill, mask) =
        (fixture("fill/transformer").display().to_string(), fixture("inpaint/mask.png").display().to_string());
    let with_fill = [&kontext[..], &["--flux", &fill, "--init-image", &init, "--mask", &mask]].concat();
    assert_fails(&generate(&with_fill, &plain), &["not FLUX.1 Fill"]);
}

#[test]
fn generate_with_true_cfg_and_a_negative_prompt() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let (plain, cfg, other) = (tmp("gen-cfg-plain.png"), tmp("gen-cfg-4.png"), tmp("gen-cfg-other.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["--image", &photo], &plain);
    run(&["--image", &photo, "--true-cfg", "4", "--negative-prompt", "a dog"], &cfg);
    run(&["--image", &photo, "--true-cfg", "4", "--negative-prompt", "blurry"], &other);
    assert_ne!(pixels(&plain), pixels(&cfg), "true CFG changed nothing");
    assert_ne!(pixels(&cfg), pixels(&other), "the negative prompt changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&cfg).unwrap()).into_owned();
    assert!(png.contains("\"negative_prompt\":\"a dog\"") && png.contains("\"true_cfg\":4"), "the PNG's parameters");
    // A negative prompt without true CFG does nothing with FLUX.1-dev: refused, as is a scale below 1.
    assert_fails(&generate(&["--image", &photo, "--negative-prompt", "a dog"], &other), &["--true-cfg above 1"]);
    assert_fails(&generate(&["--image", &photo, "--true-cfg", "0.5"], &other), &["true CFG scale 0.5 is outside"]);
    // The IP-Adapter's negative image: the reference (ComfyUI, the default) or black (diffusers).
    let black = tmp("gen-cfg-black.png");
    run(&["--image", &photo, "--true-cfg", "4", "--negative-prompt", "a dog", "--ip-negative", "black"], &black);
    assert_ne!(pixels(&cfg), pixels(&black), "the black negative image changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&black).unwrap()).into_owned();
    assert!(png.contains("\"ip_negative\":\"black\""), "the PNG's parameters say which negative image");
    run(&["--image", &photo, "--true-cfg", "4", "--negative-prompt", "a dog", "--ip-negative", "same"], &other);
    assert_eq!(pixels(&cfg), pixels(&other), "`same` is the default");
    assert_fails(&generate(&["--image", &photo, "--ip-negative", "black"], &other), &["--true-cfg above 1"]);
    // A picture of one's choosing (diffusers' `negative_ip_adapter_image`): the reference itself is `same`.
    fn cfg_with<'a>(photo: &'a str, negative: &'a str) -> [&'a str; 8] {
        ["--image", photo, "--true-cfg", "4", "--negative-prompt", "a dog", "--ip-negative", negative]
    }
    let picture = tmp("gen-cfg-picture.png");
    run(&cfg_with(&photo, &photo), &picture);
    assert_eq!(pixels(&cfg), pixels(&picture), "the reference as the negative image is not `same`");
    let alpha = fixture("images/alpha.png").display().to_string();
    run(&cfg_with(&photo, &alpha), &picture);
    assert_ne!(pixels(&cfg), pixels(&picture), "the negative picture changed nothing");
    assert_ne!(pixels(&black), pixels(&picture), "the negative picture is the black image");
    let png = String::from_utf8_lossy(&std::fs::read(&picture).unwrap()).into_owned();
    assert!(png.contains("alpha.png"), "the PNG's parameters name the negative picture");
    assert_fails(
        &generate(&["--image", &photo, "--ip-negative", &alpha], &other),
        &["--ip-negative IMAGE", "--true-cfg"],
    );
    assert_fails(&generate(&cfg_with(&photo, "no-such.png"), &other), &["no-such.png", "negative IP image"]);
    // XLabs' adapter reads the black image with its CLIP.
    let f = |r: &str| fixture(r).display().to_string();
    let (adapter, clip) = (f("xlabs/ip_adapter.safetensors"), f("xlabs/image_encoder"));
    let xlabs = ["--ip-adapter", &adapter, "--clip-vision", &clip, "--image", &photo, "--true-cfg", "4"];
    run(&[&xlabs[..], &["--ip-negative", "black"]].concat(), &black);
    run(&xlabs, &other);
    assert_ne!(pixels(&other), pixels(&black), "XLabs' black negative image changed nothing");
}

#[test]
fn generate_with_redux_images() {
    let (photo, gray) =
        (fixture("images/photo.jpg").display().to_string(), fixture("images/gray.webp").display().to_string());
    let redux = fixture("redux").display().to_string();
    let (plain, one, two, strong) =
        (tmp("gen-rx-plain.png"), tmp("gen-rx-1.png"), tmp("gen-rx-2.png"), tmp("gen-rx-3.png"));
    let pixels = |p: &PathBuf| png_pixels(&std::fs::read(p).unwrap());
    let run = |extra: &[&str], out: &PathBuf| {
        let o = generate(extra, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["--image", &photo], &plain);
    run(&["--image", &photo, "--redux", &redux, "--redux-image", &photo], &one);
    run(&["--image", &photo, "--redux", &redux, "--redux-image", &photo, "--redux-image", &gray], &two);
    run(&["--image", &photo, "--redux", &redux, "--redux-image", &photo, "--redux-strength", "3"], &strong);
    assert_ne!(pixels(&plain), pixels(&one), "the Redux image changed nothing");
    assert_ne!(pixels(&one), pixels(&two), "a second Redux image changed nothing");
    assert_ne!(pixels(&one), pixels(&strong), "the Redux strength changed nothing");
    let png = String::from_utf8_lossy(&std::fs::read(&two).unwrap()).into_owned();
    assert_eq!(png.matches("\"kind\":\"redux\"").count(), 2, "the PNG lists both Redux images");
    // Redux alone: no IP-Adapter needed.
    let mut args = generate_args(&["--redux", &redux, "--redux-image", &photo], &one);
    let i = args.iter().position(|a| a == "--ip-adapter").unwrap();
    args.drain(i..i + 2);
    let o = Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Refused before any model runs: no Redux model, a strength out of range, a Redux model for another SigLIP.
    assert_fails(&generate(&["--redux-image", &photo], &one), &["--redux-image needs --redux"]);
    let o = generate(&["--redux", &redux, "--redux-image", &photo, "--redux-strength", "11"], &one);
    assert_fails(&o, &["--redux-strength 11 is outside 0..10"]);
    let o =
        generate(&["--redux", &fixture("ip-adapter.safetensors").display().to_string(), "--redux-image", &photo], &one);
    assert_fails(&o, &["redux_up.weight"]);
}

/// Decoded RGB bytes of a PNG (parameters chunk aside).
fn png_pixels(bytes: &[u8]) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn generate_refuses_bad_input_cleanly() {
    let photo = fixture("images/photo.jpg").display().to_string();
    let out = tmp("gen-bad.png");
    let o = generate(&["--image", &photo, "--width", "100"], &out);
    assert_fails(&o, &["width 100", "multiple of 16"]);
    let not_image = fixture("reference.json").display().to_string();
    assert_fails(&generate(&["--image", &not_image], &out), &["reference.json"]);
    assert_fails(
        &generate(&["--image", &photo, "--flux", &fixture("ip-adapter.safetensors").display().to_string()], &out),
        &["ip-adapter.safetensors"],
    );
    assert_fails(&generate(&["--image", &photo, "--ip-weight", "7"], &out), &["outside the accepted range"]);
    // Without --ip-adapter, IP references are refused (and with no reference at all it is plain Flux).
    let mut args = generate_args(&["--image", &photo], &out);
    let i = args.iter().position(|a| a == "--ip-adapter").unwrap();
    args.drain(i..i + 2);
    assert_fails(&Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(&args).output().unwrap(), &["need --ip-adapter"]);
    let o = generate(&[], &out);
    assert!(o.status.success(), "plain Flux: {}", String::from_utf8_lossy(&o.stderr));
    // A single-file T5 needs its tokenizer, and gets the T5-XXL config: the tiny weights do not fit it.
    let t5_file = fixture("pipeline/t5/model.safetensors").display().to_string();
    assert_fails(&generate(&["--image", &photo, "--t5", &t5_file], &out), &["--t5-tokenizer"]);
    let tok = fixture("pipeline/t5/tokenizer.json").display().to_string();
    let o = generate(&["--image", &photo, "--t5", &t5_file, "--t5-tokenizer", &tok], &out);
    assert_fails(&o, &["model.safetensors", "not a T5 encoder checkpoint"]);
    // An adapter made for another Flux (K/V 32 wide instead of 48).
    let adapter = tmp("adapter-32.safetensors");
    write_adapter(&adapter, 32);
    let o = generate(&["--image", &photo, "--ip-adapter", &adapter.display().to_string()], &out);
    assert_fails(&o, &["hidden size 32", "hidden size 48"]);
}

/// A random IP-Adapter for the tiny SigLIP (32-wide embeddings) with K/V `hidden` wide, 5 processors.
fn write_adapter(path: &std::path::Path, hidden: usize) {
    use ipaflux_core::candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, &dev).unwrap().to_dtype(DType::F32).unwrap();
    let mut t = std::collections::HashMap::new();
    t.insert("image_proj.proj.0.weight".to_string(), r(&[64, 32]));
    t.insert("image_proj.proj.0.bias".to_string(), r(&[64]));
    t.insert("image_proj.proj.2.weight".to_string(), r(&[8 * 64, 64]));
    t.insert("image_proj.proj.2.bias".to_string(), r(&[8 * 64]));
    t.insert("image_proj.norm.weight".to_string(), r(&[64]));
    t.insert("image_proj.norm.bias".to_string(), r(&[64]));
    for i in 0..5 {
        t.insert(format!("ip_adapter.{i}.to_k_ip.weight"), r(&[hidden, 64]));
        t.insert(format!("ip_adapter.{i}.to_v_ip.weight"), r(&[hidden, 64]));
    }
    ipaflux_core::candle_core::safetensors::save(&t, path).unwrap();
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

fn quantize(siglip: &PathBuf, format: &str, out: &PathBuf) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["quantize", "--format", format, "--siglip"])
        .arg(siglip)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// `ipaflux quantize` writes a smaller SigLIP folder the encoder loads (the
/// CPU dequantizes it), prints its table, and refuses to overwrite its input
/// or to quantize twice.
#[test]
fn quantize_writes_a_smaller_folder_the_encoder_loads() {
    let (s, a, i) = good();
    let original = std::fs::metadata(s.join("model.safetensors")).unwrap().len();
    for format in ["f16", "q8", "q4"] {
        let dir = tmp(&format!("quantized-{format}"));
        let out = quantize(&s, format, &dir);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("ratio") && table.contains(format), "{table}");
        let written = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
        assert!(written < original, "{format}: {written} bytes, original {original}");
        assert!(dir.join("config.json").exists() && dir.join("preprocessor_config.json").exists());
        let enc = encode(&dir, &a, &i, &tmp(&format!("quantized-{format}.safetensors")));
        assert!(enc.status.success(), "{format}: {}", String::from_utf8_lossy(&enc.stderr));
    }
    let q8 = tmp("quantized-q8");
    assert_fails(&quantize(&q8, "q4", &tmp("twice")), &["already quantized (q8)"]);
    assert_fails(&quantize(&s, "q4", &s), &["is the input folder"]);
    assert_fails(&quantize(&s, "q5", &tmp("q5")), &["unknown weight format `q5`"]);
}

#[test]
fn gpu_check_quick_runs_on_the_cpu_and_reads_torch_figures() {
    // The GPU check's code on the CPU at small sizes, so it builds and runs in
    // every CI run; the CUDA sections are compiled by `cargo xtask cuda-check`.
    let torch = tmp("torch.json");
    std::fs::write(
        &torch,
        r#"{"device": "test", "siglip_ms": 1000.0, "flux_128_ms": 2.0, "flux_128_peak_gib": 1.5, "flux_128_before_gib": 1.0}"#,
    )
    .unwrap();
    let table = tmp("gpu-check.md");
    let out = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["gpu-check", "--device", "cpu", "--quick", "--runs", "1", "--fixtures"])
        .arg(fixture(""))
        .arg("--torch")
        .arg(&torch)
        .arg("--out")
        .arg(&table)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(&table).unwrap();
    assert_eq!(written, stdout);
    // Each row also went to stderr as it was made (what a run stopped part-way leaves).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = stderr.lines().filter_map(|l| l.strip_prefix("gpu-check: row: ")).collect();
    let rows: Vec<&str> = written.lines().skip(2).take_while(|l| l.starts_with('|')).collect();
    assert!(!rows.is_empty());
    assert_eq!(progress, rows);
    // Parity rows ran and passed; PyTorch's figure is shown beside ours.
    assert!(written.contains("| parity | Flux tiny + IP, cpu F32 (reference attention) vs diffusers |"), "{written}");
    assert!(written.contains("| 1000.00 ms |"), "{written}");
    // Every diffusers-pipeline mode ran on the device under test (here the CPU).
    for mode in [
        "image-to-image",
        "inpainting",
        "FLUX.1 Fill",
        "FLUX.1 Kontext",
        "FLUX.1 Kontext inpainting",
        "true CFG",
        "Canny/Depth",
        "Control LoRA",
        "XLabs IP-Adapter",
        "XLabs IP-Adapter, true CFG, black negative",
        "Depth Anything (model)",
        "Depth Anything (metric)",
    ] {
        assert!(
            written.lines().any(|l| l.starts_with("| parity | ") && l.contains(mode) && l.ends_with("PASS |")),
            "{mode}: {written}"
        );
    }
    assert!(written.contains(", 0 failed"), "{written}");
    // The step's own memory beside PyTorch's (peak − before: 0.5 GiB), and what the K/V cache keeps.
    assert!(written.contains("the step's own memory") && written.contains("| 512 MiB (torch) |"), "{written}");
    assert!(written.contains("memory the cached K/V of one image keeps"), "{written}");
    // The streamed run executed the registry's partial-load plan (some blocks streamed).
    let streamed = written.lines().find(|l| l.starts_with("| stream |") && l.contains("streamed in a")).unwrap();
    assert!(!streamed.contains(" 0 streamed"), "{streamed}");
    // --section runs those sections alone; an unknown one is refused, naming the known ones.
    // (`--wgmma only` as gpu-check.sh runs it first; the CPU has no version 8, so it changes nothing here.)
    let only = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["gpu-check", "--device", "cpu", "--quick", "--runs", "1", "--section", "attention", "--wgmma", "only"])
        .arg("--fixtures")
        .arg(fixture(""))
        .output()
        .unwrap();
    let only_out = String::from_utf8_lossy(&only.stdout);
    assert!(only.status.success(), "{only_out}");
    let sections: std::collections::BTreeSet<&str> =
        only_out.lines().skip(2).filter_map(|l| l.strip_prefix("| ")?.split(" |").next()).collect();
    assert_eq!(sections.into_iter().collect::<Vec<_>>(), ["attention"], "{only_out}");
    let unknown = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["gpu-check", "--device", "cpu", "--quick", "--section", "speed", "--fixtures"])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert_fails(&unknown, &["invalid value 'speed' for '--section", "parity, attention, registry, bench, stream"]);
    let wgmma = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["gpu-check", "--device", "cpu", "--quick", "--wgmma", "first", "--fixtures"])
        .arg(fixture(""))
        .output()
        .unwrap();
    assert_fails(&wgmma, &["invalid value 'first' for '--wgmma", "include, exclude, only"]);
    // A missing fixture folder is a failed check, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_ipaflux"))
        .args(["gpu-check", "--device", "cpu", "--quick", "--runs", "1", "--fixtures", "/nonexistent"])
        .output()
        .unwrap();
    assert_fails(&bad, &["GPU check(s) failed", "/nonexistent"]);
}

#[test]
fn inspect_summarises_a_checkpoint_header() {
    let run =
        |rel: &str| Command::new(env!("CARGO_BIN_EXE_ipaflux")).args(["inspect"]).arg(fixture(rel)).output().unwrap();
    let o = run("flux/flux-tiny-bfl.gguf");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("GGUF (architecture `flux`)") && out.contains("Flux: 2 double + 3 single blocks"), "{out}");
    assert_fails(&run("no-such.gguf"), &["no-such.gguf"]);
}
