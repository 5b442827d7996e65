//! The Flux VAE from BFL's `ae.safetensors` layout, or from a diffusers
//! `vae/` folder, whose names [`bfl_names`] maps onto BFL's: the decoder
//! (`decoder.*`) turns sampled latents into 8-bit RGB; the encoder
//! (`encoder.*`, loaded only for image-to-image) turns an init image into
//! latents. The networks are candle-transformers' port of BFL's autoencoder;
//! this module infers their sizes from the checkpoint. It does not sample the
//! encoder's distribution: an encoding is its mean, so the same image always
//! gives the same latents.

use candle_transformers::models::flux::autoencoder::{Config, Decoder, Encoder};
use ipaflux_core::candle_core::{DType, Device, Module, Tensor};
use ipaflux_core::preprocess::RgbImage;
use ipaflux_core::TensorStore;

use crate::{Error, Result};

/// FLUX.1's latent scale and shift (dev and schnell alike).
pub const FLUX_VAE_SCALE: f64 = 0.3611;
pub const FLUX_VAE_SHIFT: f64 = 0.1159;

fn vae_err(name: &str, reason: impl std::fmt::Display) -> Error {
    Error::Core(ipaflux_core::Error::Unsupported(format!("{name}: {reason}")))
}

/// The decoder and its latent normalisation.
pub struct VaeDecoder {
    decoder: Decoder,
    pub cfg: Config,
    dtype: DType,
}

fn dim(store: &TensorStore, name: &str, i: usize) -> Result<usize> {
    store
        .shape(name)
        .and_then(|s| s.get(i).copied())
        .ok_or_else(|| vae_err(&store.source_name, format!("missing `{name}`: not a Flux VAE (ae.safetensors)")))
}

/// Whether `store` holds an encoder (BFL's `ae.safetensors` does; a decoder-only file does not).
pub fn has_encoder(store: &TensorStore) -> bool {
    store.contains("encoder.conv_in.weight")
}

/// The encoder half: an init image → latents as the sampler holds them.
pub struct VaeEncoder {
    encoder: Encoder,
    pub cfg: Config,
    dtype: DType,
}

impl VaeEncoder {
    /// Sizes from the shapes, as [`VaeDecoder::new`] infers them: channels per
    /// level from each level's first block, blocks per level (the encoder has
    /// BFL's `num_res_blocks`, the decoder one more), latent channels (half
    /// `conv_out`'s outputs: the mean and log-variance).
    pub fn new(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = crate::model_dtype(dtype, device);
        if !has_encoder(store) {
            return Err(vae_err(
                &store.source_name,
                "this VAE has no encoder (`encoder.*`): image-to-image needs the whole VAE, \
                 as BFL's ae.safetensors or a diffusers vae/ folder holds it",
            ));
        }
        let levels = (0..).take_while(|i| store.contains(&format!("encoder.down.{i}.block.0.conv2.weight"))).count();
        if levels == 0 {
            return Err(vae_err(&store.source_name, "no `encoder.down.N.block.0` blocks: not a Flux VAE encoder"));
        }
        let ch = dim(store, "encoder.conv_in.weight", 0)?;
        let chans = (0..levels)
            .map(|i| dim(store, &format!("encoder.down.{i}.block.0.conv2.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        let blocks = (0..).take_while(|b| store.contains(&format!("encoder.down.0.block.{b}.conv1.weight"))).count();
        let cfg = Config {
            resolution: 256,
            in_channels: dim(store, "encoder.conv_in.weight", 1)?,
            ch,
            out_ch: 3,
            ch_mult: chans.iter().map(|c| c / ch.max(1)).collect(),
            num_res_blocks: blocks,
            z_channels: dim(store, "encoder.conv_out.weight", 0)? / 2,
            scale_factor: FLUX_VAE_SCALE,
            shift_factor: FLUX_VAE_SHIFT,
        };
        let encoder = Encoder::new(&cfg, store.var_builder(dtype, device).pp("encoder"))
            .map_err(|e| vae_err(&store.source_name, format!("not a Flux VAE encoder: {e}")))?;
        Ok(Self { encoder, cfg, dtype })
    }

    /// Image `[1, 3, H, W]` in [−1, 1] → latents `[1, z, H/8, W/8]`, f32:
    /// the distribution's mean, shifted and scaled (BFL's `AutoEncoder.encode`
    /// without sampling).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(&image.to_dtype(self.dtype)?)?;
        let mean = moments.narrow(1, 0, self.cfg.z_channels)?.to_dtype(DType::F32)?;
        Ok(((mean - self.cfg.shift_factor)? * self.cfg.scale_factor)?)
    }
}

/// 8-bit RGB → `[1, 3, H, W]` f32 in [−1, 1] (`2 · v/255 − 1`, as diffusers' `VaeImageProcessor`).
pub fn from_rgb8(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let plane = img.width * img.height;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * plane + i] = f32::from(v) / 255.0 * 2.0 - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, img.height, img.width), device)?)
}

impl VaeDecoder {
    /// Sizes from the shapes: channels per level from each level's first block, blocks per level, latent channels.
    /// bf16 on the CPU builds in f32 ([`crate::model_dtype`]).
    pub fn new(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = crate::model_dtype(dtype, device);
        let levels = (0..).take_while(|i| store.contains(&format!("decoder.up.{i}.block.0.conv2.weight"))).count();
        if levels == 0 {
            return Err(vae_err(&store.source_name, "no `decoder.up.N` blocks: not a Flux VAE (ae.safetensors)"));
        }
        let chans = (0..levels)
            .map(|i| dim(store, &format!("decoder.up.{i}.block.0.conv2.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        let ch = chans[0];
        let blocks = (0..).take_while(|b| store.contains(&format!("decoder.up.0.block.{b}.conv1.weight"))).count();
        let cfg = Config {
            resolution: 256,
            in_channels: 3,
            ch,
            out_ch: dim(store, "decoder.conv_out.weight", 0)?,
            ch_mult: chans.iter().map(|c| c / ch.max(1)).collect(),
            num_res_blocks: blocks.saturating_sub(1),
            z_channels: dim(store, "decoder.conv_in.weight", 1)?,
            scale_factor: FLUX_VAE_SCALE,
            shift_factor: FLUX_VAE_SHIFT,
        };
        let decoder = Decoder::new(&cfg, store.var_builder(dtype, device).pp("decoder"))
            .map_err(|e| vae_err(&store.source_name, format!("not a Flux VAE decoder: {e}")))?;
        Ok(Self { decoder, cfg, dtype })
    }

    /// Latents `[1, z, h, w]` (as sampled) → image `[1, 3, 8h, 8w]` in about [−1, 1], f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents.to_dtype(DType::F32)? / self.cfg.scale_factor)? + self.cfg.shift_factor)?;
        Ok(self.decoder.forward(&z.to_dtype(self.dtype)?)?.to_dtype(DType::F32)?)
    }
}

/// Whether `store` names the VAE as diffusers' `AutoencoderKL` does
/// (`decoder.up_blocks.*`, `decoder.mid_block.*`).
pub fn is_diffusers(store: &TensorStore) -> bool {
    store.names().any(|n| n.starts_with("decoder.up_blocks.") || n.starts_with("decoder.mid_block."))
}

/// A diffusers `AutoencoderKL` under BFL's `ae.safetensors` names. Written
/// after diffusers' `convert_ldm_vae_checkpoint`, read backwards:
/// - decoder up blocks in reverse order (diffusers' `up_blocks.0` is BFL's
///   last level); encoder down blocks in order, `downsamplers.0` as `downsample`;
/// - `mid_block` resnets and attention as `mid.block_1/2` and `mid.attn_1`,
///   whose projections diffusers stores as linear `[C, C]` weights and BFL as
///   1×1 convolutions `[C, C, 1, 1]`;
/// - `conv_shortcut` as `nin_shortcut`, `conv_norm_out` as `norm_out`.
///
/// Names it does not know stay as they are (the networks then report what
/// they miss); names outside `encoder.`/`decoder.` are dropped.
pub fn bfl_names(mut store: TensorStore) -> Result<TensorStore> {
    let levels = store
        .names()
        .filter_map(|n| n.strip_prefix("decoder.up_blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let rename = |name: &str| -> Option<String> {
        let (half, rest) = name.split_once('.')?;
        if half != "encoder" && half != "decoder" {
            return None;
        }
        let resnet = |r: &str| r.replacen("conv_shortcut", "nin_shortcut", 1);
        let mapped = if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
            let (i, tail) = r.split_once('.')?;
            format!("mid.block_{}.{}", i.parse::<usize>().ok()? + 1, resnet(tail))
        } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
            let (part, tail) = r.split_once('.')?;
            let part = match part {
                "group_norm" => "norm",
                "to_q" | "query" => "q",
                "to_k" | "key" => "k",
                "to_v" | "value" => "v",
                "proj_attn" => "proj_out",
                "to_out" => return Some(format!("{half}.mid.attn_1.proj_out.{}", tail.strip_prefix("0.")?)),
                _ => return None,
            };
            format!("mid.attn_1.{part}.{tail}")
        } else if let Some(r) = rest.strip_prefix("up_blocks.") {
            let (k, tail) = r.split_once('.')?;
            let level = levels.checked_sub(k.parse::<usize>().ok()? + 1)?;
            if let Some(t) = tail.strip_prefix("resnets.") {
                format!("up.{level}.block.{}", resnet(t))
            } else {
                format!("up.{level}.upsample.{}", tail.strip_prefix("upsamplers.0.")?)
            }
        } else if let Some(r) = rest.strip_prefix("down_blocks.") {
            let (level, tail) = r.split_once('.')?;
            if let Some(t) = tail.strip_prefix("resnets.") {
                format!("down.{level}.block.{}", resnet(t))
            } else {
                format!("down.{level}.downsample.{}", tail.strip_prefix("downsamplers.0.")?)
            }
        } else if let Some(t) = rest.strip_prefix("conv_norm_out.") {
            format!("norm_out.{t}")
        } else {
            rest.to_string()
        };
        Some(format!("{half}.{mapped}"))
    };
    let names: Vec<String> = store.names().map(str::to_string).collect();
    let mut out = TensorStore::new(store.source_name.clone());
    for name in names {
        let Some(new) = rename(&name) else { continue };
        let projection = ["encoder", "decoder"]
            .iter()
            .any(|half| ["q", "k", "v", "proj_out"].iter().any(|p| new == format!("{half}.mid.attn_1.{p}.weight")));
        if projection && store.shape(&name).is_some_and(|s| s.len() == 2) {
            let t = store.take(&name)?.ok_or_else(|| vae_err(&store.source_name, format!("`{name}` vanished")))?;
            let (o, i) = t.dims2()?;
            out.insert(new, t.reshape((o, i, 1, 1))?)?;
        } else {
            store.move_to(&name, &mut out, new)?;
        }
    }
    Ok(out)
}

/// `[1, 3, H, W]` in [−1, 1] → RGB bytes, as BFL's `127.5 · (x + 1)` then `byte()` (truncation).
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (_, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(vae_err("VAE output", format!("{c} channels, expected 3")));
    }
    let x = image.get(0)?.clamp(-1f32, 1f32)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    Ok((w, h, x.iter().map(|v| (127.5 * (v + 1.0)) as u8).collect()))
}
