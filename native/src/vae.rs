//! The Flux VAE decoder from BFL's `ae.safetensors` layout (`decoder.*`; the
//! encoder half is not needed and not loaded). The network is
//! candle-transformers' port of BFL's autoencoder; this module infers its
//! sizes from the checkpoint and turns latents into 8-bit RGB.

use candle_transformers::models::flux::autoencoder::{Config, Decoder};
use ipaflux_core::candle_core::{DType, Device, Module, Tensor};
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
    store.shape(name).and_then(|s| s.get(i).copied()).ok_or_else(|| {
        vae_err(&store.source_name, format!("missing `{name}`: not a Flux VAE (ae.safetensors) decoder"))
    })
}

impl VaeDecoder {
    /// Sizes from the shapes: channels per level from each level's first block, blocks per level, latent channels.
    pub fn new(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
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

/// `[1, 3, H, W]` in [−1, 1] → RGB bytes, as BFL's `127.5 · (x + 1)` then `byte()` (truncation).
pub fn to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (_, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(vae_err("VAE output", format!("{c} channels, expected 3")));
    }
    let x = image.get(0)?.clamp(-1f32, 1f32)?.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    Ok((w, h, x.iter().map(|v| (127.5 * (v + 1.0)) as u8).collect()))
}
