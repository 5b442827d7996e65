//! Image bytes → SigLIP pixel values, as transformers' SiglipImageProcessor
//! computes them for google/siglip-so400m-patch14-384.
//!
//! Steps: decode (PNG, JPEG, WebP) → 8-bit RGB → resize the whole image to
//! the model's size with Pillow's antialiased bicubic → ×1/255 → (x−mean)/std.
//!
//! **RGB conversion** follows Pillow's `convert("RGB")`: alpha is dropped (not
//! composited), grayscale is replicated, palettes are expanded. 16-bit colour
//! keeps each sample's high byte, as Pillow reads it. 16-bit grayscale is
//! scaled by rounding `v/257`: Pillow would *clip* it at 255, whitening such
//! images, so there we deliberately differ (the fixture script documents it).
//!
//! **Resize** reimplements Pillow's `ImagingResample` for 8-bit images
//! (libImaging/Resample.c): separable passes, horizontal first, a bicubic
//! kernel with a = −0.5 (or Lanczos-3, [`Resample`], for Flux init images)
//! stretched by the downscale factor (antialiasing),
//! coefficients normalised then rounded to 22-bit fixed point, each pass
//! rounded and clamped to `u8`. The result equals Pillow's byte for byte on the
//! committed fixtures.
//!
//! Images over [`MAX_PIXELS`] are refused from their header, before any pixel
//! is decoded. No file IO: bytes in, tensor out.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageReader};

use crate::config::PreprocessConfig;
use crate::error::{Error, Result};

/// The largest image we decode: 64 megapixels.
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Decodes PNG/JPEG/WebP bytes to 8-bit RGB, refusing empty, unknown and oversized images.
pub fn decode_rgb(bytes: &[u8], source_name: &str) -> Result<RgbImage> {
    let err = |reason: String| Error::Image { source_name: source_name.to_string(), reason };
    let (w, h) = image_size(bytes, source_name)?;
    let (w, h) = (w as u32, h as u32);
    let reader = |b| {
        ImageReader::new(Cursor::new(b)).with_guessed_format().map_err(|e| err(format!("cannot read the image: {e}")))
    };
    let mut decoder = reader(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    decoder.limits(limits);
    if decoder.format() == Some(image::ImageFormat::Jpeg) {
        return decode_jpeg(bytes).map_err(err);
    }
    let img = decoder.decode().map_err(|e| err(format!("cannot decode the image: {e}")))?;
    Ok(to_rgb8(img))
}

/// An image's width and height from its header alone (no pixel decoded),
/// refusing what [`decode_rgb`] refuses: empty, unknown and oversized images.
pub fn image_size(bytes: &[u8], source_name: &str) -> Result<(usize, usize)> {
    let err = |reason: String| Error::Image { source_name: source_name.to_string(), reason };
    if bytes.is_empty() {
        return Err(err("the file is empty".into()));
    }
    let probe = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read the image: {e}")))?;
    if probe.format().is_none() {
        return Err(err("not a PNG, JPEG or WebP image (unrecognised file signature)".into()));
    }
    let (w, h) = probe.into_dimensions().map_err(|e| err(format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(err(format!("the image is zero-sized ({w}×{h})")));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > MAX_PIXELS {
        return Err(err(format!(
            "the image is {w}×{h} = {:.1} megapixels, over the limit of {} megapixels; downscale it first",
            pixels as f64 / 1e6,
            MAX_PIXELS / (1024 * 1024)
        )));
    }
    Ok((w as usize, h as usize))
}

/// JPEG through our libjpeg-turbo-exact decoder ([`crate::jpeg`]), so pixels
/// match Pillow's; JPEGs it does not cover (CMYK, 12-bit, arithmetic coding)
/// go through `jpeg-decoder`, whose output may differ by a few levels.
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    match crate::jpeg::decode(bytes) {
        Ok(d) => {
            let data = if d.channels == 1 { d.data.iter().flat_map(|&v| [v, v, v]).collect() } else { d.data };
            Ok(RgbImage { width: d.width, height: d.height, data })
        }
        Err(crate::jpeg::JpegError::Corrupt(reason)) => Err(format!("cannot decode the JPEG: {reason}")),
        Err(crate::jpeg::JpegError::Unsupported(what)) => {
            tracing::debug!(%what, "JPEG outside the exact decoder's scope; using jpeg-decoder");
            decode_jpeg_fallback(bytes)
        }
    }
}

fn decode_jpeg_fallback(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    use jpeg_decoder::PixelFormat;
    let mut dec = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    let pixels = dec.decode().map_err(|e| format!("cannot decode the JPEG: {e}"))?;
    let info = dec.info().ok_or("JPEG without a frame header")?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    let data = match info.pixel_format {
        PixelFormat::RGB24 => pixels,
        PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        PixelFormat::L16 => pixels
            .chunks_exact(2)
            .flat_map(|c| {
                let v = ((u32::from(u16::from_be_bytes([c[0], c[1]])) + 128) / 257) as u8;
                [v, v, v]
            })
            .collect(),
        PixelFormat::CMYK32 => pixels
            .chunks_exact(4)
            .flat_map(|c| {
                // Adobe-style inverted CMYK, as Pillow's CMYK→RGB: channel × (255 − K) / 255.
                let k = u32::from(c[3]);
                let f = |x: u8| (u32::from(x) * k / 255) as u8;
                [f(c[0]), f(c[1]), f(c[2])]
            })
            .collect(),
    };
    if data.len() != width * height * 3 {
        return Err("the JPEG decoded to an unexpected number of samples".into());
    }
    Ok(RgbImage { width, height, data })
}

/// Drops alpha, replicates gray, scales 16-bit and float samples to 8 bits.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let high_byte = |px: &[u16]| [(px[0] >> 8) as u8, (px[1] >> 8) as u8, (px[2] >> 8) as u8];
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        // Pillow reads 16-bit colour PNGs as 8-bit by keeping each sample's high byte.
        DynamicImage::ImageRgb16(b) => b.as_raw().chunks_exact(3).flat_map(high_byte).collect(),
        DynamicImage::ImageRgba16(b) => b.as_raw().chunks_exact(4).flat_map(high_byte).collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage { width, height, data }
}

/// Pillow's resampling filters that we reimplement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// `Image.BICUBIC`: Keys' cubic with a = −0.5, support 2 (SigLIP's processor).
    Bicubic,
    /// `Image.LANCZOS`: sinc windowed by sinc(x/3), support 3 (diffusers'
    /// `VaeImageProcessor` fits init images with it).
    Lanczos,
}

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// The kernel at `x` (Pillow's `bicubic_filter` and `lanczos_filter`).
    fn kernel(self, x: f64) -> f64 {
        match self {
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let x = x * std::f64::consts::PI;
                        x.sin() / x
                    }
                };
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps for one output sample: first input index and weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Coefficients for resampling `in_size` samples to `out_size` (Pillow's `precompute_coeffs` + 8-bit normalisation).
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    // Pillow multiplies by the reciprocal (not divides): the same rounding as it.
    let ss = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // Truncation toward zero, as C's (int) cast.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax).map(|x| filter.kernel((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = raw.iter().sum();
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let k = if total != 0.0 { w / total } else { w };
                    // C's (int) truncation after ±0.5: round half away from zero.
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over interleaved RGB: resamples along x (`horizontal`) or y.
fn resample_pass(src: &RgbImage, out_w: usize, out_h: usize, horizontal: bool, filter: Resample) -> RgbImage {
    let taps =
        if horizontal { coefficients(src.width, out_w, filter) } else { coefficients(src.height, out_h, filter) };
    let mut data = vec![0u8; out_w * out_h * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..out_h {
        for x in 0..out_w {
            let t = if horizontal { &taps[x] } else { &taps[y] };
            for c in 0..3 {
                let mut acc = half;
                for (i, &w) in t.weights.iter().enumerate() {
                    let (sx, sy) = if horizontal { (t.start + i, y) } else { (x, t.start + i) };
                    acc += i64::from(src.data[(sy * src.width + sx) * 3 + c]) * i64::from(w);
                }
                data[(y * out_w + x) * 3 + c] = clip8(acc);
            }
        }
    }
    RgbImage { width: out_w, height: out_h, data }
}

/// 8-bit luma as Pillow's `convert("L")`: `(19595 R + 38470 G + 7471 B + 2¹⁵) >> 16` (ITU-R 601-2).
pub fn to_luma(img: &RgbImage) -> Vec<u8> {
    let l = |p: &[u8]| (u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16;
    img.data.chunks_exact(3).map(|p| l(p) as u8).collect()
}

/// Resizes with Pillow's `Image.resize(size, filter)` semantics (a copy when the size is the same).
pub fn resize(img: &RgbImage, width: usize, height: usize, filter: Resample) -> RgbImage {
    let mut out = img.clone();
    if out.width != width {
        out = resample_pass(&out, width, out.height, true, filter);
    }
    if out.height != height {
        out = resample_pass(&out, width, height, false, filter);
    }
    out
}

/// The resized image as SigLIP pixel values: a `[1, 3, H, W]` f32 tensor on the CPU.
pub fn pixel_values(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Tensor> {
    let resized = resize(img, cfg.width, cfg.height, Resample::Bicubic);
    let plane = cfg.width * cfg.height;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = f32::from(px[c]) * cfg.rescale_factor;
            chw[c * plane + i] = (x - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, cfg.height, cfg.width), &Device::Cpu)?)
}

/// CLIP pixel values `[1, 3, crop_h, crop_w]` (f32, CPU), as transformers'
/// `CLIPImageProcessor` (PIL backend) makes them: the shortest edge resized
/// to `shortest_edge` with Pillow's bicubic (the long edge to
/// `⌊edge · long / short⌋`), a centre crop (offsets rounded down), then
/// rescale and normalize.
pub fn clip_pixel_values(img: &RgbImage, cfg: &crate::config::ClipPreprocessConfig) -> Result<Tensor> {
    let (w, h) = (img.width, img.height);
    let edge = cfg.shortest_edge;
    let (rw, rh) = if w <= h { (edge, edge * h / w) } else { (edge * w / h, edge) };
    let resized = resize(img, rw, rh, Resample::Bicubic);
    let (cw, ch) = (cfg.crop_width, cfg.crop_height);
    if cw > rw || ch > rh {
        return Err(Error::Shape(format!("a {cw}×{ch} crop of a {rw}×{rh} image")));
    }
    let (left, top) = ((rw - cw) / 2, (rh - ch) / 2);
    let plane = cw * ch;
    let mut chw = vec![0f32; 3 * plane];
    for y in 0..ch {
        for x in 0..cw {
            let px = &resized.data[((top + y) * rw + left + x) * 3..][..3];
            for c in 0..3 {
                let v = (f64::from(px[c]) * cfg.rescale_factor) as f32;
                chw[c * plane + y * cw + x] = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, ch, cw), &Device::Cpu)?)
}

/// Decode + resize + normalise in one call.
pub fn preprocess(bytes: &[u8], source_name: &str, cfg: &PreprocessConfig) -> Result<Tensor> {
    pixel_values(&decode_rgb(bytes, source_name)?, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A PNG signature and IHDR chunk only: enough to read the size, no pixel data.
    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut chunk = b"IHDR".to_vec();
        chunk.extend(w.to_be_bytes());
        chunk.extend(h.to_be_bytes());
        chunk.extend([8, 2, 0, 0, 0]);
        let mut b = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0d".to_vec();
        b.extend(&chunk);
        b.extend(crc32(&chunk).to_be_bytes());
        // An empty IDAT: the header reader stops at the first data chunk.
        b.extend([0, 0, 0, 0]);
        b.extend(b"IDAT");
        b.extend(crc32(b"IDAT").to_be_bytes());
        b
    }

    #[test]
    fn the_size_comes_from_the_header_alone() {
        // No pixel data at all: decoding would fail, the size is still read.
        assert_eq!(image_size(&png_header(40, 24), "h.png").unwrap(), (40, 24));
        assert!(decode_rgb(&png_header(40, 24), "h.png").is_err());
        assert!(image_size(&[], "e.png").unwrap_err().to_string().contains("empty"));
        assert!(image_size(&png_header(0, 5), "z.png").is_err());
        assert!(image_size(&png_header(30_000, 30_000), "big.png").unwrap_err().to_string().contains("megapixels"));
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(1000, 384), (97, 384), (384, 384), (385, 384), (3, 384)] {
            for filter in [Resample::Bicubic, Resample::Lanczos] {
                for t in coefficients(i, o, filter) {
                    let s: i32 = t.weights.iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i32, "{i}->{o}: {s}");
                }
            }
        }
    }

    #[test]
    fn luma_is_pillows() {
        // Pillow: Image.new("RGB", (4, 1)) with these pixels, .convert("L").
        let img = RgbImage { width: 4, height: 1, data: vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 100, 50] };
        assert_eq!(to_luma(&img), vec![76, 150, 29, 124]);
        let gray = RgbImage { width: 1, height: 1, data: vec![77, 77, 77] };
        assert_eq!(to_luma(&gray), vec![77], "gray stays itself");
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage { width: 50, height: 30, data: vec![77; 50 * 30 * 3] };
        let r = resize(&img, 384, 384, Resample::Bicubic);
        assert!(r.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn same_size_is_a_copy() {
        let data: Vec<u8> = (0..384 * 384 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let img = RgbImage { width: 384, height: 384, data };
        assert_eq!(resize(&img, 384, 384, Resample::Bicubic), img);
    }

    #[test]
    fn refuses_huge_image_from_header() {
        let err = decode_rgb(&png_header(10_000, 10_000), "big.png").unwrap_err().to_string();
        assert!(err.contains("big.png") && err.contains("megapixels"), "{err}");
    }

    #[test]
    fn refuses_zero_sized_and_non_images() {
        let err = decode_rgb(&png_header(0, 10), "z.png").unwrap_err().to_string();
        assert!(err.contains("z.png"), "{err}");
        let err = decode_rgb(b"hello, I am text", "t.txt").unwrap_err().to_string();
        assert!(err.contains("t.txt") && err.contains("not a PNG"), "{err}");
        let err = decode_rgb(b"", "e.png").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
