//! Flow-matching Euler sampling for Flux: seeded noise, latent packing into
//! 2×2 patches and token positions (after BFL's `sampling.py`), and the loop
//! `x ← x + (σₙ₊₁ − σₙ) · v(x, σₙ)` over the time-shifted schedule
//! ([`crate::schedule::flux_schedule`]), with true classifier-free guidance
//! when a negative prompt is given ([`Guide`]). Latents stay f32 between
//! steps (diffusers' scheduler upcasts the same way); the model runs in its
//! dtype. Image-to-image starts part-way ([`img2img_start`], [`Start::Image`]);
//! inpainting also puts the kept part of the image back after every step
//! ([`latent_mask`]). FLUX.1 Fill's and Canny/Depth's extra input channels
//! ([`FluxVariant`]) and Kontext's reference tokens ride along each pass
//! ([`Guide`]).

use candle_core::{DType, Device, Tensor};

use super::controlnet::ControlInput;
use super::hooks::Hooks;
use super::model::{Conditioning, FluxModel};
use crate::error::{Error, Result};

/// VAE downsampling × patch size: width and height must be multiples of this.
pub const PIXELS_PER_TOKEN: usize = 16;
/// Latent channels of the Flux VAE.
pub const LATENT_CHANNELS: usize = 16;
/// Largest side accepted (BFL's reference works up to 2 MP; this is a sanity bound).
pub const MAX_SIDE: usize = 4096;

/// Checks an output size: both sides multiples of 16, between 16 and [`MAX_SIDE`].
pub fn check_size(width: usize, height: usize) -> Result<()> {
    for (what, v) in [("width", width), ("height", height)] {
        if v == 0 || v % PIXELS_PER_TOKEN != 0 || v > MAX_SIDE {
            return Err(Error::Unsupported(format!(
                "{what} {v} must be a multiple of {PIXELS_PER_TOKEN} between {PIXELS_PER_TOKEN} and {MAX_SIDE} \
                 (Flux works on 16×16-pixel tokens)"
            )));
        }
    }
    Ok(())
}

/// Token grid `(rows, cols)` of an image.
pub fn token_grid(width: usize, height: usize) -> (usize, usize) {
    (height / PIXELS_PER_TOKEN, width / PIXELS_PER_TOKEN)
}

/// Token positions `[0, row, col]`, row-major (BFL's `img_ids`).
pub fn img_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows).flat_map(|r| (0..cols).map(move |c| [0.0, r as f32, c as f32])).collect()
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64: small, fast and
/// the same on every platform, so a seed gives the same noise everywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// `n` standard normal samples (Box–Muller, both outputs used).
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let r = (-2.0 * self.uniform().ln()).sqrt();
            let a = std::f64::consts::TAU * self.uniform();
            out.push((r * a.cos()) as f32);
            out.push((r * a.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

/// Seeded Gaussian latents `[1, 16, H/8, W/8]` in f32.
pub fn noise(seed: u64, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    check_size(width, height)?;
    let (h, w) = (height / 8, width / 8);
    let v = Rng::new(seed).normals(LATENT_CHANNELS * h * w);
    Ok(Tensor::from_vec(v, (1, LATENT_CHANNELS, h, w), device)?)
}

/// `[B, C, H, W]` → `[B, (H/2)(W/2), 4C]`: 2×2 patches, channel-major (`b c (h ph) (w pw) -> b (h w) (c ph pw)`).
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// Inverse of [`pack`] for a latent of `h × w` (in latent pixels).
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = x.dims3()?;
    let c = c4 / 4;
    Ok(x.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))?)
}

/// Image-to-image: the index into the `steps + 1` sigmas of the first one
/// run at `strength` in (0, 1] (diffusers' `FluxImg2ImgPipeline.get_timesteps`:
/// `⌊steps − steps · strength⌋`, in f64 as Python computes it), so
/// `steps − start` steps run. Strength 1 runs them all from pure noise.
pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::Unsupported(format!(
            "strength {strength} is outside (0, 1]: it is the share of the steps run on the init image \
             (1 ignores the image)"
        )));
    }
    let n = steps as f64;
    Ok((n - (n * strength).min(n)).max(0.0) as usize)
}

/// The init image's packed latents noised to `sigma`, as the flow-matching
/// scheduler's `scale_noise`: `σ · noise + (1 − σ) · image` (f32).
pub fn noised(image: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let image = (image.to_dtype(DType::F32)? * f64::from(1.0 - sigma))?;
    Ok(((noise.to_dtype(DType::F32)? * f64::from(sigma))? + image)?)
}

/// An inpainting mask (8-bit luma, `width × height`, white = repaint) as the
/// packed latent mask `[1, tokens, 64]` diffusers' `FluxInpaintPipeline`
/// makes: binarised at 0.5 (`v/255 ≥ 0.5`), taken every 8th pixel (PyTorch's
/// nearest `interpolate` to the latent size), repeated over the 16 latent
/// channels and packed like the latents. 1 marks what is repainted.
pub fn latent_mask(luma: &[u8], width: usize, height: usize, device: &Device) -> Result<Tensor> {
    check_size(width, height)?;
    if luma.len() != width * height {
        return Err(Error::Shape(format!("mask of {} samples for {width}×{height}", luma.len())));
    }
    let (h, w) = (height / 8, width / 8);
    let picked: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| luma[y * 8 * width + x * 8])).collect();
    pack(&mask_plane(&picked, w, h, device)?.repeat((1, LATENT_CHANNELS, 1, 1))?)
}

/// Channels of FLUX.1 Fill's per-token conditioning: the masked image's packed
/// latents (64) and the packed 8×8 mask (256), after the latents' 64.
pub const FILL_CONDITION_CHANNELS: usize = 64 + 256;

/// Channels of FLUX.1 Canny/Depth's per-token conditioning: the control
/// image's packed latents, after the latents' 64.
pub const CONTROL_CONDITION_CHANNELS: usize = 64;

/// What a Flux transformer takes besides the latents, told by its input
/// channels per token (nothing in a checkpoint names the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxVariant {
    /// FLUX.1 \[dev\]/\[schnell\] (and Kontext-dev): the latents alone.
    Base,
    /// FLUX.1 Fill: the masked image's latents and the 8×8 mask ([`FILL_CONDITION_CHANNELS`]).
    Fill,
    /// FLUX.1 Canny/Depth: a control image's latents ([`CONTROL_CONDITION_CHANNELS`]).
    Control,
}

impl FluxVariant {
    /// The variant taking `in_channels` per token; other widths are refused by name.
    pub fn from_in_channels(in_channels: usize) -> Result<Self> {
        let latents = 4 * LATENT_CHANNELS;
        match in_channels.checked_sub(latents) {
            Some(0) => Ok(Self::Base),
            Some(FILL_CONDITION_CHANNELS) => Ok(Self::Fill),
            Some(CONTROL_CONDITION_CHANNELS) => Ok(Self::Control),
            _ => Err(Error::Unsupported(format!(
                "this Flux takes {in_channels} input channels per token: FLUX.1 [dev]/[schnell]/Kontext take \
                 {latents}, FLUX.1 Canny/Depth {}, FLUX.1 Fill {}",
                latents + CONTROL_CONDITION_CHANNELS,
                latents + FILL_CONDITION_CHANNELS
            ))),
        }
    }
}

/// The binarised mask plane `[1, 1, H, W]` (1 = repaint) of 8-bit luma, as
/// diffusers' mask processor makes it: `v/255 ≥ 0.5`.
pub fn mask_plane(luma: &[u8], width: usize, height: usize, device: &Device) -> Result<Tensor> {
    if luma.len() != width * height {
        return Err(Error::Shape(format!("mask of {} samples for {width}×{height}", luma.len())));
    }
    let v = luma.iter().map(|&v| if f32::from(v) / 255.0 >= 0.5 { 1f32 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (1, 1, height, width), device)?)
}

/// FLUX.1 Fill's packed mask `[1, tokens, 256]` from a mask plane `[1, 1, H, W]`:
/// each latent pixel's 8×8 block of mask pixels as 64 channels (`py · 8 + px`),
/// packed 2×2 like the latents (diffusers' `FluxFillPipeline.prepare_mask_latents`).
pub fn fill_mask(plane: &Tensor) -> Result<Tensor> {
    let (b, _, height, width) = plane.dims4()?;
    let (h, w) = (height / 8, width / 8);
    let blocks = plane.reshape((b, h, 8, w, 8))?.permute((0, 2, 4, 1, 3))?.reshape((b, 64, h, w))?;
    pack(&blocks)
}

/// Where sampling starts.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Text-to-image: packed noise at σ = 1.
    Noise(&'a Tensor),
    /// Image-to-image: the init image's packed latents, noised with `noise` to
    /// the first sigma ([`noised`]). With a `mask` (packed, 1 = repaint;
    /// [`latent_mask`]) it inpaints: after every step the kept part is the
    /// image noised to the next sigma (the image itself after the last), as
    /// diffusers' `FluxInpaintPipeline` blends `(1 − m) · image + m · x`.
    Image { image: &'a Tensor, noise: &'a Tensor, mask: Option<&'a Tensor> },
}

/// Progress of the sampling loop, reported after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub steps: usize,
    pub sigma: f32,
}

/// What the model is asked each step: the prompt, and for true
/// classifier-free guidance a negative prompt with its scale.
#[derive(Clone, Copy)]
pub struct Guide<'a> {
    pub positive: &'a Conditioning,
    /// The negative prompt and diffusers' `true_cfg_scale` (ComfyUI's `cfg`):
    /// each step runs the model on both and takes `v₋ + scale · (v₊ − v₋)`
    /// (in f32), as diffusers' `FluxPipeline` does. `None`: one pass.
    pub negative: Option<(&'a Conditioning, f32)>,
    /// The hooks of the negative pass. `None`: the positive pass's, as
    /// ComfyUI's patched model runs its IP-Adapter on both; diffusers gives
    /// the negative pass the IP-Adapter with a black image instead.
    pub negative_hooks: Option<Hooks<'a>>,
    /// Input channels appended to the latents' at every pass (FLUX.1 Fill's
    /// masked image and mask, [`FILL_CONDITION_CHANNELS`]; FLUX.1
    /// Canny/Depth's control image latents, [`CONTROL_CONDITION_CHANNELS`]);
    /// `None` for a model that takes the latents alone ([`FluxVariant`]).
    pub channels: Option<&'a Tensor>,
    /// Image tokens appended after the latents' at every pass, with their
    /// positions (FLUX.1 Kontext's reference image, [`super::kontext`]); the
    /// model's output for them is dropped.
    pub reference: Option<(&'a Tensor, &'a [[f32; 3]])>,
    /// ControlNets run on the latents each step of their window, their
    /// residuals added to both passes' blocks (as diffusers'
    /// `FluxControlNetPipeline`, which computes them with the positive prompt).
    pub control: &'a [ControlInput<'a>],
}

impl<'a> Guide<'a> {
    /// The prompt alone (Flux-dev's distilled guidance only).
    pub fn prompt(positive: &'a Conditioning) -> Self {
        Self { positive, negative: None, negative_hooks: None, channels: None, reference: None, control: &[] }
    }
}

/// Euler over `sigmas` (descending, ending at 0) from `start`: returns the final packed latents in f32.
pub fn euler(
    model: &FluxModel,
    start: Start<'_>,
    ids: &[[f32; 3]],
    guide: Guide<'_>,
    sigmas: &[f32],
    hooks: Hooks<'_>,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<Tensor> {
    let first = sigmas.first().copied().unwrap_or(0.0);
    let mut x = match start {
        Start::Noise(noise) => noise.to_dtype(DType::F32)?,
        Start::Image { image, noise, .. } => noised(image, noise, first)?,
    };
    let steps = sigmas.len().saturating_sub(1);
    let tokens = x.dim(1)?;
    if !guide.control.is_empty() && guide.reference.is_some() {
        return Err(Error::Unsupported("ControlNets with Kontext's reference images are not supported".into()));
    }
    let latent_ids = ids;
    let all_ids: Vec<[f32; 3]>;
    let ids = match guide.reference {
        Some((_, reference)) => {
            all_ids = ids.iter().chain(reference).copied().collect();
            &all_ids[..]
        }
        None => ids,
    };
    for (step, pair) in sigmas.windows(2).enumerate() {
        let (s, s_next) = (pair[0], pair[1]);
        let mut input = match guide.channels {
            Some(c) => Tensor::cat(&[&x, &c.to_dtype(DType::F32)?], 2)?,
            None => x.clone(),
        };
        if let Some((reference, _)) = guide.reference {
            input = Tensor::cat(&[&input, &reference.to_dtype(DType::F32)?], 1)?;
        }
        // The latents' own tokens (a reference image's are dropped).
        let own = |v: Tensor| -> Result<Tensor> { Ok(v.narrow(1, 0, tokens)?.to_dtype(DType::F32)?) };
        let sigma = f64::from(s);
        let control = guide
            .control
            .iter()
            .filter(|c| c.window.active(step, steps, sigma))
            .map(|c| c.net.forward(&x, latent_ids, c.image, c.mode, guide.positive, sigma, c.scale))
            .collect::<Result<Vec<_>>>()?;
        let mut v = own(model.forward_controlled(&input, ids, guide.positive, sigma, step, hooks, &control)?)?;
        if let Some((negative, scale)) = guide.negative {
            let negative_hooks = guide.negative_hooks.unwrap_or(hooks);
            let u = own(model.forward_controlled(&input, ids, negative, sigma, step, negative_hooks, &control)?)?;
            v = (&u + ((v - &u)? * f64::from(scale))?)?;
        }
        x = (x + (v * f64::from(s_next - s))?)?;
        if let Start::Image { image, noise, mask: Some(mask) } = start {
            let kept = noised(image, noise, s_next)?;
            let mask = mask.to_dtype(DType::F32)?;
            x = ((kept * mask.affine(-1.0, 1.0)?)? + (x * mask)?)?;
        }
        on_step(StepInfo { step, steps, sigma: s });
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_are_told_by_input_channels() {
        assert_eq!(FluxVariant::from_in_channels(64).unwrap(), FluxVariant::Base);
        assert_eq!(FluxVariant::from_in_channels(128).unwrap(), FluxVariant::Control);
        assert_eq!(FluxVariant::from_in_channels(384).unwrap(), FluxVariant::Fill);
        for other in [0, 16, 63, 96, 192, 320] {
            let e = FluxVariant::from_in_channels(other).unwrap_err().to_string();
            assert!(e.contains(&format!("{other} input channels")) && e.contains("Canny/Depth 128"), "{e}");
        }
    }

    #[test]
    fn pack_unpack_round_trip_and_layout() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2. * 4. * 6., &dev).unwrap().reshape((1, 2, 4, 6)).unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), &[1, 6, 8]);
        // Token 0 = rows 0-1, cols 0-1; channel-major: c0 (0,0) (0,1) (1,0) (1,1), then c1.
        let t0 = p.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t0, vec![0., 1., 6., 7., 24., 25., 30., 31.]);
        let back = unpack(&p, 4, 6).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn noise_is_seeded_and_standard() {
        let a = Rng::new(7).normals(20_000);
        assert_eq!(a, Rng::new(7).normals(20_000));
        assert_ne!(a[..8], Rng::new(8).normals(8)[..]);
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }

    #[test]
    fn img2img_starts_where_diffusers_does() {
        // (steps, strength, first sigma run), from `get_timesteps`' arithmetic in Python.
        for (steps, strength, start) in
            [(6, 0.6, 2), (6, 0.95, 0), (28, 0.75, 7), (20, 1.0, 0), (4, 0.2, 3), (1, 0.5, 0)]
        {
            assert_eq!(img2img_start(steps, strength).unwrap(), start, "{steps} steps at {strength}");
        }
        // A small strength still runs one step; zero, negative, above 1 and NaN are refused.
        assert_eq!(img2img_start(4, 0.01).unwrap(), 3);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(img2img_start(4, bad).unwrap_err().to_string().contains("outside (0, 1]"), "{bad}");
        }
        let dev = Device::Cpu;
        let (image, noise) = (Tensor::new(&[2f32, -4.0], &dev).unwrap(), Tensor::new(&[1f32, 1.0], &dev).unwrap());
        assert_eq!(noised(&image, &noise, 0.25).unwrap().to_vec1::<f32>().unwrap(), vec![1.75, -2.75]);
        // σ = 1 is the noise exactly, whatever the image.
        assert_eq!(noised(&image, &noise, 1.0).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn the_latent_mask_takes_every_8th_pixel_binarised_and_packs_it() {
        // 32×16 pixels → 4×2 latent → 2×1 tokens of 64.
        let (w, h) = (32, 16);
        let mut luma = vec![0u8; w * h];
        luma[0] = 128; // (0, 0): at the threshold → repaint
        luma[8] = 127; // (0, 8): just below → keep
        luma[8 * w + 24] = 255; // (8, 24) → repaint
        luma[1] = 255; // not a sampled pixel
        let m = latent_mask(&luma, w, h, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[1, 2, 64]);
        let t: Vec<Vec<f32>> = m.get(0).unwrap().to_vec2().unwrap();
        // Token 0 covers latent (0,0) (0,1) (1,0) (1,1): only (0,0) repaints, in every channel.
        assert_eq!(&t[0][..4], &[1.0, 0.0, 0.0, 0.0]);
        assert_eq!(&t[1][..4], &[0.0, 0.0, 0.0, 1.0]);
        assert!(t.iter().all(|tok| tok.chunks(4).all(|c| c == &tok[..4])), "channels differ");
        assert!(latent_mask(&luma[1..], w, h, &Device::Cpu).is_err());
    }

    #[test]
    fn the_fill_mask_lays_each_8x8_block_out_as_channels() {
        // 16×16 pixels → 2×2 latent → one token of 4 × 64 values.
        let mut luma = vec![0u8; 16 * 16];
        luma[3 * 16 + 5] = 255; // latent (0, 0), offset (py 3, px 5) → channel 29
        luma[(8 + 1) * 16 + 8 + 2] = 200; // latent (1, 1), offset (1, 2) → channel 10
        let plane = mask_plane(&luma, 16, 16, &Device::Cpu).unwrap();
        let token = fill_mask(&plane).unwrap().get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(token.len(), 256);
        let ones: Vec<usize> = token.iter().enumerate().filter(|(_, &v)| v == 1.0).map(|(i, _)| i).collect();
        // Packed channel-major: channel c, then (ph, pw) = (0,0) (0,1) (1,0) (1,1).
        assert_eq!(ones, vec![10 * 4 + 3, 29 * 4]);
    }

    #[test]
    fn sizes_must_be_multiples_of_16() {
        check_size(512, 768).unwrap();
        for (w, h) in [(500, 512), (512, 0), (8192, 512)] {
            assert!(check_size(w, h).unwrap_err().to_string().contains("multiple of 16"));
        }
        assert_eq!(img_ids(2, 3)[4], [0.0, 1.0, 1.0]);
    }
}
