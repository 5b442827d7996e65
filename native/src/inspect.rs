//! `ipaflux inspect`: what a checkpoint file holds, read from its header
//! (no tensor data): format, GGUF architecture, tensors by stored type, and
//! for a Flux transformer the memory it takes loaded each way and which
//! FLUX.1 it is (by its input channels); for a LoRA its modules, ranks and
//! naming; for XLabs' IP-Adapter, a Flux ControlNet and Depth Anything their sizes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ipaflux_core::candle_core::DType;
use ipaflux_core::flux::sampler::FluxVariant;
use ipaflux_core::flux::{ControlNetDims, GgufWeights, LoraSummary, XlabsDims};
use ipaflux_core::weights::gguf;

use crate::load::{flux_config, flux_units, is_torch_zip, load_store, map_file};
use crate::Result;

/// A checkpoint's header, summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub format: &'static str,
    /// `general.architecture` of a GGUF file.
    pub architecture: Option<String>,
    pub tensors: usize,
    /// Stored type name → (tensors, bytes as stored).
    pub by_type: BTreeMap<String, (usize, u64)>,
    /// For a Flux transformer: double and single blocks, and its bytes as a
    /// bf16 model with GGUF weights kept quantized and dequantized.
    pub flux: Option<FluxSizes>,
    /// For a LoRA file: its modules, ranks and naming.
    pub lora: Option<LoraSummary>,
    /// For XLabs' IP-Adapter: its sizes.
    pub xlabs: Option<XlabsDims>,
    /// For a Depth Anything model (transformers' names): its DINOv2's width and layers.
    pub depth: Option<(usize, usize)>,
    /// For an original Depth Anything V2 checkpoint (`pretrained.*`, `depth_head.*`): the same.
    pub depth_original: Option<(usize, usize)>,
    /// For a Flux ControlNet: its sizes, or why it cannot be read (XLabs' kind).
    pub controlnet: Option<std::result::Result<ControlNetDims, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FluxSizes {
    pub depth: usize,
    pub depth_single: usize,
    pub kept_quantized: u64,
    pub dequantized: u64,
    /// What it takes besides the latents (its input channels per token), and that width.
    pub variant: Option<(FluxVariant, usize)>,
}

/// Reads `path`'s header.
pub fn inspect(path: &Path) -> Result<Summary> {
    let map = map_file(path)?;
    let (format, architecture) = if gguf::is_gguf(&map) {
        let arch = gguf::parse(&map).ok().and_then(|f| f.architecture().map(str::to_string));
        ("GGUF", arch)
    } else if is_torch_zip(&map) {
        ("PyTorch zip (torch.save)", None)
    } else {
        ("safetensors", None)
    };
    drop(map);
    let store = load_store(path)?;
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for name in store.names() {
        let ty = match store.ggml_type(name) {
            Some(t) => t.name().to_string(),
            None => format!("{:?}", store.dtype(name).unwrap_or(DType::U8)).to_uppercase(),
        };
        let slot = by_type.entry(ty).or_default();
        slot.0 += 1;
        slot.1 += store.stored_bytes(name).unwrap_or(0) as u64;
    }
    let controlnet = ipaflux_core::flux::controlnet::is_controlnet(&store)
        .then(|| ControlNetDims::infer(&store).map_err(|e| e.to_string()));
    // Flux's units come from safetensors and GGUF headers; a zip is never Flux
    // here, nor a ControlNet's blocks (told apart above).
    let units = if (format == "safetensors" || format == "GGUF") && controlnet.is_none() {
        flux_units(path)?
    } else {
        Default::default()
    };
    let flux = (units.depth + units.depth_single > 0).then(|| {
        let total = |g| units.specs(DType::BF16, g).iter().map(|u| u.bytes).sum();
        let channels = flux_config(path).ok().map(|c| c.in_channels);
        FluxSizes {
            depth: units.depth,
            depth_single: units.depth_single,
            kept_quantized: total(GgufWeights::Quantized),
            dequantized: total(GgufWeights::Dequantized),
            variant: channels.and_then(|c| FluxVariant::from_in_channels(c).ok().map(|v| (v, c))),
        }
    });
    let lora = LoraSummary::of(&store);
    let xlabs = ipaflux_core::flux::xlabs::is_xlabs(&store).then(|| XlabsDims::infer(&store)).transpose()?;
    let depth = match (store.shape("backbone.embeddings.cls_token"), store.contains("head.conv3.weight")) {
        (Some(&[1, 1, width]), true) => {
            let layer = |n: &str| n.strip_prefix("backbone.encoder.layer.")?.split('.').next()?.parse::<usize>().ok();
            Some((width, store.names().filter_map(layer).max().map_or(0, |l| l + 1)))
        }
        _ => None,
    };
    let depth_original = match store.shape("pretrained.cls_token") {
        Some(&[1, 1, width]) if ipaflux_core::depth_anything::original::is_original(&store) => {
            let block = |n: &str| n.strip_prefix("pretrained.blocks.")?.split('.').next()?.parse::<usize>().ok();
            Some((width, store.names().filter_map(block).max().map_or(0, |b| b + 1)))
        }
        _ => None,
    };
    let tensors = store.len();
    Ok(Summary { format, architecture, tensors, by_type, flux, lora, xlabs, depth, depth_original, controlnet })
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(f, "format: {}", self.format)?;
        if let Some(a) = &self.architecture {
            write!(f, " (architecture `{a}`)")?;
        }
        let stored: u64 = self.by_type.values().map(|v| v.1).sum();
        writeln!(f, "\n{} tensors, {:.1} MiB stored", self.tensors, mib(stored))?;
        writeln!(f, "type      tensors  stored (MiB)")?;
        for (ty, (n, bytes)) in &self.by_type {
            writeln!(f, "{ty:<8} {n:>8}  {:>12.1}", mib(*bytes))?;
        }
        if let Some(s) = &self.flux {
            writeln!(f, "Flux: {} double + {} single blocks", s.depth, s.depth_single)?;
            match s.variant {
                Some((FluxVariant::Base, c)) => writeln!(f, "FLUX.1 [dev]/[schnell]/Kontext ({c} input channels)")?,
                Some((FluxVariant::Fill, c)) => {
                    writeln!(f, "FLUX.1 Fill ({c} input channels): give --init-image and --mask")?
                }
                Some((FluxVariant::Control, c)) => {
                    writeln!(f, "FLUX.1 Canny/Depth ({c} input channels): give --control-image")?
                }
                None => {}
            }
            if s.kept_quantized == s.dequantized {
                writeln!(f, "as a bf16 model: {:.1} MiB", mib(s.dequantized))?;
            } else {
                writeln!(
                    f,
                    "as a bf16 model: {:.1} MiB with GGUF weights kept quantized, {:.1} MiB dequantized",
                    mib(s.kept_quantized),
                    mib(s.dequantized)
                )?;
            }
        }
        if let Some(l) = &self.lora {
            let (lo, hi) = l.ranks;
            let ranks = if lo == hi { format!("rank {lo}") } else { format!("ranks {lo}–{hi}") };
            writeln!(f, "LoRA: {} modules, {ranks}, {} with alpha; naming: {}", l.modules, l.with_alpha, l.naming)?;
            if l.text_encoder_modules > 0 {
                writeln!(f, "  {} of them for the text encoders (CLIP-L, T5)", l.text_encoder_modules)?;
            }
            if l.with_bias + l.norm_scales > 0 {
                writeln!(
                    f,
                    "  {} with a bias; {} QK-norm scales replaced (a FLUX.1 Canny/Depth LoRA has both)",
                    l.with_bias, l.norm_scales
                )?;
            }
        }
        if let Some(x) = &self.xlabs {
            writeln!(
                f,
                "XLabs IP-Adapter: {} tokens × {} from {}-wide CLIP image_embeds, K/V ({} wide) for {} double \
                 blocks; give --clip-vision",
                x.tokens, x.cross_dim, x.embed_dim, x.hidden, x.blocks
            )?;
        }
        if let Some((width, layers)) = self.depth {
            writeln!(
                f,
                "Depth Anything: DINOv2 {width} wide, {layers} layers; give its folder (with config.json) to \
                 --control-depth or `ipaflux depth --model`"
            )?;
        }
        match &self.controlnet {
            Some(Ok(c)) => {
                let kind = match (c.modes, &c.hint) {
                    (Some(n), _) => format!("a Union net of {n} modes: give --controlnet-mode"),
                    (None, Some(_)) => "XLabs' kind (reads the control image's pixels)".to_string(),
                    (None, None) => "single-purpose".to_string(),
                };
                let bf16 = c.loaded_bytes(DType::BF16);
                writeln!(
                    f,
                    "Flux ControlNet: {} double + {} single blocks, {} wide, {kind}; {:.1} MiB \
                     as a bf16 model; give it to --controlnet with --control-image",
                    c.blocks.depth,
                    c.blocks.depth_single,
                    c.blocks.hidden_size,
                    mib(bf16)
                )?;
            }
            Some(Err(e)) => writeln!(f, "a Flux ControlNet ipaflux does not read: {e}")?,
            None => {}
        }
        if let Some((width, blocks)) = self.depth_original {
            writeln!(
                f,
                "Depth Anything V2, original layout: DINOv2 {width} wide, {blocks} blocks; give this file to \
                 --control-depth or `ipaflux depth --model` (its name says relative or metric)"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
    }

    #[test]
    fn a_gguf_flux_and_a_safetensors_flux_are_summarised_from_their_headers() {
        let g = inspect(&fixture("flux/flux-tiny-bfl.gguf")).unwrap();
        assert_eq!((g.format, g.architecture.as_deref(), g.tensors), ("GGUF", Some("flux"), 92));
        let count = |t: &str| g.by_type.get(t).map_or(0, |v| v.0);
        assert_eq!((count("Q8_0"), count("Q4_K"), count("Q6_K"), count("F16")), (2, 1, 1, 30));
        assert_eq!(g.by_type.values().map(|v| v.0).sum::<usize>(), 92);
        let sizes = g.flux.unwrap();
        assert_eq!((sizes.depth, sizes.depth_single), (2, 3));
        assert!(sizes.kept_quantized < sizes.dequantized);
        let text = g.to_string();
        assert!(text.contains("Q4_K") && text.contains("kept quantized"), "{text}");

        let s = inspect(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
        assert_eq!((s.format, s.tensors), ("safetensors", 92));
        assert_eq!(s.by_type.keys().map(String::as_str).collect::<Vec<_>>(), ["F32"]);
        let sizes = s.flux.unwrap();
        assert_eq!(sizes.kept_quantized, sizes.dequantized);
        // Not Flux: no Flux line.
        assert!(inspect(&fixture("ip-adapter.bin")).unwrap().flux.is_none());
        assert!(s.lora.is_none());
        // A LoRA: its modules and naming.
        let l = inspect(&fixture("flux/lora-kohya.safetensors")).unwrap();
        assert!(l.flux.is_none());
        let text = l.to_string();
        assert!(text.contains("LoRA: 38 modules, ranks 2–4, 27 with alpha; naming: kohya"), "{text}");
        assert!(text.contains("8 of them for the text encoders"), "{text}");
        assert!(!text.contains("QK-norm"), "{text}");
        // A FLUX.1 Canny/Depth LoRA: biases and replaced norms.
        // Which FLUX.1 a transformer is; XLabs' adapter's sizes.
        let flux = |rel: &str| inspect(&fixture(rel)).unwrap().to_string();
        assert!(flux("flux/flux-tiny-bfl.safetensors").contains("FLUX.1 [dev]/[schnell]/Kontext (64 input"));
        let control = flux("control/transformer/diffusion_pytorch_model.safetensors");
        assert!(control.contains("FLUX.1 Canny/Depth (128 input channels): give --control-image"), "{control}");
        assert!(flux("fill/transformer/diffusion_pytorch_model.safetensors").contains("FLUX.1 Fill (384"));
        let xlabs = flux("xlabs/ip_adapter.safetensors");
        assert!(xlabs.contains("XLabs IP-Adapter: 4 tokens × 64 from 24-wide CLIP image_embeds, K/V (48 wide) for 2"));
        let depth = flux("depth/model/model.safetensors");
        assert!(depth.contains("Depth Anything: DINOv2 32 wide, 4 layers; give its folder"), "{depth}");
        let original = flux("depth/original/depth_anything_v2_tiny.pth");
        assert!(original.contains("Depth Anything V2, original layout: DINOv2 64 wide, 12 blocks"), "{original}");
        // A ControlNet: its own line, not Flux's.
        let union = inspect(&fixture("controlnet/union/diffusion_pytorch_model.safetensors")).unwrap();
        assert!(union.flux.is_none());
        let text = union.to_string();
        assert!(
            text.contains("Flux ControlNet: 2 double + 0 single blocks, 48 wide, a Union net of 10 modes"),
            "{text}"
        );
        let xlabs = inspect(&fixture("controlnet/xlabs-original.safetensors")).unwrap().to_string();
        let kind = "2 double + 0 single blocks, 48 wide, XLabs' kind (reads the control image's pixels)";
        assert!(xlabs.contains(kind), "{xlabs}");
        let text = inspect(&fixture("control/lora-bfl.safetensors")).unwrap().to_string();
        assert!(text.contains("LoRA: 9 modules, ranks 2–4, 0 with alpha; naming: BFL"), "{text}");
        assert!(text.contains("9 with a bias; 14 QK-norm scales replaced"), "{text}");
    }
}
