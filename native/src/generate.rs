//! The full text + image-prompt pipeline: text encoders (the prompt, and a
//! negative prompt for true classifier-free guidance) → the VAE encoding of
//! an init image (image-to-image, inpainting with a mask, FLUX.1 Fill's
//! conditioning), of a FLUX.1 Kontext image and of control images (FLUX.1
//! Canny/Depth's input channels, or Flux ControlNets') → reference-image encoding →
//! per-block IP K/V, and FLUX.1 Redux images' tokens after the prompt's →
//! Flux sampling with the IP-Adapter hook (and ControlNets' residuals) → VAE decode → PNG. Without
//! references it is plain Flux. Every model is registered with the memory registry, loaded
//! for its stage through `load_for_job`, and released after its last use; the
//! registry's timeline is returned with the image.
//!
//! Models are read lazily through [`Sources`], so the same code runs on files
//! (the CLI) and on bundled bytes (the demo). On the CPU nothing moves between
//! devices: the timeline shows registrations, jobs and releases; moving,
//! partial loading and streaming of Flux blocks need the CUDA backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::ip::{check_compatible, IpAdapterHook, IpHookConfig, IpImage, IpWeight};
use ipaflux_core::flux::lora::{apply_to_text_encoder, TextEncoder};
use ipaflux_core::flux::sampler::{self, FluxVariant, Guide, Start, StepInfo};
use ipaflux_core::flux::{
    append_image_tokens, AttentionHook, BlockId, BlockSource, Conditioning, FluxLoad, FluxLora, FluxModel, GgufWeights,
    Hooks, HostBlocks, ReduxDims, ReduxImageEncoder, XlabsDims, XlabsHook, XlabsIpAdapter,
};
use ipaflux_core::flux::{ControlInput, ControlNetDims, ControlWindow, FluxControlNet};
use ipaflux_core::registry::{
    Event, HostMemory, JobPlan, JobRequest, ModelHandle, ModelId, ModelSpec, Registry, RegistryConfig, Role,
};
use ipaflux_core::schedule::{flux_schedule, IpWindow, Shift, WeightRamp, COMFY_FLUX_SHIFT};
use ipaflux_core::{DeviceSpec, IpAdapter, IpAdapterDims, IpAttentionConfig, TensorStore, VNorm};

use crate::clip_vision::ClipImageEncoder;
use crate::encode::ImageEncoder;
use crate::load::FluxFiles;
use crate::text::{ClipEncoder, T5Encoder};
use crate::vae::{VaeDecoder, VaeEncoder};
use crate::Result;

/// A model's files, read when its stage begins.
pub type LoadFn<T> = Box<dyn Fn() -> Result<T>>;

/// A text encoder's config, weights and tokenizer.
#[derive(Clone)]
pub struct TextFiles {
    pub config: String,
    pub weights: TensorStore,
    pub tokenizer: Vec<u8>,
}

/// Where every model comes from, with its size for the registry: the bytes it
/// takes loaded in the dtype and on the device it loads to (not its file's
/// size: an f32 SigLIP checkpoint with its text tower is four times what
/// SigLIP's vision tower takes in bf16).
pub struct Sources {
    pub flux: (LoadFn<FluxFiles>, u64),
    pub t5: (LoadFn<TextFiles>, u64),
    pub clip: (LoadFn<TextFiles>, u64),
    /// The VAE's tensors; the bytes are its decoder's, loaded.
    pub vae: (LoadFn<TensorStore>, u64),
    /// Its encoder's bytes, loaded (0: the file has none), for an init image.
    pub vae_encoder_bytes: u64,
    /// SigLIP with its preprocessing; `None` when no reference is an image
    /// (IP-Adapter references given as embeddings, or none).
    pub image_encoder: Option<(LoadFn<ImageEncoder>, u64)>,
    /// The IP-Adapter (projection and processors); `None`: no IP references.
    pub ip_adapter: Option<(LoadFn<TensorStore>, u64)>,
    /// The IP-Adapter is XLabs' (told by its tensors' names): it reads images
    /// with [`Self::clip_vision`], not SigLIP.
    pub ip_is_xlabs: bool,
    /// CLIP's vision tower for XLabs' IP-Adapter; `None`: not given.
    pub clip_vision: Option<(LoadFn<ClipImageEncoder>, u64)>,
    /// The FLUX.1 Redux image embedder; `None`: no Redux images.
    pub redux: Option<(LoadFn<TensorStore>, u64)>,
    /// Depth Anything, for a control image's depth map ([`ControlMap::Depth`]); `None`: not given.
    pub depth: Option<(LoadFn<crate::depth::DepthEstimator>, u64)>,
    /// Flux ControlNets (InstantX's, Shakker-Labs', XLabs'), each file once, for
    /// [`Settings::controlnet`] (which may use one several times); empty: none given.
    pub controlnet: Vec<ControlNetSource>,
    /// Flux's input channels per token (64; FLUX.1 Canny/Depth's 128, Fill's
    /// 384: [`FluxVariant`]), from the checkpoint header, or as a FLUX.1
    /// Canny/Depth LoRA widens it.
    pub flux_in_channels: usize,
    /// Flux's attention head size (128 for FLUX.1), read from the checkpoint header:
    /// the IP K/V are split into heads before Flux itself is loaded.
    pub flux_head_dim: usize,
    /// Flux's registry units (embedders, then each block) from its headers, so
    /// a partial load is planned per block before any weight is read; empty
    /// when unknown (then Flux is one unit, loaded whole).
    pub flux_units: crate::load::FluxUnits,
    /// LoRAs applied to Flux as it loads, read and checked against its sizes up front.
    pub loras: Vec<FluxLora>,
}

/// A Flux ControlNet: how it loads (in the run's dtype, on its device), the
/// bytes it takes loaded, and its sizes from its header.
pub struct ControlNetSource {
    /// Its path, for messages.
    pub name: String,
    /// Builds it with these blocks left out, returning their tensors for a
    /// [`BlockSource`] (none: the whole net resident).
    pub load: ControlNetLoad,
    pub bytes: u64,
    /// Its registry units ([`ControlNetDims::unit_specs`]): its base, then its blocks.
    pub units: Vec<ipaflux_core::registry::UnitSpec>,
    pub dims: ControlNetDims,
}

/// [`ControlNetSource::load`].
pub type ControlNetLoad = Box<dyn Fn(&[BlockId]) -> Result<(FluxControlNet, BTreeMap<String, Tensor>)>>;

/// A reference: for the IP-Adapter, an image to encode or `image_prompt_embeds`
/// made earlier; for FLUX.1 Redux, an image whose tokens follow the prompt's.
pub enum Reference {
    Image {
        bytes: Vec<u8>,
        name: String,
        weight: f64,
    },
    Embeds {
        image_prompt_embeds: Tensor,
        name: String,
        weight: f64,
    },
    /// `weight` multiplies its tokens (ComfyUI's StyleModelApply strength, "multiply").
    Redux {
        bytes: Vec<u8>,
        name: String,
        weight: f64,
    },
}

/// Image-to-image: sampling starts from this image's latents noised to the
/// sigma that `strength` reaches, instead of from pure noise.
#[derive(Clone)]
pub struct InitImage {
    /// PNG, JPEG or WebP bytes; resized to the output size (Pillow's Lanczos, as
    /// diffusers' `VaeImageProcessor`) when they differ.
    pub bytes: Vec<u8>,
    pub name: String,
    /// diffusers' `strength` in (0, 1]: about this share of `steps` runs, from
    /// the schedule's matching point ([`sampler::img2img_start`]).
    pub strength: f64,
    /// Inpainting: what to repaint (white; black is kept), as diffusers'
    /// `FluxInpaintPipeline` reads a mask (resized like the image, then its
    /// luma binarised at one half). `None`: the whole image changes.
    pub mask: Option<ImageFile>,
}

/// An image file's bytes (PNG, JPEG, WebP; any colour type) and its name for messages.
#[derive(Clone)]
pub struct ImageFile {
    pub bytes: Vec<u8>,
    pub name: String,
}

impl std::fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFile").field("name", &self.name).field("bytes", &self.bytes.len()).finish()
    }
}

impl std::fmt::Debug for InitImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitImage")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("strength", &self.strength)
            .field("mask", &self.mask.as_ref().map(|m| &m.name))
            .finish()
    }
}

/// Everything but the models.
#[derive(Debug, Clone)]
pub struct Settings {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    /// The first image's seed; image `i` of a batch uses `seed + i`.
    pub seed: u64,
    /// Images made from one load of every model (≥ 1).
    pub batch: usize,
    pub dtype: DType,
    pub device: Device,
    pub device_spec: DeviceSpec,
    pub t5_max_len: usize,
    pub ip_weight: IpWeight,
    pub start_percent: f64,
    pub end_percent: f64,
    pub block_weights: Option<Vec<f64>>,
    pub v_norm: VNorm,
    /// What the IP-Adapter sees in true CFG's negative pass ([`IpNegative`]).
    pub ip_negative: IpNegative,
    pub registry: RegistryConfig,
    /// At most this much of the GPU is planned with (`--vram-budget`); `None`: all of it.
    pub vram_budget: Option<u64>,
    /// Which fused CUDA kernels run (CUDA only).
    pub kernels: crate::KernelSet,
    /// How a GGUF Flux's quantized weights are held.
    pub gguf: GgufWeights,
    /// Image-to-image from this picture; `None`: from noise.
    pub init: Option<InitImage>,
    /// True classifier-free guidance with a negative prompt; `None`: the prompt alone.
    pub true_cfg: Option<TrueCfg>,
    /// FLUX.1 Kontext: the image to edit, whose tokens follow the latents' ([`Kontext`]).
    pub kontext: Option<Kontext>,
    /// FLUX.1 Canny/Depth: its one control image (an edge or depth map, as
    /// given or made from a photo: [`ControlMap`]), resized to the output size
    /// (Lanczos) as diffusers' `FluxControlPipeline` does; its VAE latents go
    /// in as extra input channels at every pass. Works with an init image and
    /// a mask too. With [`Self::controlnet`], the ControlNets' control images
    /// instead: one they all read, or one per ControlNet, in order
    /// ([`Self::control_of`]). Empty: none.
    pub control: Vec<Control>,
    /// Run these ControlNets (with FLUX.1-dev or schnell, not FLUX.1
    /// Canny/Depth), each on its control image; their residuals add up, each
    /// at its own mapping onto Flux's blocks (ComfyUI's chained Apply
    /// ControlNet; diffusers' `FluxMultiControlNetModel` for nets of one
    /// size). Empty: none.
    pub controlnet: Vec<ControlNetSettings>,
}

/// How a Flux ControlNet conditions (diffusers' `FluxControlNetPipeline` arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetSettings {
    /// Which of [`Sources::controlnet`] runs (a Union net may run twice, in two modes).
    pub net: usize,
    /// `controlnet_conditioning_scale` (ComfyUI's strength): its residuals' factor.
    pub scale: f64,
    /// A Union net's control mode (`control_mode`); `None` for a single-purpose net.
    pub mode: Option<usize>,
    /// The steps it runs in (`control_guidance_start`/`_end`).
    pub window: ControlWindow,
}

/// Control modes of InstantX's and Shakker-Labs' Union ControlNets, by index.
pub const UNION_MODES: [&str; 7] = ["canny", "tile", "depth", "blur", "pose", "gray", "lq"];

/// A Union ControlNet given no mode follows the control map made here: its
/// Canny edges → `canny`, its depth map → `depth`. Sets the modes and returns
/// `(ControlNet index, mode)` of each chosen; none where a mode was given, the
/// net is not a Union net, or its control image is used as given (its kind
/// is not known).
pub fn union_mode_from_map(src: &Sources, s: &mut Settings) -> Vec<(usize, usize)> {
    let mut chosen = Vec::new();
    for k in 0..s.controlnet.len() {
        let union = src.controlnet.get(s.controlnet[k].net).is_some_and(|n| n.dims.modes.is_some_and(|m| m > 2));
        let mode = match s.control_of(k).map(|c| c.map) {
            Some(ControlMap::Canny { .. }) => 0,
            Some(ControlMap::Depth) => 2,
            Some(ControlMap::AsGiven) | None => continue,
        };
        if union && s.controlnet[k].mode.is_none() {
            s.controlnet[k].mode = Some(mode);
            chosen.push((k, mode));
        }
    }
    chosen
}

/// The IP-Adapter's reference in true CFG's negative pass.
#[derive(Debug, Clone, Default)]
pub enum IpNegative {
    /// The same references as the positive pass (ComfyUI: the patched model
    /// runs its IP-Adapter on every call).
    #[default]
    Same,
    /// A black image (diffusers' `FluxPipeline` when no
    /// `negative_ip_adapter_image` is given), encoded like a reference.
    Black,
    /// This picture (diffusers' `negative_ip_adapter_image`), encoded like a reference.
    Image(ImageFile),
}

impl IpNegative {
    /// How the PNG's parameters and messages name it: `same`, `black` or the picture's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Same => "same",
            Self::Black => "black",
            Self::Image(image) => &image.name,
        }
    }
}

/// The name the black negative image goes by in logs.
const BLACK_NEGATIVE: &str = "black image (the IP-Adapter's negative)";

/// FLUX.1 Canny/Depth's control image and how its map is made.
#[derive(Clone)]
pub struct Control {
    pub image: ImageFile,
    pub map: ControlMap,
}

/// What the control image becomes before it is encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ControlMap {
    /// Already an edge or depth map.
    AsGiven,
    /// Its Canny edges (OpenCV's, these hysteresis thresholds).
    Canny { low: f64, high: f64 },
    /// Its depth map, by [`Sources::depth`] (a registry entry of its own, loaded for this alone).
    Depth,
}

impl Control {
    /// The image's name, with the map made of it: for messages and the PNG's parameters.
    pub fn describe(&self) -> String {
        match self.map {
            ControlMap::AsGiven => self.image.name.clone(),
            ControlMap::Canny { low, high } => format!("{} (Canny {low},{high})", self.image.name),
            ControlMap::Depth => format!("{} (depth map)", self.image.name),
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A gray map (one byte a pixel) as an RGB image, each value in all three channels.
pub fn gray_rgb(width: usize, height: usize, gray: &[u8]) -> ipaflux_core::preprocess::RgbImage {
    ipaflux_core::preprocess::RgbImage { width, height, data: gray.iter().flat_map(|&v| [v; 3]).collect() }
}

/// The control images as the models take them: decoded, then their Canny
/// edges or depth maps when asked (the depth model loaded once, for the
/// first depth map, and dropped here).
pub fn control_images(src: &Sources, controls: &[Control]) -> Result<Vec<ipaflux_core::preprocess::RgbImage>> {
    let mut estimator = None;
    let mut map_of = |c: &Control| -> Result<_> {
        let image = ipaflux_core::preprocess::decode_rgb(&c.image.bytes, &c.image.name)?;
        Ok(match c.map {
            ControlMap::AsGiven => image,
            ControlMap::Canny { low, high } => {
                gray_rgb(image.width, image.height, &ipaflux_core::canny::canny(&image, low, high)?)
            }
            ControlMap::Depth => {
                let estimator: &crate::depth::DepthEstimator = match &mut estimator {
                    Some(e) => e,
                    None => {
                        let (load, _) = src.depth.as_ref().ok_or_else(|| {
                            crate::Error::from(ipaflux_core::Error::Unsupported(
                                "a depth map needs a depth model (--control-depth)".into(),
                            ))
                        })?;
                        estimator.insert(load()?)
                    }
                };
                let map = estimator.map_of(&image, &c.image.name)?;
                gray_rgb(image.width, image.height, &map)
            }
        })
    };
    controls.iter().map(&mut map_of).collect()
}

/// FLUX.1 Kontext's image to edit.
#[derive(Clone)]
pub struct Kontext {
    pub image: ImageFile,
    /// Resize it to the closest of Kontext's trained resolutions first (diffusers' default);
    /// else it is only cropped down to whole tokens.
    pub auto_resize: bool,
}

impl std::fmt::Debug for Kontext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kontext").field("image", &self.image.name).field("auto_resize", &self.auto_resize).finish()
    }
}

/// True classifier-free guidance (diffusers' `negative_prompt` and
/// `true_cfg_scale`, ComfyUI's negative conditioning and `cfg`): each step
/// also runs the model on the negative prompt, twice the work.
#[derive(Debug, Clone, PartialEq)]
pub struct TrueCfg {
    pub negative_prompt: String,
    /// Above 1 (1 would be the prompt alone), at most [`MAX_TRUE_CFG`].
    pub scale: f32,
}

/// The largest true-CFG scale accepted (ComfyUI's `cfg` goes to 100).
pub const MAX_TRUE_CFG: f32 = 100.0;

impl Settings {
    /// Whether an image is VAE-encoded (an init, Kontext or control image;
    /// not a control image only XLabs' ControlNets read, from its pixels).
    pub fn encodes_images(&self, src: &Sources) -> bool {
        self.init.is_some()
            || self.kontext.is_some()
            || (0..self.control.len()).any(|i| self.control_reads(src, i).latents)
    }

    /// The index in [`Self::control`] of ControlNet `k`'s control image: the
    /// one image all read, or its own.
    fn control_index(&self, k: usize) -> usize {
        if self.control.len() == 1 {
            0
        } else {
            k
        }
    }

    /// ControlNet `k`'s control image (`None` where it has none: refused by the checks).
    pub fn control_of(&self, k: usize) -> Option<&Control> {
        self.control.get(self.control_index(k))
    }

    /// How control image `i` is read: as VAE latents (by FLUX.1 Canny/Depth,
    /// or a ControlNet in diffusers' kind), as pixels (by XLabs' ControlNets,
    /// through their hint block), or both.
    fn control_reads(&self, src: &Sources, i: usize) -> ControlReads {
        if self.controlnet.is_empty() {
            return ControlReads { latents: i < self.control.len(), pixels: false };
        }
        let mut reads = ControlReads::default();
        for (k, c) in self.controlnet.iter().enumerate().filter(|(k, _)| self.control_index(*k) == i) {
            // (A net index out of range is refused by `check_controlnet`.)
            if let Some(net) = src.controlnet.get(c.net) {
                let pixels = net.dims.hint.is_some();
                tracing::trace!(target: "ipaflux::generate", "ControlNet {k} reads control image {i}, pixels: {pixels}");
                reads.pixels |= pixels;
                reads.latents |= !pixels;
            }
        }
        reads
    }

    /// Sampler steps each image runs: `steps`, fewer from an init image.
    pub fn steps_run(&self) -> Result<usize> {
        match &self.init {
            None => Ok(self.steps),
            Some(init) => Ok(self.steps - sampler::img2img_start(self.steps, init.strength)?),
        }
    }
}

/// What is made of a control image (see [`Settings::control_reads`]).
#[derive(Debug, Default, Clone, Copy)]
struct ControlReads {
    latents: bool,
    pixels: bool,
}

/// One image of a batch: its seed and RGB pixels.
pub struct Image {
    pub seed: u64,
    pub rgb: Vec<u8>,
}

/// The result: the images (one per seed), the memory timeline, stage timings.
pub struct Generated {
    pub width: usize,
    pub height: usize,
    pub images: Vec<Image>,
    pub timeline: Vec<Event>,
    pub stages: Vec<(&'static str, Duration)>,
    /// Bytes of the cached IP K/V of all references.
    pub ip_kv_bytes: usize,
}

/// T5 overflows in f16 (its feed-forward activations pass 65504): with
/// `--dtype f16` it runs in bf16, which has f32's range at the same size;
/// Flux takes its output in f16.
fn t5_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::BF16
    } else {
        dtype
    }
}

struct Handles {
    t5: ModelHandle,
    clip: ModelHandle,
    image_encoder: Option<ModelHandle>,
    clip_vision: Option<ModelHandle>,
    ip: Option<ModelHandle>,
    redux: Option<ModelHandle>,
    flux: ModelHandle,
    vae: ModelHandle,
    /// Registered only for an init image.
    vae_encoder: Option<ModelHandle>,
    /// Registered only for a control image's depth map.
    depth: Option<ModelHandle>,
    /// One per ControlNet file ([`Sources::controlnet`]), loaded beside Flux for sampling.
    controlnet: Vec<ModelHandle>,
}

/// The registry entry of ControlNet file `i`: `controlnet`, then `controlnet-2`, ….
fn controlnet_entry(i: usize) -> String {
    match i {
        0 => "controlnet".into(),
        _ => format!("controlnet-{}", i + 1),
    }
}

/// Whether reference `r` is read with SigLIP: a Redux image, or an image for InstantX's adapter.
fn needs_siglip(src: &Sources, r: &Reference) -> bool {
    match r {
        Reference::Redux { .. } => true,
        Reference::Image { .. } => !src.ip_is_xlabs,
        Reference::Embeds { .. } => false,
    }
}

/// Whether SigLIP is loaded: a reference reads with it, or InstantX's adapter
/// encodes the negative image ([`IpNegative::Black`], [`IpNegative::Image`]).
fn uses_siglip(src: &Sources, refs: &[Reference], s: &Settings) -> bool {
    refs.iter().any(|r| needs_siglip(src, r)) || (has_negative_image(s, refs) && !src.ip_is_xlabs)
}

/// Whether true CFG's negative pass gives the IP-Adapter an image of its own.
fn has_negative_image(s: &Settings, refs: &[Reference]) -> bool {
    !matches!(s.ip_negative, IpNegative::Same) && s.true_cfg.is_some() && refs.iter().any(|r| r.kind() == "ip-adapter")
}

/// The IP-Adapter's image in true CFG's negative pass, when it has one of its
/// own ([`has_negative_image`]): its bytes and name (a black one made at the
/// output's size).
fn negative_image(s: &Settings, refs: &[Reference]) -> Result<Option<ImageFile>> {
    if !has_negative_image(s, refs) {
        return Ok(None);
    }
    Ok(match &s.ip_negative {
        IpNegative::Same => None,
        // As diffusers: `np.zeros((width, height, 3))`, the output's size transposed.
        IpNegative::Black => {
            let black = vec![0; s.width * s.height * 3];
            let bytes = crate::png_out::encode_png(s.height, s.width, &black, &[])?;
            Some(ImageFile { bytes, name: BLACK_NEGATIVE.to_string() })
        }
        IpNegative::Image(image) => Some(image.clone()),
    })
}

/// Registers every model the job uses (the image models only where a reference needs them).
fn register_all(reg: &mut Registry, src: &Sources, refs: &[Reference], s: &Settings) -> Result<Handles> {
    let dev = s.device_spec;
    let needs = |f: fn(&Reference) -> bool| refs.iter().any(f);
    // Every model but Flux (with its per-block units) is loaded whole by its
    // stage: the registry never plans to stream it.
    let spec = |name: &str, role, bytes| ModelSpec::uniform(name, role, dev, bytes, 1, name).resident_only();
    let flux_units = src.flux_units.specs_with_loras(s.dtype, s.gguf, &src.loras);
    let flux = if flux_units.is_empty() {
        spec("flux", Role::Diffusion, src.flux.1)
    } else {
        // Its embedders and final layer (unit 0) are never streamed.
        ModelSpec { units: flux_units, streamable: true, ..spec("flux", Role::Diffusion, 0) }.with_resident_units(1)
    };
    Ok(Handles {
        t5: reg.register(spec("t5", Role::TextEncoder, src.t5.1))?,
        clip: reg.register(spec("clip", Role::TextEncoder, src.clip.1))?,
        image_encoder: match &src.image_encoder {
            Some((_, bytes)) if uses_siglip(src, refs, s) => {
                Some(reg.register(spec("siglip", Role::ImageEncoder, *bytes))?)
            }
            _ => None,
        },
        clip_vision: match &src.clip_vision {
            Some((_, bytes)) if src.ip_is_xlabs && needs(|r| matches!(r, Reference::Image { .. })) => {
                Some(reg.register(spec("clip-vision", Role::ImageEncoder, *bytes))?)
            }
            _ => None,
        },
        ip: match &src.ip_adapter {
            Some((_, bytes)) if needs(|r| r.kind() == "ip-adapter") => {
                Some(reg.register(spec("ip-adapter", Role::IpProcessors, *bytes))?)
            }
            _ => None,
        },
        redux: match &src.redux {
            Some((_, bytes)) if needs(|r| r.kind() == "redux") => {
                Some(reg.register(spec("redux", Role::Projection, *bytes))?)
            }
            _ => None,
        },
        // Blocks are the units Flux is streamed in; 57 for FLUX.1 (+1 for embedders and final layer).
        flux: reg.register(flux)?,
        vae: reg.register(spec("vae", Role::Vae, src.vae.1))?,
        vae_encoder: if s.encodes_images(src) {
            Some(reg.register(spec("vae-encoder", Role::Vae, src.vae_encoder_bytes))?)
        } else {
            None
        },
        depth: match &src.depth {
            Some((_, bytes)) if s.control.iter().any(|c| c.map == ControlMap::Depth) => {
                Some(reg.register(spec("depth", Role::ImageEncoder, *bytes))?)
            }
            _ => None,
        },
        // (`check_controlnet` refused a file no ControlNet setting runs.) Its
        // blocks stream as Flux's do; its base unit (embedders, own layers) never.
        controlnet: src
            .controlnet
            .iter()
            .enumerate()
            .map(|(i, net)| {
                let spec = ModelSpec {
                    units: net.units.clone(),
                    streamable: true,
                    ..spec(&controlnet_entry(i), Role::Diffusion, 0)
                };
                reg.register(spec.with_resident_units(1))
            })
            .collect::<std::result::Result<_, _>>()?,
    })
}

/// Runs a registry job for `stage` over `models`, with the later stages as lookahead.
/// Loads `models` for a stage that needs `working` bytes besides them (beyond the registry's margin).
fn job(
    reg: &mut Registry,
    stage: &str,
    (dev, working): (DeviceSpec, u64),
    models: &[ModelId],
    later: Vec<Vec<ModelId>>,
) -> Result<JobPlan> {
    reg.begin_stage(stage);
    Ok(reg.load_for_job(&JobRequest::new(dev, models).working(working).lookahead(later))?)
}

fn timed<T>(
    stages: &mut Vec<(&'static str, Duration)>,
    name: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let t = Instant::now();
    let out = f()?;
    stages.push((name, t.elapsed()));
    tracing::info!(stage = name, ms = t.elapsed().as_secs_f64() * 1e3, "stage done");
    Ok(out)
}

/// Hands what the allocators cache back to the platform between stages. A
/// failure costs only memory other programs could have had, so it is a
/// warning, not the run's end.
fn release_cache(reg: &mut Registry, reason: &str) {
    if let Err(e) = reg.release_cached(reason) {
        tracing::warn!(target: "ipaflux::registry", "allocator cache kept after {reason}: {e}");
    }
}

/// The registry's devices for a run on `dev`: host memory, plus the GPU
/// itself (capacity and free memory from the driver) when it is one.
fn memory_devices(dev: DeviceSpec, budget: Option<u64>) -> Result<Vec<Box<dyn ipaflux_core::registry::MemoryDevice>>> {
    let host: Box<dyn ipaflux_core::registry::MemoryDevice> = Box::new(HostMemory::unbounded());
    let gpu: Option<Box<dyn ipaflux_core::registry::MemoryDevice>> = match dev {
        DeviceSpec::Cpu if budget.is_some() => {
            return Err(ipaflux_core::Error::Unsupported(
                "--vram-budget limits a GPU; on the CPU every model is resident in host memory".into(),
            )
            .into())
        }
        DeviceSpec::Cpu => None,
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Some(Box::new(crate::cuda::pool::PooledCuda::new(match budget {
            Some(b) => ipaflux_core::registry::CudaMemory::with_budget(i, b)?,
            None => ipaflux_core::registry::CudaMemory::new(i)?,
        }))),
        other => {
            return Err(ipaflux_core::Error::Unsupported(format!(
                "generate runs on the CPU{}, not on {other}",
                if cfg!(feature = "cuda") { " or CUDA" } else { " (this build has no `cuda` feature)" }
            ))
            .into())
        }
    };
    Ok(std::iter::once(host).chain(gpu).collect())
}

/// Runs the pipeline. `on_step` is called after each sampler step.
pub fn generate(
    src: &Sources,
    refs: &[Reference],
    s: &Settings,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<Generated> {
    let variant = check_settings(src, s)?;
    check_references(src, refs)?;
    check_ip_negative(src, refs, s)?;
    let steps_run = s.steps_run()?;
    let dev = s.device_spec;
    let mut reg = Registry::new(s.registry.clone(), memory_devices(dev, s.vram_budget)?)?;
    let h = register_all(&mut reg, src, refs, s)?;
    let mut stages = Vec::new();
    let (flux_id, vae_id) = (h.flux.model, h.vae.model);
    let image_models: Vec<ModelId> =
        [&h.ip, &h.image_encoder, &h.clip_vision, &h.redux].into_iter().flatten().map(|m| m.model).collect();
    // The models of the stages after `now`, as the registry's lookahead (the
    // image stage only when it has models; the text and init-image stages come
    // before all of these).
    let mut sample_models = vec![flux_id];
    sample_models.extend(h.controlnet.iter().map(|c| c.model));
    let later = |now: &str| -> Vec<Vec<ModelId>> {
        let stages = [("image", image_models.clone()), ("sample", sample_models.clone()), ("decode", vec![vae_id])];
        let from = stages.iter().position(|(name, _)| *name == now).map_or(0, |i| i + 1);
        stages[from..].iter().filter(|(_, m)| !m.is_empty()).map(|(_, m)| m.clone()).collect()
    };

    // Text: T5 tokens and the pooled CLIP vector, of the prompt (and the negative prompt).
    job(&mut reg, "text", (dev, 0), &[h.t5.model, h.clip.model], later("text"))?;
    let mut prompts = vec![s.prompt.as_str()];
    prompts.extend(s.true_cfg.as_ref().map(|c| c.negative_prompt.as_str()));
    let mut texts = timed(&mut stages, "text encoders", || encode_prompts(src, &prompts, s))?;
    reg.release(h.t5);
    reg.release(h.clip);
    // Each stage's models and activations are dropped by now: what the CUDA
    // memory pool kept of them goes back to the driver (a no-op elsewhere).
    release_cache(&mut reg, "text encoders done");

    // The control images' maps (depth maps with the depth model, loaded for this alone).
    let control = match h.depth {
        Some(depth) => {
            job(&mut reg, "control map", (dev, 0), &[depth.model], later("control map"))?;
            let maps = timed(&mut stages, "depth map", || control_images(src, &s.control))?;
            reg.release(depth);
            release_cache(&mut reg, "depth map made");
            maps
        }
        None => control_images(src, &s.control)?,
    };

    // Image-to-image: the init image's latents; Kontext's and a control
    // image's latents (the encoder loaded for this alone).
    let mut encoded = match h.vae_encoder {
        Some(encoder) => {
            job(&mut reg, "image latents", (dev, 0), &[encoder.model], later("image latents"))?;
            let latents = timed(&mut stages, "vae encode", || encode_images(src, s, variant, &control))?;
            reg.release(encoder);
            release_cache(&mut reg, "init, Kontext and control images encoded");
            latents
        }
        None => Encoded::default(),
    };
    encoded.control_pixels = control
        .iter()
        .enumerate()
        .map(|(i, c)| match s.control_reads(src, i).pixels {
            true => control_pixels(c, (s.width, s.height), &s.device).map(Some),
            false => Ok(None),
        })
        .collect::<Result<_>>()?;

    // Reference images → IP image prompt embeddings → per-block K/V (computed
    // once), and Redux tokens after the prompt's.
    let mut referenced = Referenced::default();
    if !image_models.is_empty() {
        job(&mut reg, "image", (dev, 0), &image_models, later("image"))?;
        referenced = timed(&mut stages, "reference images", || reference_images(src, refs, s))?;
        reg.embeddings_ready(&image_models)?;
        for m in [h.image_encoder, h.clip_vision, h.ip, h.redux].into_iter().flatten() {
            reg.release(m);
        }
        release_cache(&mut reg, "reference images encoded");
    }
    texts[0].txt = append_image_tokens(&texts[0].txt, &referenced.redux)?;
    let kv_bytes = referenced.kv_bytes;
    let kv = match kv_bytes {
        0 => None,
        b => {
            Some(reg.register(ModelSpec::uniform("ip-kv-cache", Role::Cache, dev, b as u64, 1, "kv").resident_only())?)
        }
    };

    // Sampling: the blocks the registry did not make resident are streamed.
    let dequantizing = if s.gguf == GgufWeights::Quantized {
        src.flux_units.kept_quantized_working(s.dtype, !src.loras.is_empty())
    } else {
        0
    };
    let mut sampled = sample_models.clone();
    sampled.extend(kv.as_ref().map(|k| k.model));
    let plan = job(&mut reg, "sample", (dev, dequantizing), &sampled, later("sample"))?;
    let streamed = match plan.placements.iter().find(|p| p.model == flux_id) {
        Some(p) if !p.streamed.is_empty() => src.flux_units.blocks(&p.streamed)?,
        _ => Vec::new(),
    };
    let streamed_controlnet = h
        .controlnet
        .iter()
        .zip(&src.controlnet)
        .map(|(handle, net)| match plan.placements.iter().find(|p| p.model == handle.model) {
            Some(p) if !p.streamed.is_empty() => {
                Ok(ipaflux_core::flux::stream::blocks_of_units(&net.dims.blocks, &p.streamed)?)
            }
            _ => Ok(Vec::new()),
        })
        .collect::<Result<Vec<_>>>()?;
    reg.stream(&plan, (steps_run * s.batch * prompts.len()) as u64);
    let start = SampleStart { encoded: &encoded, streamed: &streamed, streamed_controlnet: &streamed_controlnet };
    let ip = (referenced.ip, referenced.negative_ip, referenced.adapter_dims);
    let latents = timed(&mut stages, "sampling", || sample(src, ip, &texts, s, start, on_step))?;
    if let Some(kv) = kv {
        reg.release(kv);
    }
    for controlnet in h.controlnet {
        reg.release(controlnet);
    }
    reg.release(h.flux);
    release_cache(&mut reg, "sampling done");

    // Decode.
    job(&mut reg, "decode", (dev, 0), &[vae_id], later("decode"))?;
    let images = timed(&mut stages, "vae decode", || decode_all(src, latents, s))?;
    reg.release(h.vae);
    release_cache(&mut reg, "decoded");
    reg.audit()?;
    let (width, height) = (s.width, s.height);
    Ok(Generated { width, height, images, timeline: reg.drain_events(), stages, ip_kv_bytes: kv_bytes })
}

/// What the VAE encoder makes of the init, Kontext and control images.
#[derive(Default)]
struct Encoded {
    init: Option<InitLatents>,
    kontext: Option<KontextLatents>,
    /// Each control image's packed latents `[1, tokens, 64]` (FLUX.1
    /// Canny/Depth's input channels, or a ControlNet's input); `None` where
    /// only nets that read pixels read it.
    control: Vec<Option<Tensor>>,
    /// Each control image's pixels `[1, 3, H, W]` in [-1, 1] at the output
    /// size, for ControlNets that read them (XLabs'); `None` where none does.
    control_pixels: Vec<Option<Tensor>>,
}

impl Encoded {
    /// The extra input channels of every pass of a `variant` Flux: Fill's
    /// conditioning or FLUX.1 Canny/Depth's control latents.
    fn channels(&self, variant: FluxVariant) -> Option<&Tensor> {
        match variant {
            FluxVariant::Fill => self.init.as_ref().and_then(|i| i.fill.as_ref()),
            FluxVariant::Control => self.control.first().and_then(Option::as_ref),
            FluxVariant::Base => None,
        }
    }
}

/// The init, Kontext and control images' latents, with one loaded VAE encoder.
fn encode_images(
    src: &Sources,
    s: &Settings,
    variant: FluxVariant,
    control: &[ipaflux_core::preprocess::RgbImage],
) -> Result<Encoded> {
    let vae = VaeEncoder::new(&(src.vae.0)()?, s.dtype, &s.device)?;
    let fill = variant == FluxVariant::Fill;
    let init = s.init.as_ref().map(|init| encode_init(&vae, init, s, fill)).transpose()?;
    let kontext = s.kontext.as_ref().map(|k| encode_kontext(&vae, k, s)).transpose()?;
    let control = control
        .iter()
        .enumerate()
        .map(|(i, c)| match s.control_reads(src, i).latents {
            true => control_latents(&vae, c, (s.width, s.height), &s.device).map(Some),
            false => Ok(None),
        })
        .collect::<Result<_>>()?;
    Ok(Encoded { init, kontext, control, control_pixels: Vec::new() })
}

/// Each seed's final latents → its RGB image, with one loaded VAE decoder.
fn decode_all(src: &Sources, latents: Vec<(u64, Tensor)>, s: &Settings) -> Result<Vec<Image>> {
    let vae = VaeDecoder::new(&(src.vae.0)()?, s.dtype, &s.device)?;
    let decode = |(seed, latents): (u64, Tensor)| {
        let img = vae.decode(&sampler::unpack(&latents, s.height / 8, s.width / 8)?)?;
        let (_, _, rgb) = crate::vae::to_rgb8(&img)?;
        Ok(Image { seed, rgb })
    };
    latents.into_iter().map(decode).collect()
}

/// Refuses settings that cannot run with these models, before any model is
/// read; returns what Flux takes besides the latents.
fn check_settings(src: &Sources, s: &Settings) -> Result<FluxVariant> {
    let refuse = |m: String| Err(crate::Error::from(ipaflux_core::Error::Unsupported(m)));
    sampler::check_size(s.width, s.height)?;
    if s.batch == 0 || s.batch > MAX_BATCH {
        return refuse(format!("batch {} is outside 1..={MAX_BATCH}", s.batch));
    }
    s.steps_run()?;
    if let Some(cfg) = s.true_cfg.as_ref().filter(|c| !(c.scale > 1.0 && c.scale <= MAX_TRUE_CFG)) {
        return refuse(format!(
            "true CFG scale {} is outside (1, {MAX_TRUE_CFG}]: at 1 the negative prompt has no effect",
            cfg.scale
        ));
    }
    let variant = FluxVariant::from_in_channels(src.flux_in_channels)?;
    let fill = variant == FluxVariant::Fill;
    if fill && s.init.as_ref().and_then(|i| i.mask.as_ref()).is_none() {
        return refuse(
            "this Flux is FLUX.1 Fill (384 input channels): it repaints the white part of a --mask over an \
             --init-image; give both"
                .into(),
        );
    }
    check_controlnet(src, s, variant)?;
    match (variant, s.control.as_slice()) {
        (FluxVariant::Control, []) => {
            return refuse(
                "this Flux is FLUX.1 Canny/Depth (128 input channels): give the --control-image it follows (an \
                 edge or depth map)"
                    .into(),
            )
        }
        (FluxVariant::Control, [_, _, ..]) => {
            return refuse(format!("FLUX.1 Canny/Depth follows one control image, and {} were given", s.control.len()))
        }
        (FluxVariant::Base, [_, ..]) if !s.controlnet.is_empty() => {}
        (FluxVariant::Base | FluxVariant::Fill, [c, ..]) => {
            return refuse(format!(
                "{}: a control image goes with FLUX.1 Canny or Depth (128 input channels) or a --controlnet, and \
                 this Flux takes {}",
                c.image.name, src.flux_in_channels
            ))
        }
        _ => {}
    }
    if let Some(c) = s.control.iter().find(|c| c.map == ControlMap::Depth).filter(|_| src.depth.is_none()) {
        return refuse(format!(
            "{}: a control image's depth map needs a depth model: give --control-depth",
            c.image.name
        ));
    }
    if s.encodes_images(src) && src.vae_encoder_bytes == 0 {
        return refuse(
            "an init, Kontext or control image needs the VAE's encoder, and this VAE file has only the decoder: \
             give the whole VAE (BFL's ae.safetensors, or a diffusers vae/ folder)"
                .into(),
        );
    }
    if s.kontext.is_some() && variant != FluxVariant::Base {
        let name = if fill { "FLUX.1 Fill" } else { "FLUX.1 Canny/Depth" };
        return refuse(format!("a Kontext image goes with FLUX.1 Kontext, not {name}: give one or the other"));
    }
    Ok(variant)
}

/// Refuses ControlNet settings that cannot run: each net file is run, each
/// setting names a net; the nets need their control images (one for all or
/// one each) and the plain Flux (not Fill, Canny/Depth or Kontext); each
/// setting is checked by [`check_controlnet_setting`].
fn check_controlnet(src: &Sources, s: &Settings, variant: FluxVariant) -> Result<()> {
    let refuse = |m: String| Err(crate::Error::from(ipaflux_core::Error::Unsupported(m)));
    if src.controlnet.is_empty() && s.controlnet.is_empty() {
        return Ok(());
    }
    if let Some(c) = s.controlnet.iter().find(|c| c.net >= src.controlnet.len()) {
        return refuse(format!(
            "ControlNet settings for net {} of {}: give --controlnet",
            c.net + 1,
            src.controlnet.len()
        ));
    }
    if let Some(unused) = (0..src.controlnet.len()).find(|&i| s.controlnet.iter().all(|c| c.net != i)) {
        return refuse(format!("{}: a ControlNet was given without its settings", src.controlnet[unused].name));
    }
    let (images, nets) = (s.control.len(), s.controlnet.len());
    if images == 0 {
        return refuse("a ControlNet follows a control image: give --control-image".into());
    }
    if images != 1 && images != nets {
        return refuse(format!(
            "{images} control images for {nets} ControlNets: give one they all read, or one per --controlnet, in order"
        ));
    }
    if variant != FluxVariant::Base || s.kontext.is_some() {
        return refuse(
            "a ControlNet goes with FLUX.1-dev or schnell, not FLUX.1 Fill, Canny/Depth or a Kontext image".into(),
        );
    }
    for (k, c) in s.controlnet.iter().enumerate() {
        check_controlnet_setting(&src.controlnet[c.net], c).map_err(|e| match nets {
            1 => e,
            _ => {
                ipaflux_core::Error::Unsupported(format!("ControlNet {} ({}): {e}", k + 1, src.controlnet[c.net].name))
            }
        })?;
    }
    Ok(())
}

/// Refuses one ControlNet setting that cannot run: a Union net needs its
/// mode (one it has), a single-purpose net none; a window inside [0, 1], a
/// finite scale.
fn check_controlnet_setting(
    net: &ControlNetSource,
    c: &ControlNetSettings,
) -> std::result::Result<(), ipaflux_core::Error> {
    let refuse = |m: String| Err(ipaflux_core::Error::Unsupported(m));
    match (net.dims.modes, c.mode) {
        (Some(n), None) => {
            return refuse(format!(
                "this is a Union ControlNet ({n} modes): give --controlnet-mode ({})",
                UNION_MODES.join(", ")
            ))
        }
        (Some(n), Some(m)) if m >= n => return refuse(format!("control mode {m}: this Union ControlNet has 0..{n}")),
        (None, Some(m)) => {
            return refuse(format!(
                "--controlnet-mode {m} given, but this ControlNet has no modes (not a Union net; among several \
                 nets, give one --controlnet-mode per net, `none` for this one)"
            ))
        }
        _ => {}
    }
    match c.window {
        ControlWindow::Steps { start, end }
            if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end =>
        {
            return refuse(format!(
                "ControlNet window {start}..{end} (fractions of the steps): give 0 <= start < end <= 1"
            ))
        }
        ControlWindow::Sigmas(w) if w.sigma_end > w.sigma_start => {
            return refuse("ControlNet window: its start percent is after its end percent".into())
        }
        _ => {}
    }
    if !c.scale.is_finite() {
        return refuse(format!("ControlNet scale {}", c.scale));
    }
    Ok(())
}

/// Refuses a negative image (black or a picture) that cannot be used: it
/// needs true CFG, an IP-Adapter reference, and the encoder of that adapter.
fn check_ip_negative(src: &Sources, refs: &[Reference], s: &Settings) -> Result<()> {
    let refuse = |m: String| Err(crate::Error::from(ipaflux_core::Error::Unsupported(m)));
    let what = match &s.ip_negative {
        IpNegative::Same => return Ok(()),
        IpNegative::Black => "black",
        IpNegative::Image(_) => "IMAGE",
    };
    if s.true_cfg.is_none() {
        return refuse(format!(
            "--ip-negative {what} is the IP-Adapter's image in true CFG's negative pass: give --true-cfg above 1"
        ));
    }
    if !refs.iter().any(|r| r.kind() == "ip-adapter") {
        return refuse(format!("--ip-negative {what} needs IP-Adapter references (--image or --embeds)"));
    }
    if !src.ip_is_xlabs && src.image_encoder.is_none() {
        return refuse(format!("--ip-negative {what} encodes its image with SigLIP: give --siglip"));
    }
    Ok(())
}

/// Refuses references these models cannot read, before any model is read.
fn check_references(src: &Sources, refs: &[Reference]) -> Result<()> {
    let refuse = |m: &str| Err(crate::Error::from(ipaflux_core::Error::Unsupported(m.to_string())));
    let any = |f: fn(&Reference) -> bool| refs.iter().any(f);
    let ip_refs = any(|r| r.kind() == "ip-adapter");
    if ip_refs && src.ip_adapter.is_none() {
        return refuse(
            "--image and --embeds need --ip-adapter (InstantX's ip-adapter.bin or XLabs' ip_adapter.safetensors)",
        );
    }
    if src.ip_is_xlabs && any(|r| matches!(r, Reference::Embeds { .. })) {
        return refuse(
            "--embeds hold InstantX's image_prompt_embeds; XLabs' IP-Adapter takes --image (read with --clip-vision)",
        );
    }
    if src.ip_is_xlabs && any(|r| matches!(r, Reference::Image { .. })) && src.clip_vision.is_none() {
        return refuse(
            "this IP-Adapter is XLabs' and reads images with CLIP: give --clip-vision (openai/clip-vit-large-patch14)",
        );
    }
    if refs.iter().any(|r| needs_siglip(src, r)) && src.image_encoder.is_none() {
        return refuse("InstantX's IP-Adapter and Redux read images with SigLIP: give --siglip");
    }
    Ok(())
}

/// Each prompt's T5 tokens and pooled CLIP vector (T5 dropped before CLIP loads),
/// with the text encoders' LoRA parts merged.
fn encode_prompts(src: &Sources, prompts: &[&str], s: &Settings) -> Result<Vec<Conditioning>> {
    let f = (src.t5.0)()?;
    if t5_dtype(s.dtype) != s.dtype {
        tracing::info!(target: "ipaflux::generate", "T5 runs in bf16: it overflows in f16");
    }
    let weights = apply_to_text_encoder(&src.loras, TextEncoder::T5, f.weights)?;
    let mut t5 = T5Encoder::new(&f.config, &weights, &f.tokenizer, s.t5_max_len, t5_dtype(s.dtype), &s.device)?;
    let txts = prompts.iter().map(|p| Ok(t5.encode(p)?.1)).collect::<Result<Vec<_>>>()?;
    drop(t5);
    let f = (src.clip.0)()?;
    let weights = apply_to_text_encoder(&src.loras, TextEncoder::Clip, f.weights)?;
    let clip = ClipEncoder::new(&f.config, &weights, &f.tokenizer, s.dtype, &s.device)?;
    let ys = prompts.iter().map(|p| Ok(clip.encode(p)?.1)).collect::<Result<Vec<_>>>()?;
    Ok(txts.into_iter().zip(ys).map(|(txt, y)| Conditioning { txt, y, guidance: Some(s.guidance) }).collect())
}

/// What the references give: the IP-Adapter's per-block K/V, and Redux tokens.
#[derive(Default)]
struct Referenced {
    ip: Vec<IpImage>,
    /// The IP images of true CFG's negative pass when they are not `ip` ([`IpNegative::Black`], [`IpNegative::Image`]).
    negative_ip: Option<Vec<IpImage>>,
    adapter_dims: AdapterDims,
    /// Bytes of the IP K/V of all references.
    kv_bytes: usize,
    /// Each Redux image's tokens `[1, N, context]` with its strength.
    redux: Vec<(Tensor, f64)>,
}

/// Which IP-Adapter the K/V are for, with its sizes.
#[derive(Debug, Clone, Copy, Default)]
enum AdapterDims {
    #[default]
    None,
    InstantX(IpAdapterDims),
    Xlabs(XlabsDims),
}

/// A loaded IP-Adapter of either kind.
enum Adapter {
    InstantX(IpAdapter),
    Xlabs(XlabsIpAdapter),
}

/// The IP-Adapter of either kind from its tensors, checked against the image
/// encoder that feeds it (SigLIP's width, or CLIP's `image_embeds` for XLabs').
fn load_adapter(
    store: TensorStore,
    xlabs: bool,
    siglip: Option<&ImageEncoder>,
    clip: Option<&ClipImageEncoder>,
    s: &Settings,
) -> Result<Adapter> {
    if xlabs {
        let adapter = XlabsIpAdapter::from_store(&store, s.dtype, &s.device)?;
        if let Some(c) = clip {
            crate::clip_vision::check_xlabs_fits(&adapter.dims, &store.source_name, &c.config)?;
        }
        return Ok(Adapter::Xlabs(adapter));
    }
    let adapter = IpAdapter::from_store(&store, s.dtype, &s.device)?;
    if let Some(e) = siglip {
        crate::encode::check_adapter_fits(&adapter, &store.source_name, e.hidden_size())?;
    }
    Ok(Adapter::InstantX(adapter))
}

/// Reads every reference with one loaded SigLIP (or CLIP, for XLabs'
/// adapter), adapter and Redux embedder: IP references become K/V, Redux
/// images tokens.
fn reference_images(src: &Sources, refs: &[Reference], s: &Settings) -> Result<Referenced> {
    let unsupported = |m: &str| crate::Error::from(ipaflux_core::Error::Unsupported(m.to_string()));
    let encoder = match &src.image_encoder {
        Some((load, _)) if uses_siglip(src, refs, s) => Some(load()?),
        _ => None,
    };
    let siglip = || encoder.as_ref().ok_or_else(|| unsupported("a reference image needs --siglip (the image encoder)"));
    let clip = match &src.clip_vision {
        Some((load, _)) if src.ip_is_xlabs && refs.iter().any(|r| matches!(r, Reference::Image { .. })) => {
            Some(load()?)
        }
        _ => None,
    };
    let adapter = match &src.ip_adapter {
        Some((load, _)) if refs.iter().any(|r| !matches!(r, Reference::Redux { .. })) => {
            Some(load_adapter(load()?, src.ip_is_xlabs, encoder.as_ref(), clip.as_ref(), s)?)
        }
        _ => None,
    };
    let redux = match &src.redux {
        Some((load, _)) if refs.iter().any(|r| matches!(r, Reference::Redux { .. })) => {
            let store = load()?;
            let redux = ReduxImageEncoder::from_store(&store, s.dtype, &s.device)?;
            let width = siglip()?.hidden_size();
            if redux.dims.siglip_dim != width {
                return Err(ipaflux_core::Error::Shape(format!(
                    "{}: the Redux model expects {}-wide SigLIP tokens but the SigLIP model gives {width}",
                    store.source_name, redux.dims.siglip_dim
                ))
                .into());
            }
            Some(redux)
        }
        _ => None,
    };
    let cfg = IpAttentionConfig { head_dim: src.flux_head_dim, v_norm: s.v_norm };
    let mut out = Referenced::default();
    for r in refs {
        let (embeds, weight) = match r {
            Reference::Redux { bytes, name, weight } => {
                let redux =
                    redux.as_ref().ok_or_else(|| unsupported("a Redux image needs --redux (the Redux model)"))?;
                let e = siglip()?;
                let tokens = redux.forward(&e.siglip.last_hidden_state(&e.pixels(bytes, name)?)?)?;
                out.redux.push((tokens, *weight));
                continue;
            }
            Reference::Image { bytes, name, weight } => match adapter.as_ref() {
                Some(Adapter::Xlabs(xlabs)) => {
                    let c = clip.as_ref().ok_or_else(|| unsupported("XLabs' IP-Adapter needs --clip-vision"))?;
                    let tokens = xlabs.project(&c.image_embeds(&c.pixels(bytes, name)?)?)?;
                    out.ip.push(IpImage { kv: xlabs.kv_all(&tokens, src.flux_head_dim)?, weight: *weight });
                    out.adapter_dims = AdapterDims::Xlabs(xlabs.dims);
                    continue;
                }
                Some(Adapter::InstantX(adapter)) => {
                    let e = siglip()?;
                    let pooled = e.siglip.forward(&e.pixels(bytes, name)?)?;
                    (adapter.image_proj.forward(&pooled.to_dtype(s.dtype)?)?, *weight)
                }
                None => return Err(unsupported("a reference image needs --ip-adapter")),
            },
            Reference::Embeds { image_prompt_embeds, name, weight } => {
                let Some(Adapter::InstantX(adapter)) = adapter.as_ref() else {
                    return Err(unsupported("--embeds need InstantX's --ip-adapter"));
                };
                let want = [1, adapter.dims.num_tokens, adapter.dims.cross_dim];
                if image_prompt_embeds.dims() != want {
                    return Err(ipaflux_core::Error::Shape(format!(
                        "{name}: image_prompt_embeds {:?} do not fit this IP-Adapter ({want:?})",
                        image_prompt_embeds.dims()
                    ))
                    .into());
                }
                (image_prompt_embeds.clone(), *weight)
            }
        };
        let Some(Adapter::InstantX(adapter)) = adapter.as_ref() else {
            return Err(unsupported("an IP reference needs --ip-adapter"));
        };
        let kv = adapter.kv_all(&embeds.to_device(&s.device)?.to_dtype(s.dtype)?, &cfg)?;
        out.ip.push(IpImage { kv, weight });
        out.adapter_dims = AdapterDims::InstantX(adapter.dims);
    }
    if let Some(negative) = negative_image(s, refs)? {
        // As diffusers: the negative picture through the same encoder and adapter.
        let (bytes, name) = (&negative.bytes, negative.name.as_str());
        let kv = match adapter.as_ref() {
            Some(Adapter::Xlabs(xlabs)) => {
                let c = clip.as_ref().ok_or_else(|| unsupported("XLabs' IP-Adapter needs --clip-vision"))?;
                xlabs.kv_all(&xlabs.project(&c.image_embeds(&c.pixels(bytes, name)?)?)?, src.flux_head_dim)?
            }
            Some(Adapter::InstantX(adapter)) => {
                let e = siglip()?;
                let pooled = e.siglip.forward(&e.pixels(bytes, name)?)?;
                adapter.kv_all(&adapter.image_proj.forward(&pooled.to_dtype(s.dtype)?)?, &cfg)?
            }
            None => return Err(unsupported("a negative IP image needs --ip-adapter")),
        };
        out.negative_ip = Some(vec![IpImage { kv, weight: 1.0 }]);
    }
    let all = out.ip.iter().chain(out.negative_ip.iter().flatten());
    out.kv_bytes = all.flat_map(|i| &i.kv).map(|kv| kv.nbytes()).sum();
    Ok(out)
}

/// An init image's packed latents `[1, tokens, 64]`, and its packed inpainting
/// mask (blended after each step), or FLUX.1 Fill's conditioning channels.
struct InitLatents {
    image: Tensor,
    mask: Option<Tensor>,
    fill: Option<Tensor>,
}

/// FLUX.1 Canny/Depth's conditioning: the control image at the output size
/// (`width × height`, Lanczos when it differs) → its packed VAE latents
/// `[1, tokens, 64]`, as diffusers' `FluxControlPipeline` (with the mean).
pub fn control_latents(
    encoder: &VaeEncoder,
    control: &ipaflux_core::preprocess::RgbImage,
    (width, height): (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let image = fitted_rgb(control.clone(), "the control image", width, height);
    Ok(sampler::pack(&encoder.encode(&crate::vae::from_rgb8(&image, device)?)?)?)
}

/// An XLabs ControlNet's input: the control image at the output size
/// (Lanczos) as pixels `[1, 3, H, W]` in [-1, 1], as diffusers'
/// `FluxControlNetPipeline` prepares it for a net with a hint block.
pub fn control_pixels(
    control: &ipaflux_core::preprocess::RgbImage,
    (width, height): (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    crate::vae::from_rgb8(&fitted_rgb(control.clone(), "the control image", width, height), device)
}

/// A picture at the output size: as decoded, or resized with Lanczos (as
/// diffusers fits init images, masks and control images).
fn fitted(bytes: &[u8], name: &str, width: usize, height: usize) -> Result<ipaflux_core::preprocess::RgbImage> {
    Ok(fitted_rgb(ipaflux_core::preprocess::decode_rgb(bytes, name)?, name, width, height))
}

/// [`fitted`] for a decoded picture.
fn fitted_rgb(
    image: ipaflux_core::preprocess::RgbImage,
    name: &str,
    width: usize,
    height: usize,
) -> ipaflux_core::preprocess::RgbImage {
    use ipaflux_core::preprocess::{resize, Resample};
    if (image.width, image.height) == (width, height) {
        return image;
    }
    tracing::info!(
        target: "ipaflux::generate",
        "{name} is {}×{}: resized to {}×{} (Lanczos)",
        image.width, image.height, width, height
    );
    resize(&image, width, height, Resample::Lanczos)
}

/// The init image → packed latents at the output size, and its mask → the
/// packed latent mask, or for FLUX.1 Fill (`fill`) its conditioning: the
/// masked image's latents (the image with the repainted part set to 0, mid
/// gray, as diffusers' `FluxFillPipeline`) and the 8×8 mask.
fn encode_init(encoder: &VaeEncoder, init: &InitImage, s: &Settings, fill: bool) -> Result<InitLatents> {
    let pixels = crate::vae::from_rgb8(&fitted(&init.bytes, &init.name, s.width, s.height)?, &s.device)?;
    let luma = match &init.mask {
        Some(m) => Some(ipaflux_core::preprocess::to_luma(&fitted(&m.bytes, &m.name, s.width, s.height)?)),
        None => None,
    };
    let image = sampler::pack(&encoder.encode(&pixels)?)?;
    match luma {
        Some(luma) if fill => {
            let plane = sampler::mask_plane(&luma, s.width, s.height, &s.device)?;
            let masked = pixels.broadcast_mul(&plane.affine(-1.0, 1.0)?)?;
            let masked = sampler::pack(&encoder.encode(&masked)?)?;
            let cond = Tensor::cat(&[&masked, &sampler::fill_mask(&plane)?], 2)?;
            Ok(InitLatents { image, mask: None, fill: Some(cond) })
        }
        Some(luma) => {
            let mask = sampler::latent_mask(&luma, s.width, s.height, &s.device)?;
            Ok(InitLatents { image, mask: Some(mask), fill: None })
        }
        None => Ok(InitLatents { image, mask: None, fill: None }),
    }
}

/// A Kontext image's packed latents and their token positions.
struct KontextLatents {
    tokens: Tensor,
    ids: Vec<[f32; 3]>,
}

/// The Kontext image → packed latents, at the closest trained resolution
/// (resized with Lanczos, as diffusers) or its own size cropped to whole tokens.
fn encode_kontext(encoder: &VaeEncoder, k: &Kontext, s: &Settings) -> Result<KontextLatents> {
    use ipaflux_core::flux::kontext::{preferred_size, reference_ids};
    use ipaflux_core::preprocess::{decode_rgb, resize, Resample};
    let image = decode_rgb(&k.image.bytes, &k.image.name)?;
    let (w, h) = if k.auto_resize {
        preferred_size(image.width, image.height)
    } else {
        let tile = sampler::PIXELS_PER_TOKEN;
        (image.width / tile * tile, image.height / tile * tile)
    };
    sampler::check_size(w, h)?;
    let image = if (image.width, image.height) == (w, h) { image } else { resize(&image, w, h, Resample::Lanczos) };
    tracing::info!(target: "ipaflux::generate", "Kontext image {} at {w}×{h}", k.image.name);
    let tokens = sampler::pack(&encoder.encode(&crate::vae::from_rgb8(&image, &s.device)?)?)?;
    let (rows, cols) = sampler::token_grid(w, h);
    Ok(KontextLatents { tokens, ids: reference_ids(rows, cols) })
}

/// Where sampling starts: the encoded images (an init image's latents, else
/// noise alone; Kontext's tokens; extra input channels), and the Flux blocks streamed.
#[derive(Clone, Copy)]
struct SampleStart<'a> {
    encoded: &'a Encoded,
    streamed: &'a [BlockId],
    /// Each ControlNet file's blocks streamed ([`Sources::controlnet`]'s order).
    streamed_controlnet: &'a [Vec<BlockId>],
}

fn sample(
    src: &Sources,
    (images, negative_images, adapter_dims): (Vec<IpImage>, Option<Vec<IpImage>>, AdapterDims),
    texts: &[Conditioning],
    s: &Settings,
    SampleStart { encoded, streamed, streamed_controlnet }: SampleStart<'_>,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<Vec<(u64, Tensor)>> {
    let files = (src.flux.0)()?;
    let load = FluxLoad { dtype: s.dtype, device: &s.device, streamed, gguf: s.gguf, loras: &src.loras };
    let (mut model, kept) = FluxModel::from_store_with(files.weights, files.axes_dim, &load)?;
    if !streamed.is_empty() {
        let u = &src.flux_units;
        if (u.depth, u.depth_single) != (model.cfg.depth, model.cfg.depth_single) {
            return Err(ipaflux_core::Error::Shape(format!(
                "Flux has {}+{} blocks but its headers listed {}+{}: cannot map the registry's streamed units",
                model.cfg.depth, model.cfg.depth_single, u.depth, u.depth_single
            ))
            .into());
        }
        tracing::info!(target: "ipaflux::stream", blocks = streamed.len(), "Flux runs with blocks streamed");
        model.set_block_source(block_source(kept, streamed, &s.device)?);
    }
    model.set_attention(crate::attention_for(&s.device, s.kernels));
    model.set_fused_modulation(crate::modulation_for(&s.device, s.kernels));
    let cfg = IpHookConfig {
        weight: s.ip_weight,
        window: IpWindow::from_percent(s.start_percent, s.end_percent, COMFY_FLUX_SHIFT),
        block_weights: s.block_weights.clone(),
    };
    let attention = crate::attention_for(&s.device, s.kernels);
    let hook_of = |images: Vec<IpImage>| -> Result<Option<Box<dyn AttentionHook>>> {
        Ok(match adapter_dims {
            _ if images.is_empty() => None,
            AdapterDims::InstantX(dims) => {
                check_compatible(&dims, &model.cfg)?;
                let hook = IpAdapterHook::new(images, cfg.clone(), &model.cfg)?.with_attention(attention.clone());
                Some(Box::new(hook))
            }
            AdapterDims::Xlabs(dims) => {
                dims.check_compatible(&model.cfg)?;
                Some(Box::new(XlabsHook::new(images, cfg.clone(), &model.cfg)?.with_attention(attention.clone())))
            }
            AdapterDims::None => {
                return Err(ipaflux_core::Error::Unsupported("IP K/V without their adapter's sizes".into()).into())
            }
        })
    };
    let hook = hook_of(images)?;
    // `None`: the negative pass runs the positive pass's hooks.
    let negative_hook = negative_images.map(hook_of).transpose()?;
    let (rows, cols) = sampler::token_grid(s.width, s.height);
    let shift = if model.cfg.guidance_embed { Shift::DEV } else { Shift::None };
    let mut sigmas = flux_schedule(s.steps, rows * cols, shift);
    if let Some(init) = &s.init {
        sigmas.drain(..sampler::img2img_start(s.steps, init.strength)?);
    }
    let channels = encoded.channels(FluxVariant::from_in_channels(model.cfg.in_channels)?);
    let reference = encoded.kontext.as_ref().map(|k| (&k.tokens, &k.ids[..]));
    // Each ControlNet file once, however many settings run it.
    let nets = src
        .controlnet
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let streamed = streamed_controlnet.get(i).map_or(&[][..], Vec::as_slice);
            let (mut net, kept) = (source.load)(streamed)?;
            if !streamed.is_empty() {
                tracing::info!(target: "ipaflux::stream", blocks = streamed.len(), "{} runs with blocks streamed", source.name);
                net.set_block_source(block_source(kept, streamed, &s.device)?);
            }
            // The kernels Flux runs with: its blocks are Flux's.
            net.set_attention(crate::attention_for(&s.device, s.kernels));
            net.set_fused_modulation(crate::modulation_for(&s.device, s.kernels));
            Ok(net)
        })
        .collect::<Result<Vec<_>>>()?;
    let control = s
        .controlnet
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let net =
                nets.get(c.net).ok_or_else(|| ipaflux_core::Error::Unsupported(format!("no ControlNet {}", c.net)))?;
            let i = s.control_index(k);
            let image = if net.takes_pixels() { &encoded.control_pixels } else { &encoded.control };
            let image = image.get(i).and_then(Option::as_ref).ok_or_else(|| {
                ipaflux_core::Error::Unsupported(format!("ControlNet {} without its control image", k + 1))
            })?;
            Ok(ControlInput { net, image, mode: c.mode, scale: c.scale, window: c.window })
        })
        .collect::<Result<Vec<_>>>()?;
    let guide = match (texts, &s.true_cfg) {
        ([positive], None) => Guide { channels, reference, ..Guide::prompt(positive) },
        ([positive, negative], Some(cfg)) => {
            Guide { negative: Some((negative, cfg.scale)), channels, reference, ..Guide::prompt(positive) }
        }
        _ => {
            return Err(ipaflux_core::Error::Unsupported("prompt encodings do not match the CFG settings".into()).into())
        }
    };
    let list: Vec<&dyn AttentionHook> = hook.iter().map(|h| h.as_ref()).collect();
    let negative_list: Option<Vec<&dyn AttentionHook>> =
        negative_hook.as_ref().map(|h| h.iter().map(|h| h.as_ref()).collect());
    let guide = Guide { negative_hooks: negative_list.as_deref().map(Hooks::new), control: &control, ..guide };
    let ids = sampler::img_ids(rows, cols);
    seeds(s)
        .map(|seed| {
            let noise = sampler::pack(&sampler::noise(seed, s.width, s.height, &s.device)?)?;
            let start = match &encoded.init {
                Some(i) => Start::Image { image: &i.image, noise: &noise, mask: i.mask.as_ref() },
                None => Start::Noise(&noise),
            };
            Ok((seed, sampler::euler(&model, start, &ids, guide, &sigmas, Hooks::new(&list), on_step)?))
        })
        .collect()
}

/// The most images one run makes.
pub const MAX_BATCH: usize = 1024;

/// The seeds of a batch: `seed`, `seed + 1`, … (wrapping).
fn seeds(s: &Settings) -> impl Iterator<Item = u64> + '_ {
    (0..s.batch as u64).map(|i| s.seed.wrapping_add(i))
}

/// Where streamed blocks wait: pinned memory with prefetch on CUDA, host tensors elsewhere.
pub(crate) fn block_source(
    kept: BTreeMap<String, Tensor>,
    blocks: &[BlockId],
    device: &Device,
) -> Result<Arc<dyn BlockSource>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Ok(Arc::new(crate::cuda::stream::PinnedBlocks::new(kept, blocks, device)?));
    }
    Ok(Arc::new(HostBlocks::new(kept, blocks, &Device::Cpu, device)?))
}

/// A linear ramp from `start` to `end` over `steps` (the Advanced node's weight_start/weight_end).
pub fn ramp(start: f64, end: f64, steps: usize) -> IpWeight {
    IpWeight::Ramp(WeightRamp { start, end, steps })
}

impl Reference {
    pub fn name(&self) -> &str {
        match self {
            Self::Image { name, .. } | Self::Embeds { name, .. } | Self::Redux { name, .. } => name,
        }
    }

    /// What conditions with it: `ip-adapter` or `redux`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Image { .. } | Self::Embeds { .. } => "ip-adapter",
            Self::Redux { .. } => "redux",
        }
    }

    pub fn weight(&self) -> f64 {
        match self {
            Self::Image { weight, .. } | Self::Embeds { weight, .. } | Self::Redux { weight, .. } => *weight,
        }
    }
}

/// The parameters of the image made with `seed`, as JSON for the PNG's `parameters` text chunk.
/// `src` gives the LoRAs and which IP-Adapter the IP references went through.
pub fn parameters_json(s: &Settings, seed: u64, refs: &[Reference], src: &Sources) -> String {
    let loras = &src.loras;
    let ip_adapter =
        refs.iter().any(|r| r.kind() == "ip-adapter").then_some(if src.ip_is_xlabs { "xlabs" } else { "instantx" });
    let weight = match s.ip_weight {
        IpWeight::Constant(w) => serde_json::json!(w),
        IpWeight::Ramp(r) => serde_json::json!({"start": r.start, "end": r.end, "steps": r.steps}),
    };
    serde_json::json!({
        "generator": concat!("ipaflux ", env!("CARGO_PKG_VERSION")),
        "prompt": s.prompt,
        "negative_prompt": s.true_cfg.as_ref().map(|c| &c.negative_prompt),
        "true_cfg": s.true_cfg.as_ref().map(|c| c.scale),
        "width": s.width,
        "height": s.height,
        "steps": s.steps,
        "guidance": s.guidance,
        "seed": seed,
        "dtype": format!("{:?}", s.dtype).to_lowercase(),
        "references": refs
            .iter()
            .map(|r| serde_json::json!({"name": r.name(), "kind": r.kind(), "weight": r.weight()}))
            .collect::<Vec<_>>(),
        "ip_adapter": ip_adapter,
        "ip_weight": weight,
        "start_percent": s.start_percent,
        "end_percent": s.end_percent,
        "block_weights": s.block_weights,
        "v_norm": format!("{:?}", s.v_norm).to_lowercase(),
        "ip_negative": s.true_cfg.as_ref().map(|_| s.ip_negative.name()),
        "loras": loras
            .iter()
            .map(|l| serde_json::json!({"name": l.source_name, "strength": l.strength, "text_strength": l.text_strength}))
            .collect::<Vec<_>>(),
        "kontext_image": s.kontext.as_ref().map(|k| &k.image.name),
        "control_image": s.control.iter().map(Control::describe).collect::<Vec<_>>(),
        "controlnet": s.controlnet.iter().map(|c| {
            let window = match c.window {
                ControlWindow::Steps { start, end } => serde_json::json!({"steps": [start, end]}),
                ControlWindow::Sigmas(w) => serde_json::json!({"sigmas": [w.sigma_start, w.sigma_end]}),
            };
            let name = src.controlnet.get(c.net).map(|n| &n.name);
            serde_json::json!({"name": name, "scale": c.scale, "mode": c.mode, "window": window})
        }).collect::<Vec<_>>(),
        "init_image": s.init.as_ref().map(|i| {
            serde_json::json!({"name": i.name, "strength": i.strength, "mask": i.mask.as_ref().map(|m| &m.name)})
        }),
    })
    .to_string()
}

/// A LoRA file and its strengths (ComfyUI's `strength_model`, `strength_clip`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    pub path: std::path::PathBuf,
    pub strength: f64,
    pub text_strength: f64,
}

/// Sources read from paths (files, folders or Hugging Face cache entries).
pub struct ModelPaths {
    pub flux: std::path::PathBuf,
    pub t5: std::path::PathBuf,
    pub clip: std::path::PathBuf,
    pub vae: std::path::PathBuf,
    /// Needed for IP-Adapter references (`--image`, `--embeds`).
    pub ip_adapter: Option<std::path::PathBuf>,
    /// Needed for InstantX IP-Adapter and Redux reference images.
    pub siglip: Option<std::path::PathBuf>,
    /// CLIP's vision model, needed for XLabs IP-Adapter reference images.
    pub clip_vision: Option<std::path::PathBuf>,
    /// The FLUX.1 Redux image embedder, needed for Redux images.
    pub redux: Option<std::path::PathBuf>,
    /// Depth Anything (a transformers folder), needed for a control image's depth map.
    pub depth: Option<std::path::PathBuf>,
    /// Flux ControlNets (diffusers folders or repos, or `.safetensors` files), each once.
    pub controlnet: Vec<std::path::PathBuf>,
    /// `tokenizer.json` (or a folder / repo holding it) for single-file text encoders.
    pub t5_tokenizer: Option<std::path::PathBuf>,
    pub clip_tokenizer: Option<std::path::PathBuf>,
    pub encoder_dtype: ipaflux_core::Precision,
    /// LoRA files, each with its strength for Flux and for the text encoders.
    pub loras: Vec<LoraArg>,
}

/// The IP-Adapter's source, whether it is XLabs', and CLIP's vision tower.
type IpSources = (Option<(LoadFn<TensorStore>, u64)>, bool, Option<(LoadFn<ClipImageEncoder>, u64)>);

/// [`IpSources`] from their paths: XLabs' adapter is told by its names and
/// checked against Flux and CLIP from their headers now, so a wrong file fails
/// before any model runs.
fn ip_sources(
    ip: Option<std::path::PathBuf>,
    clip_vision: Option<std::path::PathBuf>,
    flux_cfg: &ipaflux_core::flux::FluxConfig,
    dtype: DType,
    device: &Device,
) -> Result<IpSources> {
    use crate::clip_vision::{check_xlabs_fits, clip_vision_bytes, load_clip_vision_dir};
    use crate::load;
    let clip_files = clip_vision.as_deref().map(load_clip_vision_dir).transpose()?;
    let mut xlabs = false;
    // Either kind's tensors (headers only; InstantX's pickle is its small
    // `data.pkl`) give its dimensions and loaded size now; the stage loads
    // from the file mapped here.
    let mut ip_adapter = None;
    if let Some(path) = &ip {
        let store = load::load_ip_adapter(path)?;
        let expected = if ipaflux_core::flux::xlabs::is_xlabs(&store) {
            let dims = XlabsDims::infer(&store)?;
            dims.check_compatible(flux_cfg)?;
            if let Some(c) = &clip_files {
                check_xlabs_fits(&dims, &store.source_name, &c.config)?;
            }
            xlabs = true;
            dims.expected_tensors()
        } else {
            IpAdapterDims::infer(&store)?.expected_tensors()
        };
        let bytes = ipaflux_core::weights::loaded_bytes(&expected, dtype);
        let f: LoadFn<TensorStore> = Box::new(move || Ok(store.clone()));
        ip_adapter = Some((f, bytes));
    }
    // The folder read here (configs, mapped weights) is what the stage loads from.
    let clip = clip_files.map(|files| {
        let bytes = clip_vision_bytes(&files.config, crate::model_dtype(dtype, device));
        let device = device.clone();
        let f: LoadFn<ClipImageEncoder> = Box::new(move || ClipImageEncoder::new(&files, dtype, &device));
        (f, bytes)
    });
    Ok((ip_adapter, xlabs, clip))
}

impl ModelPaths {
    /// Resolves every path now (so a typo fails before any work) and reads lazily later.
    pub fn into_sources(self, device: Device) -> Result<Sources> {
        use crate::load;
        let flux = load::resolve_arg(&self.flux)?;
        let t5 = load::resolve_arg(&self.t5)?;
        let clip = load::resolve_arg(&self.clip)?;
        let vae = load::vae_file(&load::resolve_arg(&self.vae)?)?;
        let ip = self.ip_adapter.as_deref().map(load::resolve_arg).transpose()?;
        let redux = self.redux.as_deref().map(|p| load::redux_file(&load::resolve_arg(p)?)).transpose()?;
        let siglip = self.siglip.as_deref().map(load::resolve_arg).transpose()?;
        let clip_vision = self.clip_vision.as_deref().map(load::resolve_arg).transpose()?;
        let flux_head_dim = load::flux_head_dim(&flux)?;
        // Sizes from the header, read once: input channels, LoRA and Redux checks.
        let flux_cfg = load::flux_config(&flux)?;
        let flux_units = load::flux_units(&flux)?;
        let loras = if self.loras.is_empty() {
            Vec::new()
        } else {
            let read = |a: &LoraArg| {
                let mut lora = load::load_lora(&a.path, &flux_cfg, a.strength)?;
                lora.text_strength = a.text_strength;
                Ok(lora)
            };
            self.loras.iter().map(read).collect::<Result<Vec<_>>>()?
        };
        // A FLUX.1 Canny/Depth LoRA widens FLUX.1-dev's input to the Control model's.
        let flux_in_channels = ipaflux_core::flux::lora::input_channels(&loras, flux_cfg.in_channels);
        let dtype = self.encoder_dtype.dtype();
        let flux_bytes = load::weight_bytes(&if flux.is_file() { flux.clone() } else { load::flux_dir(&flux)? });
        // The text encoders' files (configs, tokenizers, mapped weights) are
        // read now, so a missing one fails before any model runs; their
        // stages load from them.
        let t5_files = load::load_text_encoder(&t5, "text_encoder_2", self.t5_tokenizer.as_deref())?;
        let clip_files = load::load_text_encoder(&clip, "text_encoder", self.clip_tokenizer.as_deref())?;
        let t5_bytes = load::text_encoder_bytes(&t5_files, t5_dtype(dtype));
        let clip_bytes = load::text_encoder_bytes(&clip_files, dtype);
        let vae_bytes = |half| load::vae_half_bytes(&vae, half, crate::model_dtype(dtype, &device));
        let (vae_decoder_bytes, vae_encoder_bytes) =
            (vae_bytes(load::VaeHalf::Decoder)?, vae_bytes(load::VaeHalf::Encoder)?);
        let image_encoder = match siglip {
            Some(dir) => {
                // The folder read here (configs, mapped weights) is what the stage loads from.
                let files = load::load_siglip_dir(&dir)?;
                let bytes = crate::encode::siglip_bytes(&files.config, dtype);
                let (precision, device) = (self.encoder_dtype, device.clone());
                let f: LoadFn<ImageEncoder> = Box::new(move || {
                    let (config, preprocess, weights) =
                        (&files.config, files.preprocess.clone(), files.weights.clone());
                    ImageEncoder::new(config, preprocess, weights, precision, device.clone())
                });
                Some((f, bytes))
            }
            None => None,
        };
        let (ip_adapter, ip_is_xlabs, clip_vision) = ip_sources(ip, clip_vision, &flux_cfg, dtype, &device)?;
        let redux = match redux {
            Some(path) => {
                // Checked from its header now: a wrong file fails before any model runs.
                let store = load::load_store(&path)?;
                let dims = ReduxDims::infer(&store)?;
                let context = flux_cfg.context_in_dim;
                if dims.context_dim != context {
                    return Err(ipaflux_core::Error::Shape(format!(
                        "{}: the Redux model makes {}-wide tokens but this Flux takes {context}-wide text tokens",
                        path.display(),
                        dims.context_dim
                    ))
                    .into());
                }
                let bytes = ipaflux_core::weights::loaded_bytes(&dims.expected_tensors(), dtype);
                let f: LoadFn<TensorStore> = Box::new(move || Ok(store.clone()));
                Some((f, bytes))
            }
            None => None,
        };
        let depth = match self.depth.as_deref().map(load::resolve_arg).transpose()? {
            Some(path) => {
                // Its tensors checked from the headers now: a wrong folder fails before any model runs.
                // The folder read here (configs, mapped weights) is what the stage loads from.
                let files = crate::depth::load_depth(&path)?;
                crate::depth::check_tensors(&files)?;
                let bytes = crate::depth::loaded_bytes(&files, dtype, &device);
                let device = device.clone();
                let f: LoadFn<crate::depth::DepthEstimator> =
                    Box::new(move || crate::depth::DepthEstimator::new(&files, dtype, &device));
                Some((f, bytes))
            }
            None => None,
        };
        let mut controlnet = Vec::new();
        let mut flux_axes = None;
        for arg in &self.controlnet {
            // Its sizes from the header now: a net for another model fails before any model runs.
            let mut files = load::load_controlnet(&load::resolve_arg(arg)?)?;
            // Its RoPE axes: its config's, else Flux's (the positions are Flux's own).
            if files.axes_dim.is_none() {
                if flux_axes.is_none() {
                    flux_axes = Some(load::load_flux(&flux)?.axes_dim);
                }
                files.axes_dim = flux_axes.clone().flatten();
            }
            let dims = ControlNetDims::infer(&files.weights)?;
            dims.check_compatible(&flux_cfg)?;
            // As Flux: in the run's dtype on its device.
            let bytes = dims.loaded_bytes(self.encoder_dtype.dtype());
            let units = dims.unit_specs(self.encoder_dtype.dtype());
            let device = device.clone();
            let load: ControlNetLoad = Box::new(move |streamed| {
                let files = files.clone();
                Ok(FluxControlNet::from_store_streamed(files.weights, files.axes_dim, dtype, &device, streamed)?)
            });
            controlnet.push(ControlNetSource { name: arg.display().to_string(), load, bytes, units, dims });
        }
        Ok(Sources {
            flux: (Box::new(move || load::load_flux(&flux)), flux_bytes),
            t5: (Box::new(move || Ok(t5_files.clone())), t5_bytes),
            clip: (Box::new(move || Ok(clip_files.clone())), clip_bytes),
            vae: (Box::new(move || load::load_vae(&vae)), vae_decoder_bytes),
            vae_encoder_bytes,
            image_encoder,
            ip_adapter,
            ip_is_xlabs,
            clip_vision,
            redux,
            depth,
            controlnet,
            flux_in_channels,
            flux_head_dim,
            flux_units,
            loras,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{ClipEncoder, T5Encoder};
    use crate::vae::{VaeDecoder, VaeEncoder};
    use std::path::PathBuf;

    fn fixture(rel: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
    }

    /// The tiny pipeline's paths with `ip` as the IP-Adapter and every optional model given.
    fn paths(ip: &str, precision: ipaflux_core::Precision) -> ModelPaths {
        ModelPaths {
            flux: fixture("flux/transformer"),
            t5: fixture("pipeline/t5"),
            clip: fixture("pipeline/clip"),
            vae: fixture("img2img/ae.safetensors"),
            ip_adapter: Some(fixture(ip)),
            siglip: Some(fixture("siglip-vision")),
            clip_vision: Some(fixture("xlabs/image_encoder")),
            redux: Some(fixture("redux/flux1-redux-tiny.safetensors")),
            depth: Some(fixture("depth/model")),
            controlnet: vec![fixture("controlnet/union")],
            t5_tokenizer: None,
            clip_tokenizer: None,
            encoder_dtype: precision,
            loras: Vec::new(),
        }
    }

    /// What building a model from `store` fetched from it.
    fn fetched<T>(store: &TensorStore, build: impl FnOnce() -> Result<T>) -> u64 {
        let before = store.fetched_bytes();
        build().unwrap();
        store.fetched_bytes() - before
    }

    /// Each registry entry holds the bytes its model takes once built, in
    /// every dtype (f32 fixtures loaded in bf16 and f16 included; the models
    /// with convolutions build in f32 for bf16 on the CPU): counted by the
    /// store as each stage's constructor fetches the weights.
    #[test]
    fn every_entry_holds_the_bytes_its_model_fetches() {
        use ipaflux_core::Precision;
        let cpu = Device::Cpu;
        let mut off = Vec::new();
        let check = |off: &mut Vec<String>, registered: u64, built: u64, what: String| {
            if registered != built {
                off.push(format!("{what}: registered {registered} bytes, built {built}"));
            }
        };
        for precision in [Precision::F32, Precision::Bf16, Precision::F16] {
            let dtype = precision.dtype();
            for ip in ["ip-adapter.bin", "xlabs/ip_adapter.safetensors"] {
                let at = format!("{precision:?}, {ip}");
                let src = paths(ip, precision).into_sources(cpu.clone()).unwrap();
                let t5 = (src.t5.0)().unwrap();
                let n = fetched(&t5.weights, || {
                    T5Encoder::new(&t5.config, &t5.weights, &t5.tokenizer, 16, t5_dtype(dtype), &cpu)
                });
                check(&mut off, src.t5.1, n, format!("T5, {at}"));
                let clip = (src.clip.0)().unwrap();
                let n = fetched(&clip.weights, || {
                    ClipEncoder::new(&clip.config, &clip.weights, &clip.tokenizer, dtype, &cpu)
                });
                check(&mut off, src.clip.1, n, format!("CLIP, {at}"));
                let vae = (src.vae.0)().unwrap();
                let n = fetched(&vae, || VaeDecoder::new(&vae, dtype, &cpu));
                check(&mut off, src.vae.1, n, format!("VAE decoder, {at}"));
                let n = fetched(&vae, || VaeEncoder::new(&vae, dtype, &cpu));
                check(&mut off, src.vae_encoder_bytes, n, format!("VAE encoder, {at}"));
                let store = (src.ip_adapter.as_ref().unwrap().0)().unwrap();
                let n = if src.ip_is_xlabs {
                    fetched(&store, || Ok(XlabsIpAdapter::from_store(&store, dtype, &cpu)?))
                } else {
                    fetched(&store, || Ok(IpAdapter::from_store(&store, dtype, &cpu)?))
                };
                check(&mut off, src.ip_adapter.as_ref().unwrap().1, n, format!("IP-Adapter, {at}"));
                let store = (src.redux.as_ref().unwrap().0)().unwrap();
                let n = fetched(&store, || Ok(ReduxImageEncoder::from_store(&store, dtype, &cpu)?));
                check(&mut off, src.redux.as_ref().unwrap().1, n, format!("Redux, {at}"));
                // These stages build their models inside the load function: the
                // same constructor on the same folder, metered here.
                let files = crate::load::load_siglip_dir(&fixture("siglip-vision")).unwrap();
                let weights = files.weights.clone();
                let n = fetched(&weights, || {
                    ImageEncoder::new(&files.config, files.preprocess.clone(), files.weights, precision, cpu.clone())
                });
                check(&mut off, src.image_encoder.as_ref().unwrap().1, n, format!("SigLIP, {at}"));
                let files = crate::clip_vision::load_clip_vision_dir(&fixture("xlabs/image_encoder")).unwrap();
                let n = fetched(&files.weights, || ClipImageEncoder::new(&files, dtype, &cpu));
                check(&mut off, src.clip_vision.as_ref().unwrap().1, n, format!("CLIP vision, {at}"));
                let files = crate::depth::load_depth_dir(&fixture("depth/model")).unwrap();
                let n = fetched(&files.weights, || crate::depth::DepthEstimator::new(&files, dtype, &cpu));
                check(&mut off, src.depth.as_ref().unwrap().1, n, format!("Depth Anything, {at}"));
                // A ControlNet takes every tensor of its file (its loader refuses others), in the
                // run's dtype but for XLabs' hint block, held in f32.
                let files = crate::load::load_controlnet(&fixture("controlnet/union")).unwrap();
                let n = files.weights.bytes_as(dtype, |_| true);
                check(&mut off, src.controlnet[0].bytes, n, format!("ControlNet, {at}"));
                let mut xlabs = paths(ip, precision);
                xlabs.controlnet = vec![fixture("controlnet/xlabs-original.safetensors")];
                let xlabs_src = xlabs.into_sources(cpu.clone()).unwrap();
                let files = crate::load::load_controlnet(&fixture("controlnet/xlabs-original.safetensors")).unwrap();
                let hint = |n: &str| n.starts_with("input_hint_block.");
                let n = files.weights.bytes_as(dtype, |n| !hint(n)) + files.weights.bytes_as(DType::F32, hint);
                check(&mut off, xlabs_src.controlnet[0].bytes, n, format!("XLabs ControlNet, {at}"));
                // Its registry units, block by block, hold the same bytes.
                for net in [&src.controlnet[0], &xlabs_src.controlnet[0]] {
                    let units: u64 = net.units.iter().map(|u| u.bytes).sum();
                    check(&mut off, units, net.bytes, format!("{} units, {at}", net.name));
                }
            }
        }
        assert!(off.is_empty(), "registry figures off:\n{}", off.join("\n"));
    }
}
