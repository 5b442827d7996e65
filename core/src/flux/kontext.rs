//! FLUX.1 Kontext: an image to edit enters as extra image tokens. Its packed
//! VAE latents follow the latents' own tokens at every pass, at positions
//! `[1, row, col]` (index 1 where the latents have 0), and the model's output
//! for them is dropped ([`super::sampler::Guide::reference`]). Kontext-dev has
//! FLUX.1-dev's weights layout; nothing in a checkpoint says it is Kontext.
//! After BFL's `sampling.py` and diffusers' `FluxKontextPipeline`, whose
//! preferred resolutions and choice of one ([`preferred_size`]) this follows.
//!
//! What it does not do: several reference images (ComfyUI offsets their
//! positions; diffusers takes one), nor the VAE encoding (the caller's).

use super::sampler::PIXELS_PER_TOKEN;

/// The resolutions Kontext was trained at, `(width, height)`, as BFL and diffusers list them.
pub const PREFERRED_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The preferred resolution closest to `width × height`'s aspect ratio
/// (ties to the smaller width, then height, as Python's tuple `min` in
/// diffusers' `_auto_resize`), rounded down to whole tokens.
pub fn preferred_size(width: usize, height: usize) -> (usize, usize) {
    let aspect = width as f64 / height.max(1) as f64;
    let key = |&(w, h): &(usize, usize)| (aspect - w as f64 / h as f64).abs();
    let best = PREFERRED_RESOLUTIONS
        .iter()
        .copied()
        .min_by(|a, b| key(a).total_cmp(&key(b)).then(a.cmp(b)))
        .unwrap_or((1024, 1024));
    (best.0 / PIXELS_PER_TOKEN * PIXELS_PER_TOKEN, best.1 / PIXELS_PER_TOKEN * PIXELS_PER_TOKEN)
}

/// Token positions `[1, row, col]` of a reference image of `rows × cols` tokens.
pub fn reference_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows).flat_map(|r| (0..cols).map(move |c| [1.0, r as f32, c as f32])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_aspect_wins() {
        assert_eq!(preferred_size(1024, 1024), (1024, 1024));
        assert_eq!(preferred_size(3000, 2000), (1248, 832));
        assert_eq!(preferred_size(10, 1000), (672, 1568));
        assert_eq!(reference_ids(2, 3)[4], [1.0, 1.0, 1.0]);
    }
}
