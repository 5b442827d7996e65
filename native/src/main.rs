//! The `ipaflux` command line. See README.md for the commands.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipaflux::{bench, bench_flux, bench_webgpu, demo, encode, generate, gpu_check, load, plan, png_out};
use ipaflux_core::flux::sampler::FluxVariant;
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
    /// Run the main job on bundled tiny random models: text encoders, reference-image encoding,
    /// IP K/V, Flux sampling with the IP-Adapter, VAE decode; prints the memory timeline, writes a PNG.
    Demo {
        /// The PNG to write.
        #[arg(long, default_value = "ipaflux-demo.png")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Generate an image from a text prompt and reference images (the full FLUX.1 + IP-Adapter pipeline).
    Generate(Box<GenerateArgs>),
    /// The Canny edge map of an image, as OpenCV's `cv2.Canny(rgb, low, high)` makes it (what
    /// diffusers' FLUX.1 Canny examples feed `control_image`), pixel for pixel; at the image's size.
    Canny {
        image: PathBuf,
        /// Hysteresis thresholds on the L1 Sobel magnitude (controlnet_aux's defaults).
        #[arg(long, default_value_t = DEFAULT_CANNY.0)]
        low: f64,
        #[arg(long, default_value_t = DEFAULT_CANNY.1)]
        high: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// The depth map of an image, as ComfyUI's Depth Anything preprocessor makes it for FLUX.1 Depth:
    /// Depth Anything (V1 or V2, relative or metric) at the image's size, scaled so its range spans
    /// 0..255, near bright (a metric model's map is turned over, as ComfyUI does); an 8-bit gray PNG.
    Depth {
        image: PathBuf,
        /// Depth Anything folder in transformers' layout (config.json + model.safetensors), its Hugging
        /// Face cache entry or repo id, e.g. depth-anything/Depth-Anything-V2-Small-hf (transformers'
        /// pipeline); or an original V2 checkpoint file as ComfyUI's preprocessor loads it,
        /// depth_anything_v2_vitl.pth or a safetensors conversion (the original repository's pipeline
        /// at 518 pixels; "metric" in the file name for the metric models).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "f32")]
        dtype: Precision,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// What a checkpoint file holds, from its header: format, tensors by stored type (GGUF's
    /// quantization types too), and for a Flux transformer the memory it takes loaded.
    Inspect {
        /// A safetensors, GGUF or PyTorch zip file.
        file: PathBuf,
    },
    /// Write a smaller copy of a SigLIP folder for the browser (or any ipaflux encoder): the linear
    /// layers' weights in f16, q8 or q4 (the WebGPU kernels' formats; the CPU dequantizes them on load).
    Quantize {
        /// SigLIP folder (config.json + model.safetensors or a sharded index), or its Hugging Face cache entry.
        #[arg(long)]
        siglip: PathBuf,
        /// f16, q8 or q4 (f32 also works: a plain f32 copy).
        #[arg(long)]
        format: ipaflux_core::quant::WeightFormat,
        /// Output folder (created; config.json and preprocessor_config.json are copied along).
        #[arg(long)]
        out: PathBuf,
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
        #[arg(long, default_value = "on")]
        offload_preprocessing: OnOff,
        /// Eviction policy: furthest-next-use, lru, largest-first or comfyui.
        #[arg(long, default_value = "furthest-next-use")]
        policy: EvictionPolicy,
        /// A built-in scenario (flux-dev-ipadapter, flux-dev-controlnet) or a scenario JSON file (schema in ARCHITECTURE.md).
        #[arg(long, default_value = "flux-dev-ipadapter")]
        scenario: String,
        /// Sampler steps (the uses of stages with "repeat": "steps").
        #[arg(long, default_value_t = scenario::DEFAULT_STEPS)]
        steps: u64,
        /// Print JSON: {events, summary, stages}.
        #[arg(long)]
        json: bool,
    },
    /// Check and measure on a GPU: parity with the CPU and the PyTorch goldens, fused attention,
    /// registry vs driver, benchmarks at the real shapes; one table (scripts/gpu-check.sh).
    GpuCheck {
        /// The device under test (`cuda:0`, or `cpu` for a smoke run).
        #[arg(long, default_value = "cuda:0")]
        device: DeviceSpec,
        /// This repository's `tests/fixtures`.
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Small models instead of the real shapes (seconds, any device).
        #[arg(long)]
        quick: bool,
        /// Only these sections; repeatable.
        #[arg(long = "section", value_enum)]
        sections: Vec<gpu_check::Section>,
        /// PyTorch's figures from the same card (JSON from scripts/gpu_bench_torch.py).
        #[arg(long)]
        torch: Option<PathBuf>,
        /// Also write the table here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Attention version 8 (not yet run on a GPU): with the rest, left out, or alone.
        #[arg(long, value_enum, default_value_t)]
        wgmma: gpu_check::Wgmma,
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
        /// Instead: one Flux transformer step at FLUX.1-dev shapes, without IP, with cached and recomputed IP K/V.
        #[arg(long)]
        flux: bool,
        /// Image side for --flux (1024 → 4096 image tokens).
        #[arg(long, default_value_t = 1024)]
        flux_size: usize,
        /// Double and single blocks for --flux (reduced depth on the CPU; FLUX.1 has 19 and 38).
        #[arg(long, num_args = 2, default_values_t = [1, 1])]
        flux_depth: Vec<usize>,
        #[arg(long, default_value = "f32")]
        flux_dtype: Precision,
        /// Device for --flux (`cuda:0` uses the fused attention; peak memory is then the host's only).
        #[arg(long, default_value = "cpu")]
        flux_device: DeviceSpec,
        /// Only the plain step for --flux (no IP variants): what a kernel profiler should see.
        #[arg(long)]
        flux_plain: bool,
        /// Fused CUDA kernels for --flux on a CUDA device.
        #[arg(long, value_enum, default_value_t)]
        cuda_kernels: ipaflux::KernelSet,
        /// Instead: the encoder on the native wgpu adapter (the browser's WGSL kernels) vs candle on the CPU.
        #[arg(long)]
        webgpu: bool,
        /// Encoder layers for --webgpu (timed at N and N+1, extrapolated to 27).
        #[arg(long, default_value_t = 1)]
        webgpu_layers: usize,
        /// Weight formats for --webgpu.
        #[arg(long, value_delimiter = ',', default_value = "f32,q8")]
        webgpu_formats: Vec<String>,
        /// Python interpreter with torch and transformers.
        #[arg(long, env = "IPAFLUX_PYTHON", default_value = "python3")]
        python: String,
    },
}

/// A switch given as `on` or `off`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// `--gguf-weights`: how a GGUF Flux's quantized weights are held.
#[derive(Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
enum GgufMode {
    /// As stored; each layer dequantizes its weight as it runs (the memory of the file).
    #[default]
    Quantized,
    /// Dequantized to --dtype as they load (the memory of a dense model, no work per step).
    Dequantized,
}

impl From<GgufMode> for ipaflux_core::flux::GgufWeights {
    fn from(m: GgufMode) -> Self {
        match m {
            GgufMode::Quantized => Self::Quantized,
            GgufMode::Dequantized => Self::Dequantized,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Flux transformer: BFL single file (bf16/fp16/fp8-e4m3), GGUF file (ComfyUI-GGUF's; see --gguf-weights),
    /// diffusers folder, repo folder or HF repo id.
    #[arg(long)]
    flux: PathBuf,
    /// T5 encoder: folder with config.json, weights and tokenizer.json, a FLUX.1 repo folder / HF repo id,
    /// or a single file: safetensors or a llama.cpp-named GGUF encoder (with --t5-tokenizer).
    #[arg(long)]
    t5: PathBuf,
    /// CLIP-L text encoder: folder with config.json, weights and tokenizer.json, a FLUX.1 repo folder / HF repo id,
    /// or a single file (with --clip-tokenizer).
    #[arg(long)]
    clip: PathBuf,
    /// tokenizer.json for a single-file --t5 (ComfyUI's t5xxl_*.safetensors); a file, folder or HF repo id.
    #[arg(long)]
    t5_tokenizer: Option<PathBuf>,
    /// tokenizer.json for a single-file --clip (ComfyUI's clip_l.safetensors); a file, folder or HF repo id.
    #[arg(long)]
    clip_tokenizer: Option<PathBuf>,
    /// VAE: BFL ae.safetensors, a diffusers AutoencoderKL folder (config.json +
    /// diffusion_pytorch_model.safetensors), or a repo folder holding either (`vae/`).
    #[arg(long)]
    vae: PathBuf,
    /// IP-Adapter (needed for --image and --embeds): InstantX's ip-adapter.bin or a flat
    /// .safetensors, or XLabs' ip_adapter.safetensors (flux-ip-adapter v1/v2; told by its names).
    #[arg(long)]
    ip_adapter: Option<PathBuf>,
    /// SigLIP folder or HF repo id (needed for --image with InstantX's adapter, and --redux-image).
    #[arg(long)]
    siglip: Option<PathBuf>,
    /// CLIP vision folder or HF repo id, for --image with XLabs' IP-Adapter: openai/clip-vit-large-patch14
    /// (a whole CLIP or a CLIPVisionModelWithProjection, e.g. an image_encoder/ folder), or one
    /// .safetensors without config (ComfyUI's clip_vision_l.safetensors).
    #[arg(long)]
    clip_vision: Option<PathBuf>,
    /// FLUX.1 Redux image embedder: flux1-redux-dev.safetensors, or the FLUX.1-Redux-dev repo
    /// folder / HF repo id (its image_embedder/); needed for --redux-image.
    #[arg(long)]
    redux: Option<PathBuf>,
    /// An image for FLUX.1 Redux (repeatable): SigLIP's tokens of it, through the Redux model,
    /// follow the prompt's T5 tokens (729 more tokens each at 384²).
    #[arg(long)]
    redux_image: Vec<PathBuf>,
    /// Strength per Redux image, in order; one value applies to all. Multiplies its tokens
    /// (ComfyUI's StyleModelApply, "multiply"). Range 0..10.
    #[arg(long, value_delimiter = ',', default_value = "1.0")]
    redux_strength: Vec<f64>,
    /// Reference image (repeatable).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Embeddings written by `ipaflux encode` (or the browser) instead of an image (repeatable).
    #[arg(long)]
    embeds: Vec<PathBuf>,
    /// Weight per reference, in order (images, then embeds); one value applies to all. Range -1..5.
    #[arg(long, value_delimiter = ',', default_value = "1.0")]
    ip_weight: Vec<f64>,
    /// Linear weight ramp from --weight-start to --weight-end over the sampler steps (ComfyUI's Advanced node);
    /// multiplies each reference's --ip-weight.
    #[arg(long, requires = "weight_end")]
    weight_start: Option<f64>,
    #[arg(long, requires = "weight_start")]
    weight_end: Option<f64>,
    /// Per-block weights: 57 values (19 double, then 38 single), comma-separated; `;` may separate the two groups.
    #[arg(long)]
    block_weights: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    start_percent: f64,
    #[arg(long, default_value_t = 1.0)]
    end_percent: f64,
    /// IP V-norm variant: instantx (reference, no V-norm) or comfyui (V-norm).
    #[arg(long, default_value = "instantx")]
    v_norm: ipaflux_core::VNorm,
    /// With --true-cfg: what the IP-Adapter sees in the negative pass: `same` (the references, as
    /// ComfyUI), `black` (a black image, as diffusers' FluxPipeline does by default) or an image file
    /// (diffusers' `negative_ip_adapter_image`), read with the references' encoder.
    #[arg(long, default_value = "same", value_name = "same|black|IMAGE")]
    ip_negative: PathBuf,
    #[arg(long)]
    prompt: String,
    /// True classifier-free guidance: also run the model on --negative-prompt each step and take
    /// `neg + SCALE · (pos − neg)` (diffusers' `true_cfg_scale`, ComfyUI's `cfg`); twice the work a step.
    /// 1 (the default) is off: FLUX.1-dev's distilled --guidance alone.
    #[arg(long, default_value_t = 1.0)]
    true_cfg: f32,
    /// The negative prompt for --true-cfg above 1 (default: the empty prompt).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image-to-image: start from this picture (PNG, JPEG, WebP) instead of noise. It is resized
    /// (Lanczos) to --width × --height, which default to its own size rounded down to multiples of 16.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// With --init-image: the share of --steps run on it, in (0, 1], as diffusers' `strength`
    /// (ComfyUI's `denoise` D with S steps is about --steps S/D --strength D); 1 ignores the image
    /// (but for FLUX.1 Fill's conditioning). [default: 0.6; 1 with FLUX.1 Fill, as diffusers]
    #[arg(long, requires = "init_image")]
    strength: Option<f64>,
    /// With --init-image: inpaint. White repaints, black keeps (the luma, binarised at one half, as
    /// diffusers' FluxInpaintPipeline); resized (Lanczos) to the output size like the image.
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// FLUX.1 Kontext (give FLUX.1-Kontext-dev as --flux): the image to edit. Its VAE latents follow the
    /// latents' tokens at every step, as diffusers' FluxKontextPipeline (Kontext-dev is used with --guidance 2.5).
    #[arg(long)]
    kontext_image: Option<PathBuf>,
    /// Resize the Kontext image to the closest of Kontext's trained resolutions first (as diffusers);
    /// `off` keeps its size, cropped down to multiples of 16.
    #[arg(long, default_value = "on", requires = "kontext_image")]
    kontext_auto_resize: OnOff,
    /// FLUX.1 Canny or Depth (give FLUX.1-Canny-dev or -Depth-dev as --flux): the control image, an
    /// edge or depth map made by your preprocessor (as diffusers' FluxControlPipeline takes it). It is
    /// resized (Lanczos) to the output size and its VAE latents go in beside the latents at every step
    /// (the models are used with --guidance 30 for Canny, 10 for Depth). Works with --init-image and --mask.
    /// With --controlnet: the image the ControlNets follow; give it once per --controlnet (in order) for
    /// nets that follow different images, or once for all.
    #[arg(long)]
    control_image: Vec<PathBuf>,
    /// With --control-image: use its Canny edge map (OpenCV's, thresholds LOW,HIGH, e.g. 100,200; as
    /// `ipaflux canny` writes it) instead of the image itself: a photo in, FLUX.1 Canny's control out
    /// (every control image's, or those --control-map says `canny`).
    #[arg(long, value_parser = parse_canny, requires = "control_image")]
    control_canny: Option<(f64, f64)>,
    /// With --control-image: use its depth map, made by this Depth Anything model (a transformers
    /// folder or repo id, e.g. depth-anything/Depth-Anything-V2-Small-hf, or an original V2 checkpoint
    /// file, depth_anything_v2_vitl.pth; as `ipaflux depth` writes it), instead of the image itself: a photo
    /// in, FLUX.1 Depth's control out (every control image's, or those --control-map says `depth`). The
    /// depth model is a registry entry ("depth"), on --device in
    /// --dtype, loaded in a stage of its own (once for all depth maps) and released there.
    #[arg(long, requires = "control_image")]
    control_depth: Option<PathBuf>,
    /// What each --control-image becomes: `given` (used as it is), `canny` (its edges, at --control-canny's
    /// thresholds, else 100,200) or `depth` (its map by --control-depth's model); once for all images, or once
    /// per --control-image: e.g. the same photo twice, `canny` then `depth`, for two ControlNets
    /// [default: canny with --control-canny, depth with --control-depth, else given]
    #[arg(long, value_enum, requires = "control_image")]
    control_map: Vec<MapArg>,
    /// A Flux ControlNet for FLUX.1-dev or schnell (InstantX's, Shakker-Labs' or XLabs': a diffusers folder or
    /// repo id, e.g. InstantX/FLUX.1-dev-Controlnet-Canny, or its .safetensors file as ComfyUI keeps it, XLabs'
    /// flux-canny-controlnet-v3.safetensors too)
    /// that follows --control-image (as given, or its --control-map), as diffusers'
    /// FluxControlNetPipeline: each step it runs on the latents and the control image's VAE latents, and its
    /// residuals join Flux's blocks (both passes with --true-cfg). A registry entry ("controlnet") loaded
    /// beside Flux for sampling, in --dtype. Give it several times for several ControlNets (ComfyUI's chained
    /// Apply ControlNet): their residuals add up, each net mapped onto Flux's blocks by its own depth. The
    /// same file given twice (a Union net in two modes) is loaded once; other files are entries
    /// "controlnet-2", ….
    #[arg(long, requires = "control_image")]
    controlnet: Vec<PathBuf>,
    /// The ControlNet's strength (diffusers' controlnet_conditioning_scale; InstantX suggest 0.5-0.7 for Canny);
    /// once for all nets or once per --controlnet [default: 1]
    #[arg(long, requires = "controlnet")]
    controlnet_scale: Vec<f64>,
    /// The fraction of the steps before which the ControlNet is off (diffusers' control_guidance_start);
    /// once for all nets or once per --controlnet [default: 0]
    #[arg(long, requires = "controlnet")]
    controlnet_start: Vec<f64>,
    /// The fraction of the steps after which the ControlNet is off again (control_guidance_end); once for
    /// all nets or once per --controlnet [default: 1]
    #[arg(long, requires = "controlnet")]
    controlnet_end: Vec<f64>,
    /// ComfyUI's window instead (Apply ControlNet's start_percent): the ControlNet is on from the sigma this
    /// percent of the schedule maps to; once for all nets or once per --controlnet [default: 0]
    #[arg(long, requires = "controlnet", conflicts_with_all = ["controlnet_start", "controlnet_end"])]
    controlnet_start_percent: Vec<f64>,
    /// ComfyUI's end_percent: the ControlNet is off below the sigma this percent maps to; once for all nets
    /// or once per --controlnet [default: 1: to the end]
    #[arg(long, requires = "controlnet", conflicts_with_all = ["controlnet_start", "controlnet_end"])]
    controlnet_end_percent: Vec<f64>,
    /// A Union ControlNet's mode: canny, tile, depth, blur, pose, gray, lq, or its number; once for all nets
    /// or once per --controlnet (`none` for a net that is not a Union net) [default: canny where the net's
    /// image is a canny --control-map, depth where it is a depth map]
    #[arg(long, value_parser = parse_control_mode, requires = "controlnet")]
    controlnet_mode: Vec<ControlMode>,
    /// Output width [default: 1024, or the init image's, the (resized) Kontext image's or the control image's]
    #[arg(long)]
    width: Option<usize>,
    /// Output height [default: 1024, or the init image's, the (resized) Kontext image's or the control image's]
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    #[arg(long, default_value_t = 3.5)]
    guidance: f32,
    /// The first image's seed; with --batch N, image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images to make with one load of every model (seeds seed, seed+1, …). With more than
    /// one, each is written next to --out as STEM-SEED.png.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// T5 sequence length: 512 for dev, 256 for schnell.
    #[arg(long, default_value_t = ipaflux::text::T5_MAX_LEN_DEV)]
    t5_max_len: usize,
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, default_value = "normal")]
    vram_state: VramState,
    /// Plan with at most this much of the GPU (e.g. `12GiB`): Flux blocks that do not fit are
    /// streamed from pinned host memory, one block ahead of use.
    #[arg(long)]
    vram_budget: Option<String>,
    /// Fused CUDA kernels: `fast` (the default) or `baseline` (the first set measured, to compare).
    #[arg(long, value_enum, default_value_t)]
    cuda_kernels: ipaflux::KernelSet,
    /// A GGUF Flux's quantized weights: kept `quantized` (dequantized per layer as it runs) or
    /// `dequantized` as they load.
    #[arg(long, value_enum, default_value_t)]
    gguf_weights: GgufMode,
    /// A LoRA, `FILE`, `FILE:STRENGTH` or `FILE:STRENGTH:TEXT_STRENGTH` (default 1.0; the text
    /// encoders' strength defaults to Flux's; repeatable): kohya/sd-scripts, BFL or diffusers (PEFT)
    /// names, its CLIP-L and T5 parts applied to those encoders.
    #[arg(long, value_parser = parse_lora)]
    lora: Vec<generate::LoraArg>,
    #[arg(long, default_value = "on")]
    offload_preprocessing: OnOff,
    /// Print the memory registry's timeline.
    #[arg(long)]
    verbose: bool,
    #[arg(long)]
    out: PathBuf,
}

/// An image file read for `what` (named in the error if it cannot be read).
fn image_file(path: &std::path::Path, what: &str) -> anyhow::Result<generate::ImageFile> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    Ok(generate::ImageFile { bytes, name: path.display().to_string() })
}

/// `--ip-negative`: `same`, `black`, or an image file (`./same` for a file named so).
fn ip_negative(arg: &std::path::Path) -> anyhow::Result<generate::IpNegative> {
    Ok(match arg.to_str() {
        Some("same") => generate::IpNegative::Same,
        Some("black") => generate::IpNegative::Black,
        _ => generate::IpNegative::Image(image_file(arg, "negative IP image (--ip-negative)")?),
    })
}

/// `--controlnet-mode`: a Union ControlNet's mode, or none (a single-purpose net).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ControlMode(Option<usize>);

/// A Union ControlNet's mode by name ([`generate::UNION_MODES`]) or number, or `none`.
fn parse_control_mode(s: &str) -> Result<ControlMode, String> {
    let name = s.trim().to_ascii_lowercase();
    match generate::UNION_MODES.iter().position(|m| *m == name) {
        Some(i) => Ok(ControlMode(Some(i))),
        None if name == "none" => Ok(ControlMode(None)),
        None => name.parse::<usize>().map(|i| ControlMode(Some(i))).map_err(|_| {
            format!("`{s}`: give a mode name ({}), its number, or none", generate::UNION_MODES.join(", "))
        }),
    }
}

/// `--control-map`: what a control image becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum MapArg {
    Given,
    Canny,
    Depth,
}

/// controlnet_aux's Canny thresholds, `ipaflux canny`'s and `--control-map canny`'s defaults.
const DEFAULT_CANNY: (f64, f64) = (100.0, 200.0);

/// `LOW,HIGH` Canny thresholds.
fn parse_canny(s: &str) -> Result<(f64, f64), String> {
    let parse = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
    match s.split_once(',').map(|(a, b)| (parse(a), parse(b))) {
        Some((Some(low), Some(high))) => Ok((low, high)),
        _ => Err(format!("`{s}`: give two thresholds as LOW,HIGH (e.g. 100,200)")),
    }
}

/// An image's Canny edge map (OpenCV's) as a gray PNG, named for messages.
fn canny_png(image: &generate::ImageFile, (low, high): (f64, f64)) -> anyhow::Result<generate::ImageFile> {
    let rgb = ipaflux_core::preprocess::decode_rgb(&image.bytes, &image.name)?;
    let edges = generate::gray_rgb(rgb.width, rgb.height, &ipaflux_core::canny::canny(&rgb, low, high)?);
    let bytes = png_out::encode_png(edges.width, edges.height, &edges.data, &[])?;
    Ok(generate::ImageFile { bytes, name: format!("{} (Canny {low},{high})", image.name) })
}

/// An image's depth map (Depth Anything's, 0..255) as a gray PNG, named for messages.
fn depth_png(
    image: &generate::ImageFile,
    model: &std::path::Path,
    dtype: Precision,
    device: &ipaflux_core::candle_core::Device,
) -> anyhow::Result<generate::ImageFile> {
    let t = Instant::now();
    let files = ipaflux::depth::load_depth(&load::resolve_arg(model)?)?;
    let estimator = ipaflux::depth::DepthEstimator::new(&files, dtype.dtype(), device)?;
    let (map, w, h) = estimator.depth_map(&image.bytes, &image.name)?;
    let bytes = png_out::encode_png(w, h, &generate::gray_rgb(w, h, &map).data, &[])?;
    tracing::info!(model = %files.path.display(), seconds = t.elapsed().as_secs_f64(), "depth map made");
    Ok(generate::ImageFile { bytes, name: format!("{} (depth: {})", image.name, model.display()) })
}

/// `--init-image`, its `--mask` and `--strength` (diffusers' defaults: 0.6 for
/// image-to-image and inpainting, 1 for FLUX.1 Fill, told by its input channels).
fn init_image(a: &GenerateArgs) -> anyhow::Result<Option<generate::InitImage>> {
    let Some(path) = &a.init_image else { return Ok(None) };
    let image = image_file(path, "init image")?;
    let mask = a.mask.as_deref().map(|m| image_file(m, "mask")).transpose()?;
    let in_channels = ipaflux::load::flux_config(&ipaflux::load::resolve_arg(&a.flux)?)?.in_channels;
    let fill = FluxVariant::from_in_channels(in_channels)? == FluxVariant::Fill;
    let strength = a.strength.unwrap_or(if fill { 1.0 } else { 0.6 });
    Ok(Some(generate::InitImage { bytes: image.bytes, name: image.name, strength, mask }))
}

/// The references in order: IP-Adapter images, IP-Adapter embeddings, Redux images.
fn references(a: &GenerateArgs) -> anyhow::Result<Vec<generate::Reference>> {
    let weight = |i: usize| if a.ip_weight.len() == 1 { a.ip_weight[0] } else { a.ip_weight[i] };
    let mut refs = Vec::new();
    for (i, p) in a.image.iter().enumerate() {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read the reference image", p.display()))?;
        refs.push(generate::Reference::Image { bytes, name: p.display().to_string(), weight: weight(i) });
    }
    for (j, p) in a.embeds.iter().enumerate() {
        let t = ipaflux_core::candle_core::safetensors::load(p, &ipaflux_core::candle_core::Device::Cpu)
            .with_context(|| format!("{}: cannot read embeddings", p.display()))?;
        let e = t
            .get("image_prompt_embeds")
            .with_context(|| format!("{}: no `image_prompt_embeds` tensor", p.display()))?;
        refs.push(generate::Reference::Embeds {
            image_prompt_embeds: e.clone(),
            name: p.display().to_string(),
            weight: weight(a.image.len() + j),
        });
    }
    for (i, p) in a.redux_image.iter().enumerate() {
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read the Redux image", p.display()))?;
        let weight = if a.redux_strength.len() == 1 { a.redux_strength[0] } else { a.redux_strength[i] };
        refs.push(generate::Reference::Redux { bytes, name: p.display().to_string(), weight });
    }
    Ok(refs)
}

/// The output size: as given, else an init image's size rounded down to
/// multiples of 16 (diffusers' default for image-to-image; with a Kontext
/// image auto-resized, the Kontext resolution nearest the init image's
/// aspect, as diffusers' Kontext inpainting), else a Kontext image's as it is
/// encoded (ComfyUI's Kontext workflow), else a control image's rounded down,
/// else 1024.
fn output_size(
    width: Option<usize>,
    height: Option<usize>,
    images: (Option<&generate::InitImage>, Option<&generate::Kontext>, Option<&generate::ImageFile>),
) -> anyhow::Result<(usize, usize)> {
    const DEFAULT_SIDE: usize = 1024;
    let tile = ipaflux_core::flux::sampler::PIXELS_PER_TOKEN;
    // From the header alone: generate decodes the image itself.
    let size = |bytes: &[u8], name: &str| -> anyhow::Result<(usize, usize)> {
        Ok(ipaflux_core::preprocess::image_size(bytes, name)?)
    };
    let whole_tokens = |(w, h): (usize, usize)| (w / tile * tile, h / tile * tile);
    let own = match images {
        _ if width.is_some() && height.is_some() => None,
        // Kontext inpainting (diffusers' FluxKontextInpaintPipeline): the image to
        // inpaint goes to the Kontext resolution nearest its aspect, as the reference does.
        (Some(i), Some(k), _) if k.auto_resize => {
            let (w, h) = size(&i.bytes, &i.name)?;
            Some(ipaflux_core::flux::kontext::preferred_size(w, h))
        }
        (Some(i), _, _) => Some(whole_tokens(size(&i.bytes, &i.name)?)),
        (None, Some(k), _) => {
            let (w, h) = size(&k.image.bytes, &k.image.name)?;
            Some(if k.auto_resize { ipaflux_core::flux::kontext::preferred_size(w, h) } else { whole_tokens((w, h)) })
        }
        (None, None, Some(c)) => Some(whole_tokens(size(&c.bytes, &c.name)?)),
        (None, None, None) => None,
    };
    let pick = |given: Option<usize>, own: Option<usize>| given.or(own).unwrap_or(DEFAULT_SIDE);
    Ok((pick(width, own.map(|o| o.0)), pick(height, own.map(|o| o.1))))
}

/// `FILE`, `FILE:STRENGTH` or `FILE:STRENGTH:TEXT_STRENGTH`: strengths are the numbers after
/// the last one or two `:` (so paths with a colon still work).
fn parse_lora(s: &str) -> Result<generate::LoraArg, String> {
    let mut path = s;
    let mut numbers = Vec::new();
    while numbers.len() < 2 {
        let Some((p, x)) = path.rsplit_once(':').filter(|(p, _)| !p.is_empty()) else { break };
        let Ok(x) = x.trim().parse::<f64>() else { break };
        numbers.insert(0, x);
        path = p;
    }
    let strength = numbers.first().copied().unwrap_or(1.0);
    let text_strength = numbers.get(1).copied().unwrap_or(strength);
    for x in [strength, text_strength] {
        if !x.is_finite() || x.abs() > LORA_STRENGTH_LIMIT {
            return Err(format!("LoRA strength {x} is outside -{LORA_STRENGTH_LIMIT}..{LORA_STRENGTH_LIMIT}"));
        }
    }
    Ok(generate::LoraArg { path: PathBuf::from(path), strength, text_strength })
}

/// ComfyUI's StyleModelApply accepts strengths in 0..10.
const REDUX_STRENGTH_LIMIT: f64 = 10.0;

/// ComfyUI's LoraLoader accepts strengths in -100..100.
const LORA_STRENGTH_LIMIT: f64 = 100.0;

fn parse_block_weights(s: &str) -> anyhow::Result<Vec<f64>> {
    s.split([',', ';'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<f64>().with_context(|| format!("--block-weights: `{x}` is not a number")))
        .collect()
}

/// The reference options' consistency: each kind has the models it needs, and as many weights as references.
fn check_reference_args(a: &GenerateArgs) -> anyhow::Result<()> {
    // (References without --ip-adapter are refused by `generate::generate`'s own check.)
    let n_refs = a.image.len() + a.embeds.len();
    if a.ip_weight.len() != 1 && a.ip_weight.len() != n_refs {
        anyhow::bail!(
            "{} --ip-weight values for {n_refs} references: give one, or one per reference",
            a.ip_weight.len()
        );
    }
    if !a.image.is_empty() && a.siglip.is_none() && a.clip_vision.is_none() {
        anyhow::bail!(
            "--image needs the image encoder: --siglip for InstantX's IP-Adapter (or pass --embeds from `ipaflux \
             encode`), --clip-vision for XLabs'"
        );
    }
    if !a.redux_image.is_empty() && (a.siglip.is_none() || a.redux.is_none()) {
        anyhow::bail!("--redux-image needs --redux (the Redux model) and --siglip (the image encoder it reads)");
    }
    let n_redux = a.redux_image.len();
    if a.redux_strength.len() != 1 && a.redux_strength.len() != n_redux {
        anyhow::bail!(
            "{} --redux-strength values for {n_redux} Redux images: give one, or one per image",
            a.redux_strength.len()
        );
    }
    if let Some(x) = a.redux_strength.iter().find(|x| !(0.0..=REDUX_STRENGTH_LIMIT).contains(*x)) {
        anyhow::bail!("--redux-strength {x} is outside 0..{REDUX_STRENGTH_LIMIT}");
    }
    Ok(())
}

/// Everything but the models, from the options (images read, sizes and defaults resolved).
fn settings_from_args(
    a: &GenerateArgs,
    device: &ipaflux_core::candle_core::Device,
) -> anyhow::Result<generate::Settings> {
    let init = init_image(a)?;
    let kontext = match &a.kontext_image {
        Some(p) => Some(generate::Kontext {
            image: image_file(p, "Kontext image")?,
            auto_resize: a.kontext_auto_resize == OnOff::On,
        }),
        None => None,
    };
    let control = a
        .control_image
        .iter()
        .zip(control_maps(a)?)
        .map(|(p, map)| Ok(generate::Control { image: image_file(p, "control image")?, map }))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let images = (init.as_ref(), kontext.as_ref(), control.first().map(|c| &c.image));
    let (width, height) = output_size(a.width, a.height, images)?;
    ipaflux_core::flux::sampler::check_size(width, height)?;
    let steps_run = match &init {
        Some(i) => a.steps - ipaflux_core::flux::sampler::img2img_start(a.steps, i.strength)?,
        None => a.steps,
    };
    let true_cfg = match (a.true_cfg, &a.negative_prompt) {
        (scale, negative) if scale != 1.0 => {
            Some(generate::TrueCfg { negative_prompt: negative.clone().unwrap_or_default(), scale })
        }
        (_, Some(_)) => anyhow::bail!(
            "--negative-prompt needs --true-cfg above 1 (e.g. 3.5): with FLUX.1-dev's distilled guidance \
             alone a negative prompt does nothing"
        ),
        (_, None) => None,
    };
    let ip_weight = match (a.weight_start, a.weight_end) {
        // The ramp spans the steps that run (fewer from an init image).
        (Some(s), Some(e)) => generate::ramp(s, e, steps_run),
        _ => ipaflux_core::flux::IpWeight::Constant(1.0),
    };
    Ok(generate::Settings {
        prompt: a.prompt.clone(),
        width,
        height,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        batch: a.batch,
        dtype: a.dtype.dtype(),
        device: device.clone(),
        device_spec: a.device,
        t5_max_len: a.t5_max_len,
        ip_weight,
        start_percent: a.start_percent,
        end_percent: a.end_percent,
        block_weights: a.block_weights.as_deref().map(parse_block_weights).transpose()?,
        v_norm: a.v_norm,
        ip_negative: ip_negative(&a.ip_negative)?,
        registry: RegistryConfig {
            state: a.vram_state,
            offload_preprocessing: a.offload_preprocessing == OnOff::On,
            ..RegistryConfig::default()
        },
        vram_budget: a.vram_budget.as_deref().map(parse_bytes).transpose().context("--vram-budget")?,
        kernels: a.cuda_kernels,
        gguf: a.gguf_weights.into(),
        init,
        true_cfg,
        kontext,
        control,
        controlnet: controlnet_settings(a)?,
    })
}

/// Per-net values of a ControlNet option: none given → `default` for every
/// net, one → it for every net, else one per net.
fn per_net<T: Clone>(values: &[T], nets: usize, default: T, flag: &str) -> anyhow::Result<Vec<T>> {
    match values {
        [] => Ok(vec![default; nets]),
        [one] => Ok(vec![one.clone(); nets]),
        _ if values.len() == nets => Ok(values.to_vec()),
        _ => anyhow::bail!(
            "{} --{flag} values for {nets} ControlNets: give one for all, or one per --controlnet",
            values.len()
        ),
    }
}

/// The ControlNet files, each once, and the index of each `--controlnet` among them.
fn controlnet_files(a: &GenerateArgs) -> (Vec<PathBuf>, Vec<usize>) {
    let mut files: Vec<PathBuf> = Vec::new();
    let index = a
        .controlnet
        .iter()
        .map(|p| match files.iter().position(|f| f == p) {
            Some(i) => i,
            None => {
                files.push(p.clone());
                files.len() - 1
            }
        })
        .collect();
    (files, index)
}

/// Each `--controlnet`'s settings, from the per-net options.
fn controlnet_settings(a: &GenerateArgs) -> anyhow::Result<Vec<generate::ControlNetSettings>> {
    use ipaflux_core::flux::ControlWindow;
    let n = a.controlnet.len();
    let scale = per_net(&a.controlnet_scale, n, 1.0, "controlnet-scale")?;
    let mode = per_net(&a.controlnet_mode, n, ControlMode(None), "controlnet-mode")?;
    let windows: Vec<ControlWindow> = if a.controlnet_start_percent.is_empty() && a.controlnet_end_percent.is_empty() {
        let start = per_net(&a.controlnet_start, n, 0.0, "controlnet-start")?;
        let end = per_net(&a.controlnet_end, n, 1.0, "controlnet-end")?;
        start.into_iter().zip(end).map(|(start, end)| ControlWindow::Steps { start, end }).collect()
    } else {
        let start = per_net(&a.controlnet_start_percent, n, 0.0, "controlnet-start-percent")?;
        let end = per_net(&a.controlnet_end_percent, n, 1.0, "controlnet-end-percent")?;
        start.into_iter().zip(end).map(|(s, e)| ControlWindow::from_percent(s, e)).collect()
    };
    let (_, net) = controlnet_files(a);
    Ok((0..n)
        .map(|k| generate::ControlNetSettings { net: net[k], scale: scale[k], mode: mode[k].0, window: windows[k] })
        .collect())
}

/// What each control image becomes ([`GenerateArgs::control_map`]).
fn control_maps(a: &GenerateArgs) -> anyhow::Result<Vec<generate::ControlMap>> {
    let n = a.control_image.len();
    let kinds = match (a.control_map.as_slice(), a.control_canny, &a.control_depth) {
        ([], Some(_), Some(_)) => anyhow::bail!(
            "--control-canny and --control-depth both given: say which control image gets which with --control-map \
             (e.g. --control-image photo.png --control-image photo.png --control-map canny --control-map depth)"
        ),
        ([], Some(_), None) => vec![MapArg::Canny; n],
        ([], None, Some(_)) => vec![MapArg::Depth; n],
        ([], None, None) => vec![MapArg::Given; n],
        ([one], ..) => vec![*one; n],
        (maps, ..) if maps.len() == n => maps.to_vec(),
        (maps, ..) => anyhow::bail!(
            "{} --control-map values for {n} control images: give one for all, or one per --control-image",
            maps.len()
        ),
    };
    if a.control_depth.is_some() && !kinds.contains(&MapArg::Depth) {
        anyhow::bail!("--control-depth given, but no --control-map is `depth`: no depth map would be made");
    }
    if a.control_canny.is_some() && !kinds.contains(&MapArg::Canny) {
        anyhow::bail!("--control-canny given, but no --control-map is `canny`: no edge map would be made");
    }
    let (low, high) = a.control_canny.unwrap_or(DEFAULT_CANNY);
    Ok(kinds
        .into_iter()
        .map(|k| match k {
            MapArg::Given => generate::ControlMap::AsGiven,
            MapArg::Canny => generate::ControlMap::Canny { low, high },
            MapArg::Depth => generate::ControlMap::Depth,
        })
        .collect())
}

/// What each LoRA covers, as it was read.
fn print_loras(sources: &generate::Sources, args: &[generate::LoraArg]) {
    use ipaflux_core::flux::TextEncoder;
    for (lora, arg) in sources.loras.iter().zip(args) {
        eprintln!(
            "LoRA {}: {} modules on {} Flux weights, strength {}",
            arg.path.display(),
            lora.modules(),
            lora.weights().count(),
            lora.strength
        );
        if let Some(c) = lora.input_channels() {
            eprintln!("  widens Flux's input to {c} channels (a FLUX.1 Canny/Depth LoRA: give --control-image)");
        }
        if lora.replaced() + lora.with_bias() > 0 {
            eprintln!("  replaces {} QK-norm scales; {} modules add to a bias", lora.replaced(), lora.with_bias());
        }
        let (clip, t5) = (lora.text_encoder_modules(TextEncoder::Clip), lora.text_encoder_modules(TextEncoder::T5));
        if clip + t5 > 0 {
            eprintln!("  text encoders: {clip} CLIP and {t5} T5 modules, strength {}", lora.text_strength);
        }
    }
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = a.device.to_candle()?;
    ipaflux::prepare_device(&device);
    check_reference_args(&a)?;
    let mut settings = settings_from_args(&a, &device)?;
    let refs = references(&a)?;
    let (controlnets, _) = controlnet_files(&a);
    let paths = generate::ModelPaths {
        flux: a.flux,
        t5: a.t5,
        clip: a.clip,
        vae: a.vae,
        ip_adapter: a.ip_adapter,
        siglip: a.siglip,
        clip_vision: a.clip_vision,
        redux: a.redux,
        depth: a.control_depth,
        controlnet: controlnets,
        t5_tokenizer: a.t5_tokenizer,
        clip_tokenizer: a.clip_tokenizer,
        encoder_dtype: a.dtype,
        loras: a.lora.clone(),
    };
    let sources = paths.into_sources(device)?;
    print_loras(&sources, &a.lora);
    for (k, mode) in generate::union_mode_from_map(&sources, &mut settings) {
        let which = if settings.controlnet.len() > 1 { format!(" {}", k + 1) } else { String::new() };
        eprintln!("Union ControlNet{which}: mode {mode} ({}), from the control map made", generate::UNION_MODES[mode]);
    }
    let out = run_pipeline(&sources, &refs, &settings, &a.out, a.verbose)?;
    if a.batch == 1 {
        eprintln!("wrote {} ({}×{})", a.out.display(), out.0, out.1);
    } else {
        eprintln!(
            "wrote {} images ({}×{}), seeds {}..={}",
            a.batch,
            out.0,
            out.1,
            a.seed,
            a.seed.wrapping_add(a.batch as u64 - 1)
        );
    }
    Ok(())
}

/// Runs the pipeline with a progress bar, writes the PNG, prints stage times (and the timeline).
fn run_pipeline(
    sources: &generate::Sources,
    refs: &[generate::Reference],
    s: &generate::Settings,
    out: &std::path::Path,
    timeline: bool,
) -> anyhow::Result<(usize, usize)> {
    let bar = indicatif::ProgressBar::new((s.steps_run()? * s.batch) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps  {elapsed} (eta {eta}) {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let g = generate::generate(sources, refs, s, &mut |st| {
        bar.set_message(format!("sigma {:.3}", st.sigma));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    for image in &g.images {
        let params = generate::parameters_json(s, image.seed, refs, sources);
        let path = if g.images.len() == 1 { out.to_path_buf() } else { batch_path(out, image.seed) };
        png_out::write_png(&path, g.width, g.height, &image.rgb, &[("parameters", params)])?;
        if g.images.len() > 1 {
            eprintln!("wrote {}", path.display());
        }
    }
    if timeline {
        println!("{}", plan::timeline_table(&g.timeline));
    }
    let ip_refs = refs.iter().filter(|r| r.kind() == "ip-adapter").count();
    println!("IP K/V cache: {} bytes for {ip_refs} reference(s)", g.ip_kv_bytes);
    println!("stage times:");
    for (name, d) in &g.stages {
        println!("  {name:<26} {:>9.2} ms", d.as_secs_f64() * 1e3);
    }
    Ok((g.width, g.height))
}

/// `out` with `-SEED` before its extension: where image `seed` of a batch goes.
fn batch_path(out: &std::path::Path, seed: u64) -> PathBuf {
    let stem = out.file_stem().map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let ext = out.extension().map_or_else(|| "png".into(), |e| e.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}-{seed}.{ext}"))
}

fn print_stages(stages: &[(&str, std::time::Duration)]) {
    for (name, d) in stages {
        eprintln!("  {name:<18} {:>9.2} ms", d.as_secs_f64() * 1e3);
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ipaflux::registry=warn")),
        )
        .init();
    match Cli::parse().command {
        Cmd::Encode { siglip, ip_adapter, image, out, dtype, device } => {
            let dev = device.to_candle()?;
            ipaflux::prepare_device(&dev);
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
        Cmd::Quantize { siglip, format, out } => {
            let t = Instant::now();
            let mut shown = 0;
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let r = ipaflux::quantize::quantize_siglip(&siglip, &out, format, |done, total| {
                // Twenty updates of one line, whatever the tensor count.
                if tty && (done * 20 / total.max(1) > shown || done == total) {
                    shown = done * 20 / total.max(1);
                    eprint!("\rquantizing: {done}/{total} tensors");
                }
            })?;
            if tty {
                eprintln!();
            }
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!("format   linear weights  tensors  in (MiB)  out (MiB)  ratio   time");
            println!(
                "{:<8} {:>14}  {:>7}  {:>8.1}  {:>9.1}  {:>5.2}  {:>5.1} s",
                r.format.name(),
                r.linear,
                r.tensors,
                mib(r.in_bytes),
                mib(r.out_bytes),
                r.out_bytes as f64 / r.in_bytes.max(1) as f64,
                t.elapsed().as_secs_f64()
            );
            println!("wrote {}", r.out_dir.join("model.safetensors").display());
        }
        Cmd::Demo { out, seed } => {
            println!(
                "ipaflux demo: bundled tiny T5, CLIP, SigLIP, IP-Adapter, Flux and VAE (random weights, real layouts); \
                 bundled sample image as the reference"
            );
            let s = demo::settings(seed);
            run_pipeline(&demo::sources()?, &demo::references(), &s, &out, true)?;
            println!("wrote {} ({}×{}, seed {seed})", out.display(), s.width, s.height);
        }
        Cmd::Generate(args) => run_generate(*args)?,
        Cmd::Canny { image, low, high, out } => {
            let edges = canny_png(&image_file(&image, "image")?, (low, high))?;
            std::fs::write(&out, &edges.bytes).with_context(|| format!("{}: cannot write", out.display()))?;
            eprintln!("wrote {} ({})", out.display(), edges.name);
        }
        Cmd::Depth { image, model, out, dtype, device } => {
            let dev = device.to_candle()?;
            ipaflux::prepare_device(&dev);
            let map = depth_png(&image_file(&image, "image")?, &model, dtype, &dev)?;
            std::fs::write(&out, &map.bytes).with_context(|| format!("{}: cannot write", out.display()))?;
            eprintln!("wrote {} ({})", out.display(), map.name);
        }
        Cmd::Inspect { file } => print!("{}", ipaflux::inspect::inspect(&file)?),
        Cmd::Plan { vram, state, reserve, offload_preprocessing, policy, scenario: name, steps, json } => {
            let config = RegistryConfig {
                state,
                reserve_bytes: parse_bytes(&reserve).context("--reserve")?,
                offload_preprocessing: offload_preprocessing == OnOff::On,
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
        Cmd::GpuCheck { device, fixtures, runs, quick, sections, torch, out, wgmma } => {
            let dev = device.to_candle()?;
            ipaflux::prepare_device(&dev);
            #[cfg(feature = "cuda")]
            let (alternatives, peak): (_, std::sync::Arc<dyn bench_flux::PeakMemory>) = if dev.is_cuda() {
                (
                    {
                        use ipaflux::cuda::attention::{Kernel, Output};
                        [
                            Kernel::Mma,
                            Kernel::Wmma,
                            Kernel::MmaPipelined,
                            Kernel::MmaPipelinedWide,
                            Kernel::MmaTwoTilesStaged,
                            Kernel::Wgmma,
                        ]
                        .into_iter()
                        .filter(|&kernel| ipaflux::cuda::wgmma_wanted(kernel, wgmma))
                        .map(|kernel| ipaflux::cuda::fused_attention_with(kernel, Output::Heads))
                        .collect()
                    },
                    std::sync::Arc::new(ipaflux::cuda::check::DriverPeak::start(&dev)?),
                )
            } else {
                (Vec::new(), std::sync::Arc::new(bench_flux::Rss))
            };
            #[cfg(not(feature = "cuda"))]
            let (alternatives, peak): (_, std::sync::Arc<dyn bench_flux::PeakMemory>) =
                (Vec::new(), std::sync::Arc::new(bench_flux::Rss));
            let torch = torch.as_deref().map(gpu_check::read_torch_figures).transpose()?;
            // A set is under test where this build has its fused kernels for the device.
            let set_under_test = |set| {
                ipaflux::modulation_for(&dev, set).map(|modulation| gpu_check::KernelSetUnderTest {
                    attention: ipaflux::attention_for(&dev, set),
                    modulation,
                })
            };
            let default_set = set_under_test(ipaflux::KernelSet::default());
            let baseline = set_under_test(ipaflux::KernelSet::Baseline);
            let attention_variants = ipaflux::fast_attention_variants(&dev, wgmma);
            // Version 8's own run (`--wgmma only`) checks attention alone.
            let ipaflux::LinearVariants { modulation: modulation_variants, linear: linear_variant } = match wgmma {
                gpu_check::Wgmma::Only => ipaflux::LinearVariants::default(),
                _ => ipaflux::linear_variants(&dev),
            };
            let o = gpu_check::CheckOptions {
                device: dev,
                fixtures,
                runs,
                quick,
                sections,
                default_set,
                alternatives,
                attention_variants,
                modulation_variants,
                linear_variant,
                baseline,
                torch,
                peak,
            };
            let report = gpu_check::run(&o);
            let table = report.table();
            print!("{table}");
            if let Some(path) = out {
                std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
            }
            if report.failures() > 0 {
                anyhow::bail!("{} GPU check(s) failed", report.failures());
            }
        }
        Cmd::Bench {
            flux: true,
            runs,
            flux_size,
            flux_depth,
            flux_dtype,
            flux_device,
            flux_plain,
            cuda_kernels,
            ..
        } => {
            let mut o =
                bench_flux::FluxBenchOptions::cpu(flux_size, flux_depth[0], flux_depth[1], runs, flux_dtype.dtype());
            ipaflux_core::flux::sampler::check_size(flux_size, flux_size)?;
            o.device = flux_device.to_candle()?;
            o.attention = ipaflux::attention_for(&o.device, cuda_kernels);
            o.modulation = ipaflux::modulation_for(&o.device, cuda_kernels);
            ipaflux::prepare_device(&o.device);
            if flux_plain {
                let ms = bench_flux::run_plain(&o)?;
                println!(
                    "flux step, no IP, {flux_size}², {}+{} blocks, {:?} on {flux_device}: {ms:.2} ms",
                    o.depth, o.depth_single, o.dtype
                );
            } else {
                print!("{}", bench_flux::table(&bench_flux::run(&o)?, &o));
            }
        }
        Cmd::Bench { webgpu: true, runs, webgpu_layers, webgpu_formats, .. } => {
            let formats = webgpu_formats.iter().map(|f| f.parse()).collect::<Result<Vec<_>, _>>()?;
            print!("{}", bench_webgpu::run(&bench_webgpu::Options { layers: webgpu_layers, runs, formats })?);
        }
        Cmd::Bench { runs, no_projection, no_torch, registry_only, python, .. } => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: usize, height: usize) -> generate::ImageFile {
        let bytes = png_out::encode_png(width, height, &vec![0; width * height * 3], &[]).unwrap();
        generate::ImageFile { bytes, name: format!("{width}x{height}.png") }
    }

    #[test]
    fn output_size_follows_the_images() {
        let image = png(100, 70);
        let init = generate::InitImage { bytes: image.bytes, name: image.name, strength: 0.6, mask: None };
        let kontext = |auto_resize| generate::Kontext { image: png(64, 96), auto_resize };
        let (on, off) = (kontext(true), kontext(false));
        // Image-to-image: the init image's size, rounded down to 16.
        assert_eq!(output_size(None, None, (Some(&init), None, None)).unwrap(), (96, 64));
        // Kontext inpainting, auto-resized: the Kontext resolution nearest the init image's aspect.
        assert_eq!(output_size(None, None, (Some(&init), Some(&on), None)).unwrap(), (1248, 832));
        assert_eq!(output_size(None, None, (Some(&init), Some(&off), None)).unwrap(), (96, 64));
        // A Kontext image alone: its own nearest resolution, or its size.
        assert_eq!(output_size(None, None, (None, Some(&on), None)).unwrap(), (832, 1248));
        assert_eq!(output_size(None, None, (None, Some(&off), None)).unwrap(), (64, 96));
        assert_eq!(output_size(Some(64), Some(48), (Some(&init), Some(&on), None)).unwrap(), (64, 48));
        assert_eq!(output_size(None, None, (None, None, Some(&png(40, 24)))).unwrap(), (32, 16));
        assert_eq!(output_size(None, Some(512), (None, None, None)).unwrap(), (1024, 512));
    }
}
