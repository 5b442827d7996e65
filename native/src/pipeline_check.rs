//! `gpu-check`'s parity of the diffusers-pipeline modes on the device under
//! test: image-to-image, inpainting, FLUX.1 Fill, Kontext, Canny/Depth (a
//! Control transformer, and a Control LoRA on the plain Flux), Flux
//! ControlNets (InstantX's kind, a Union net, XLabs' kind), true CFG and
//! XLabs' IP-Adapter (its CLIP image encoder on the device too), and Depth
//! Anything's depth maps (against transformers),
//! each run on the committed tiny fixtures in f32 with the VAE encoder and
//! Flux on the device, against the golden the diffusers pipeline made
//! (tests/reference/make_*_fixtures.py). The same goldens are checked on the
//! CPU by `cargo test -p ipaflux-tests`; this puts every mode through the
//! device's kernels (CUDA on a lent GPU).
//!
//! f32 only: the fused kernels take bf16, and their parity is the Flux rows'.

use std::collections::HashMap;
use std::path::Path;

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::ip::{IpHookConfig, IpImage, IpWeight};
use ipaflux_core::flux::kontext::reference_ids;
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{
    AttentionHook, Conditioning, ControlInput, ControlWindow, FluxControlNet, FluxLoad, FluxLora, FluxModel,
    GgufWeights, Hooks, XlabsHook, XlabsIpAdapter,
};
use ipaflux_core::preprocess::{clip_pixel_values, decode_rgb, to_luma, RgbImage};
use ipaflux_core::schedule::{flux_schedule, Shift};

use crate::clip_vision::{load_clip_vision_dir, ClipImageEncoder};
use crate::depth::{load_depth, load_depth_dir, DepthEstimator};
use crate::generate::{control_latents, control_pixels, ImageFile};
use crate::gpu_check::{rel_max_err, CheckOptions, Report, Section, F32_TOL};
use crate::load::{flux_config, load_flux, load_lora, load_store};
use crate::vae::{from_rgb8, VaeEncoder};
use crate::{Error, Result};
use ipaflux_core::depth_anything::DepthPreprocessConfig;

/// A golden's tensors on `device`, read by name.
struct Golden {
    path: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Golden {
    fn read(fixtures: &Path, rel: &str, device: &Device) -> Result<Self> {
        let path = fixtures.join(rel);
        let tensors = ipaflux_core::candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::Io { path: path.clone(), reason: e.to_string() })?;
        Ok(Self { path, tensors })
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Io { path: self.path.clone(), reason: format!("no `{name}`") })
    }
}

/// What a pipeline golden ran: steps, guidance and output size from its `reference.json`.
struct Run {
    steps: usize,
    guidance: f32,
    width: usize,
    height: usize,
}

/// A fixture's `reference.json`.
fn reference(fixtures: &Path, rel: &str) -> Result<serde_json::Value> {
    let path = fixtures.join(rel);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.clone(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| Error::Io { path, reason: e.to_string() })
}

impl Run {
    fn read(fixtures: &Path, rel: &str) -> Result<Self> {
        let (path, v) = (fixtures.join(rel), reference(fixtures, rel)?);
        let n = |x: &serde_json::Value| x.as_u64().map(|x| x as usize);
        match (n(&v["steps"]), v["guidance"].as_f64(), n(&v["image"][0]), n(&v["image"][1])) {
            (Some(steps), Some(g), Some(width), Some(height)) => Ok(Self { steps, guidance: g as f32, width, height }),
            _ => Err(Error::Io { path, reason: "no steps, guidance or image size".into() }),
        }
    }

    /// The sigmas run at `strength` (all of them at 1).
    fn sigmas(&self, strength: f64) -> Result<Vec<f32>> {
        let (rows, cols) = sampler::token_grid(self.width, self.height);
        let mut sigmas = flux_schedule(self.steps, rows * cols, Shift::DEV);
        sigmas.drain(..sampler::img2img_start(self.steps, strength)?);
        Ok(sigmas)
    }

    fn ids(&self) -> Vec<[f32; 3]> {
        let (rows, cols) = sampler::token_grid(self.width, self.height);
        sampler::img_ids(rows, cols)
    }

    fn cond(&self, txt: &Tensor, y: &Tensor) -> Conditioning {
        Conditioning { txt: txt.clone(), y: y.clone(), guidance: Some(self.guidance) }
    }
}

/// A tiny Flux fixture in f32 on `device`, with `loras`.
fn flux(fixtures: &Path, rel: &str, loras: &[FluxLora], device: &Device) -> Result<FluxModel> {
    let files = load_flux(&fixtures.join(rel))?;
    let load = FluxLoad { dtype: DType::F32, device, streamed: &[], gguf: GgufWeights::Quantized, loras };
    Ok(FluxModel::from_store_with(files.weights, files.axes_dim.or(Some(vec![4, 6, 6])), &load)?.0)
}

/// A fixture image file.
fn image_file(fixtures: &Path, rel: &str) -> Result<ImageFile> {
    let path = fixtures.join(rel);
    let bytes = std::fs::read(&path).map_err(|e| Error::Io { path: path.clone(), reason: e.to_string() })?;
    Ok(ImageFile { bytes, name: rel.to_string() })
}

/// What every mode shares: the fixtures on the device, the init image's
/// pixels and latents, img2img's noise and prompt, and the plain tiny Flux.
struct Shared<'a> {
    fx: &'a Path,
    dev: &'a Device,
    i2i: Golden,
    run: Run,
    encoder: VaeEncoder,
    init: ipaflux_core::preprocess::RgbImage,
    pixels: Tensor,
    image: Tensor,
    noise: Tensor,
    plain: FluxModel,
}

impl Shared<'_> {
    /// img2img's prompt at `run`'s guidance.
    fn prompt(&self, run: &Run) -> Result<Conditioning> {
        Ok(run.cond(self.i2i.get("pipe.prompt_embeds")?, self.i2i.get("pipe.pooled")?))
    }
}

/// Euler over `run`'s schedule at `strength`, with `hooks`.
fn sample(
    model: &FluxModel,
    start: Start<'_>,
    guide: Guide<'_>,
    run: &Run,
    strength: f64,
    hooks: Hooks<'_>,
) -> Result<Tensor> {
    Ok(sampler::euler(model, start, &run.ids(), guide, &run.sigmas(strength)?, hooks, &mut |_| {})?)
}

/// Records a mode's row: its relative max error against `want`, or the error that stopped it.
fn check(r: &mut Report, dev: &Device, what: &str, got: Result<Tensor>, want: &Tensor) {
    check_vs(r, dev, what, "diffusers", got, want);
}

/// [`check`] against a golden made by `by`.
fn check_vs(r: &mut Report, dev: &Device, what: &str, by: &str, got: Result<Tensor>, want: &Tensor) {
    let name = if dev.is_cpu() { "CPU" } else { "CUDA" };
    match got.and_then(|g| rel_max_err(&g, want)) {
        Ok(err) => r.check(Section::Parity, format!("{what}, {name} f32 vs {by}"), err, F32_TOL),
        Err(e) => r.check(Section::Parity, format!("{what}, {name} f32 vs {by} (failed: {e})"), f32::INFINITY, 0.0),
    }
}

/// Every mode on `o.device` in f32 against its diffusers golden.
pub fn parity_pipelines(o: &CheckOptions, r: &mut Report) -> Result<()> {
    let (fx, dev) = (o.fixtures.as_path(), &o.device);
    let i2i = Golden::read(fx, "img2img/golden.safetensors", dev)?;
    let encoder = VaeEncoder::new(&load_store(&fx.join("img2img/ae.safetensors"))?, DType::F32, dev)?;
    let init = decode_rgb(&image_file(fx, "img2img/init.png")?.bytes, "init.png")?;
    let pixels = from_rgb8(&init, dev)?;
    let image = sampler::pack(&encoder.encode(&pixels)?)?;
    let noise = sampler::pack(i2i.get("pipe.noise")?)?;
    let plain = flux(fx, "flux/flux-tiny-bfl.safetensors", &[], dev)?;
    let run = Run::read(fx, "img2img/reference.json")?;
    let shared = Shared { fx, dev, i2i, run, encoder, init, pixels, image, noise, plain };
    from_an_init_image(&shared, r)?;
    kontext_and_cfg(&shared, r)?;
    control(&shared, r)?;
    depth(fx, dev, r)?;
    xlabs(&shared, r)
}

/// Depth Anything (transformers' `DepthAnythingForDepthEstimation`, relative
/// and metric) on the device: FLUX.1 Depth's control map at the photo's size.
fn depth(fx: &Path, dev: &Device, r: &mut Report) -> Result<()> {
    let gold = Golden::read(fx, "depth/golden.safetensors", dev)?;
    let photo = image_file(fx, "images/photo.jpg")?;
    for model in ["model", "metric"] {
        let files = load_depth_dir(&fx.join("depth").join(model))?;
        let got = DepthEstimator::new(&files, DType::F32, dev).and_then(|est| {
            let (depth, w, h) = est.depth(&photo.bytes, "photo.jpg")?;
            Ok(Tensor::from_vec(depth, (h, w), dev)?)
        });
        check_vs(
            r,
            dev,
            &format!("Depth Anything ({model})"),
            "transformers",
            got,
            gold.get(&format!("{model}.photo.depth"))?,
        );
    }
    // The original V2 checkpoint (the photo read at 140 pixels, as its golden).
    let gold = Golden::read(fx, "depth/original/golden.safetensors", dev)?;
    let mut files = load_depth(&fx.join("depth/original/depth_anything_v2_tiny.pth"))?;
    files.preprocess = DepthPreprocessConfig::original(140);
    let got = DepthEstimator::new(&files, DType::F32, dev).and_then(|est| {
        let (depth, w, h) = est.depth(&photo.bytes, "photo.jpg")?;
        Ok(Tensor::from_vec(depth, (h, w), dev)?)
    });
    check_vs(r, dev, "Depth Anything V2 original .pth", "its repository", got, gold.get("model.photo.depth")?);
    Ok(())
}

/// Image-to-image, inpainting and FLUX.1 Fill (FluxImg2ImgPipeline,
/// FluxInpaintPipeline, FluxFillPipeline: the masked image's latents and the
/// 8×8 mask as channels).
fn from_an_init_image(c: &Shared<'_>, r: &mut Report) -> Result<()> {
    let (fx, dev, run) = (c.fx, c.dev, &c.run);
    let prompt = c.prompt(run)?;
    let img2img = Start::Image { image: &c.image, noise: &c.noise, mask: None };
    let out = sample(&c.plain, img2img, Guide::prompt(&prompt), run, 0.6, Hooks::none());
    check(r, dev, "image-to-image 0.6", out, c.i2i.get("pipe.latents.0.6")?);
    let inpaint = Golden::read(fx, "inpaint/golden.safetensors", dev)?;
    let luma = to_luma(&decode_rgb(&image_file(fx, "inpaint/mask.png")?.bytes, "mask.png")?);
    let mask = sampler::latent_mask(&luma, run.width, run.height, dev)?;
    let start = Start::Image { image: &c.image, noise: &c.noise, mask: Some(&mask) };
    let out = sample(&c.plain, start, Guide::prompt(&prompt), run, 0.6, Hooks::none());
    check(r, dev, "inpainting 0.6", out, inpaint.get("out.mask.0.6")?);

    let fill = Golden::read(fx, "fill/golden.safetensors", dev)?;
    let plane = sampler::mask_plane(&luma, run.width, run.height, dev)?;
    let masked = sampler::pack(&c.encoder.encode(&c.pixels.broadcast_mul(&plane.affine(-1.0, 1.0)?)?)?)?;
    let cond = Tensor::cat(&[&masked, &sampler::fill_mask(&plane)?], 2)?;
    let fill_run = Run::read(fx, "fill/reference.json")?;
    let fill_prompt = c.prompt(&fill_run)?;
    let model = flux(fx, "fill/transformer", &[], dev)?;
    let start = Start::Image { image: &c.image, noise: &c.noise, mask: None };
    let guide = Guide { channels: Some(&cond), ..Guide::prompt(&fill_prompt) };
    check(r, dev, "FLUX.1 Fill 1.0", sample(&model, start, guide, &fill_run, 1.0, Hooks::none()), fill.get("out.1.0")?);
    Ok(())
}

/// FLUX.1 Kontext (FluxKontextPipeline: the init image's tokens after the
/// latents') and true CFG 4 (FluxPipeline's `true_cfg_scale`).
fn kontext_and_cfg(c: &Shared<'_>, r: &mut Report) -> Result<()> {
    let (fx, dev) = (c.fx, c.dev);
    let kontext = Golden::read(fx, "kontext/golden.safetensors", dev)?;
    let k_run = Run::read(fx, "kontext/reference.json")?;
    let tile = sampler::PIXELS_PER_TOKEN;
    let ref_ids = reference_ids(c.init.height / tile, c.init.width / tile);
    let k_prompt = c.prompt(&k_run)?;
    let guide = Guide { reference: Some((&c.image, &ref_ids)), ..Guide::prompt(&k_prompt) };
    let out = sample(&c.plain, Start::Noise(kontext.get("latents")?), guide, &k_run, 1.0, Hooks::none());
    check(r, dev, "FLUX.1 Kontext", out, kontext.get("out")?);

    // Kontext inpainting (FluxKontextInpaintPipeline): the init image, its mask, and itself as the reference.
    let inpaint = Golden::read(fx, "kontext/inpaint-golden.safetensors", dev)?;
    let ki_run = Run::read(fx, "kontext/inpaint-reference.json")?;
    let strength = reference(fx, "kontext/inpaint-reference.json")?["strength"].as_f64().unwrap_or(1.0);
    let luma = to_luma(&decode_rgb(&image_file(fx, "inpaint/mask.png")?.bytes, "mask.png")?);
    let mask = sampler::latent_mask(&luma, ki_run.width, ki_run.height, dev)?;
    let start = Start::Image { image: &c.image, noise: &c.noise, mask: Some(&mask) };
    let guide = Guide { reference: Some((&c.image, &ref_ids)), ..Guide::prompt(&k_prompt) };
    let out = sample(&c.plain, start, guide, &ki_run, strength, Hooks::none());
    check(r, dev, "FLUX.1 Kontext inpainting", out, inpaint.get("out.self")?);

    let cfg = Golden::read(fx, "cfg/golden.safetensors", dev)?;
    let c_run = Run::read(fx, "cfg/reference.json")?;
    let positive = c_run.cond(cfg.get("prompt_embeds")?, cfg.get("pooled")?);
    let negative = c_run.cond(cfg.get("negative_prompt_embeds")?, cfg.get("negative_pooled")?);
    let guide = Guide { negative: Some((&negative, 4.0)), ..Guide::prompt(&positive) };
    let out = sample(&c.plain, Start::Noise(cfg.get("latents")?), guide, &c_run, 1.0, Hooks::none());
    check(r, dev, "true CFG 4", out, cfg.get("out.4.0")?);
    Ok(())
}

/// FLUX.1 Canny/Depth (FluxControlPipeline): a Control transformer, and a
/// Control LoRA on the plain Flux.
fn control(c: &Shared<'_>, r: &mut Report) -> Result<()> {
    let (fx, dev) = (c.fx, c.dev);
    let control = Golden::read(fx, "control/golden.safetensors", dev)?;
    let lora_gold = Golden::read(fx, "control/lora-golden.safetensors", dev)?;
    let run = Run::read(fx, "control/reference.json")?;
    let prompt = c.prompt(&run)?;
    let file = image_file(fx, "control/control.png")?;
    let latents = control_latents(&c.encoder, &decode_rgb(&file.bytes, "control.png")?, (run.width, run.height), dev)?;
    let guide = Guide { channels: Some(&latents), ..Guide::prompt(&prompt) };
    let model = flux(fx, "control/transformer", &[], dev)?;
    let out = sample(&model, Start::Noise(&c.noise), guide, &run, 1.0, Hooks::none());
    check(r, dev, "FLUX.1 Canny/Depth", out, control.get("out.t2i")?);
    drop(model);
    let base_cfg = flux_config(&fx.join("flux/flux-tiny-bfl.safetensors"))?;
    let strength = reference(fx, "control/reference.json")?["lora_strength"].as_f64().unwrap_or(1.0);
    let lora = load_lora(&fx.join("control/lora-bfl.safetensors"), &base_cfg, strength)?;
    let model = flux(fx, "flux/flux-tiny-bfl.safetensors", &[lora], dev)?;
    let out = sample(&model, Start::Noise(&c.noise), guide, &run, 1.0, Hooks::none());
    check(r, dev, "Control LoRA", out, lora_gold.get("out.t2i")?);
    drop(model);
    controlnets(c, &latents, r)
}

/// Flux ControlNets (FluxControlNetPipeline): InstantX's kind (blocks feeding
/// several Flux blocks, a window), a Union net in a mode with true CFG, and
/// XLabs' kind (its hint block on the control image's pixels, on the device).
fn controlnets(c: &Shared<'_>, latents: &Tensor, r: &mut Report) -> Result<()> {
    let (fx, dev) = (c.fx, c.dev);
    let gold = Golden::read(fx, "controlnet/golden.safetensors", dev)?;
    let v = reference(fx, "controlnet/reference.json")?;
    let run = Run::read(fx, "controlnet/reference.json")?;
    let prompt = c.prompt(&run)?;
    let negative = run.cond(gold.get("negative.embeds")?, gold.get("negative.pooled")?);
    let model = flux(fx, "flux/transformer", &[], dev)?;
    let file = image_file(fx, "control/control.png")?;
    let pixels = control_pixels(&decode_rgb(&file.bytes, "control.png")?, (run.width, run.height), dev)?;
    let nets = [("canny", "ControlNet"), ("union", "Union ControlNet, true CFG"), ("xlabs", "XLabs ControlNet")];
    for (name, what) in nets {
        let files = crate::load::load_controlnet(&fx.join("controlnet").join(name))?;
        let net = FluxControlNet::from_store(files.weights, files.axes_dim, DType::F32, dev)?;
        let s = &v[name];
        let input = ControlInput {
            net: &net,
            image: if net.takes_pixels() { &pixels } else { latents },
            mode: s["mode"].as_u64().map(|m| m as usize),
            scale: s["scale"].as_f64().unwrap_or(1.0),
            window: ControlWindow::Steps {
                start: s["start"].as_f64().unwrap_or(0.0),
                end: s["end"].as_f64().unwrap_or(1.0),
            },
        };
        let negative = s["true_cfg"].as_f64().map(|scale| (&negative, scale as f32));
        let guide = Guide { control: &[input], negative, ..Guide::prompt(&prompt) };
        let out = sample(&model, Start::Noise(&c.noise), guide, &run, 1.0, Hooks::none());
        check(r, dev, what, out, gold.get(&format!("out.{name}"))?);
    }
    // The Canny net with every block streamed, from where generate keeps
    // streamed blocks on this device (CUDA: pinned memory, a copy stream).
    let files = crate::load::load_controlnet(&fx.join("controlnet/canny"))?;
    let blocks = ipaflux_core::flux::BlockId::all(&ipaflux_core::flux::ControlNetDims::infer(&files.weights)?.blocks);
    let (mut net, kept) = FluxControlNet::from_store_streamed(files.weights, files.axes_dim, DType::F32, dev, &blocks)?;
    net.set_block_source(crate::generate::block_source(kept, &blocks, dev)?);
    let s = &v["canny"];
    let input = ControlInput {
        net: &net,
        image: latents,
        mode: None,
        scale: s["scale"].as_f64().unwrap_or(1.0),
        window: ControlWindow::Steps {
            start: s["start"].as_f64().unwrap_or(0.0),
            end: s["end"].as_f64().unwrap_or(1.0),
        },
    };
    let guide = Guide { control: &[input], ..Guide::prompt(&prompt) };
    let out = sample(&model, Start::Noise(&c.noise), guide, &run, 1.0, Hooks::none());
    check(r, dev, "ControlNet, blocks streamed", out, gold.get("out.canny")?);
    multi_controlnets(c, &model, r)
}

/// Several ControlNets at once (`FluxMultiControlNetModel`): two nets on two
/// control images, each with its own scale and window.
fn multi_controlnets(c: &Shared<'_>, model: &FluxModel, r: &mut Report) -> Result<()> {
    let (fx, dev) = (c.fx, c.dev);
    let gold = Golden::read(fx, "controlnet/multi-golden.safetensors", dev)?;
    let pair = &reference(fx, "controlnet/multi-reference.json")?["pair"];
    let run = Run::read(fx, "controlnet/reference.json")?;
    let prompt = c.prompt(&run)?;
    let nets = ["canny", "depth"]
        .map(|name| -> Result<FluxControlNet> {
            let files = crate::load::load_controlnet(&fx.join("controlnet").join(name))?;
            Ok(FluxControlNet::from_store(files.weights, files.axes_dim, DType::F32, dev)?)
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let conds = [gold.get("cond.0")?, gold.get("cond.1")?];
    let at = |key: &str, i: usize, default: f64| pair[key][i].as_f64().unwrap_or(default);
    let inputs: Vec<ControlInput<'_>> = (0..2)
        .map(|i| ControlInput {
            net: &nets[i],
            image: conds[i],
            mode: None,
            scale: at("scale", i, 1.0),
            window: ControlWindow::Steps { start: at("start", i, 0.0), end: at("end", i, 1.0) },
        })
        .collect();
    let guide = Guide { control: &inputs, ..Guide::prompt(&prompt) };
    let out = sample(model, Start::Noise(&c.noise), guide, &run, 1.0, Hooks::none());
    check(r, dev, "two ControlNets", out, gold.get("out.pair")?);
    Ok(())
}

/// XLabs' IP-Adapter (FluxPipeline.load_ip_adapter): CLIP on the device, its
/// term after each double block's MLP.
fn xlabs(c: &Shared<'_>, r: &mut Report) -> Result<()> {
    let (fx, dev) = (c.fx, c.dev);
    let xlabs = Golden::read(fx, "xlabs/golden.safetensors", dev)?;
    let run = Run::read(fx, "xlabs/reference.json")?;
    let clip = ClipImageEncoder::new(&load_clip_vision_dir(&fx.join("xlabs/image_encoder"))?, DType::F32, dev)?;
    let embeds = clip.image_embeds(&clip.pixels(&image_file(fx, "images/photo.jpg")?.bytes, "photo.jpg")?)?;
    check(r, dev, "XLabs CLIP image_embeds", Ok(embeds.clone()), xlabs.get("image_embeds")?);
    let adapter = XlabsIpAdapter::from_store(&load_store(&fx.join("xlabs/ip_adapter.safetensors"))?, DType::F32, dev)?;
    let kv = adapter.kv_all(&adapter.project(&embeds)?, c.plain.cfg.head_dim())?;
    let scale = reference(fx, "xlabs/reference.json")?["scale"].as_f64().unwrap_or(1.0);
    let cfg = IpHookConfig { weight: IpWeight::Constant(scale), ..IpHookConfig::default() };
    let hook = XlabsHook::new(vec![IpImage { kv, weight: 1.0 }], cfg.clone(), &c.plain.cfg)?;
    let hooks: [&dyn AttentionHook; 1] = [&hook];
    let prompt = c.prompt(&run)?;
    let out =
        sample(&c.plain, Start::Noise(xlabs.get("latents")?), Guide::prompt(&prompt), &run, 1.0, Hooks::new(&hooks));
    check(r, dev, "XLabs IP-Adapter", out, xlabs.get("out")?);

    // With FLUX.1 Kontext (FluxKontextPipeline + load_ip_adapter): the image to edit's tokens too.
    let k_gold = Golden::read(fx, "kontext/ip-golden.safetensors", dev)?;
    let kontext = Golden::read(fx, "kontext/golden.safetensors", dev)?;
    let k_run = Run::read(fx, "kontext/ip-reference.json")?;
    let tile = sampler::PIXELS_PER_TOKEN;
    let ref_ids = reference_ids(c.init.height / tile, c.init.width / tile);
    let k_prompt = c.prompt(&k_run)?;
    let guide = Guide { reference: Some((&c.image, &ref_ids)), ..Guide::prompt(&k_prompt) };
    let out = sample(&c.plain, Start::Noise(kontext.get("latents")?), guide, &k_run, 1.0, Hooks::new(&hooks));
    check(r, dev, "FLUX.1 Kontext with XLabs IP-Adapter", out, k_gold.get("out")?);

    // Under true CFG 4 with diffusers' black image in the negative pass.
    let gold = Golden::read(fx, "xlabs/cfg-golden.safetensors", dev)?;
    let cfg_gold = Golden::read(fx, "cfg/golden.safetensors", dev)?;
    let run = Run::read(fx, "xlabs/cfg-reference.json")?;
    let black = RgbImage { width: run.height, height: run.width, data: vec![0; run.width * run.height * 3] };
    let pixels = clip_pixel_values(&black, &clip.preprocess)?.to_device(dev)?;
    let black_kv = adapter.kv_all(&adapter.project(&clip.image_embeds(&pixels)?)?, c.plain.cfg.head_dim())?;
    let black_hook = XlabsHook::new(vec![IpImage { kv: black_kv, weight: 1.0 }], cfg, &c.plain.cfg)?;
    let negative_hooks: [&dyn AttentionHook; 1] = [&black_hook];
    let positive = run.cond(cfg_gold.get("prompt_embeds")?, cfg_gold.get("pooled")?);
    let negative = run.cond(cfg_gold.get("negative_prompt_embeds")?, cfg_gold.get("negative_pooled")?);
    let true_cfg = reference(fx, "xlabs/cfg-reference.json")?["true_cfg"].as_f64().unwrap_or(1.0) as f32;
    let guide = Guide {
        negative: Some((&negative, true_cfg)),
        negative_hooks: Some(Hooks::new(&negative_hooks)),
        ..Guide::prompt(&positive)
    };
    let out = sample(&c.plain, Start::Noise(cfg_gold.get("latents")?), guide, &run, 1.0, Hooks::new(&hooks));
    check(r, dev, "XLabs IP-Adapter, true CFG, black negative", out, gold.get("out.black")?);
    Ok(())
}
