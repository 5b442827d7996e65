//! GGML's tensor types as GGUF files store them, and their dequantization to
//! f32.
//!
//! Quantized types are blocks of a fixed number of elements along a row's
//! innermost dimension, each block holding its own scales. The layouts and the
//! arithmetic follow llama.cpp's reference `dequantize_row_*` functions
//! (`ggml-quants.c`; read, not copied), which gguf-py's numpy
//! `gguf.quants.dequantize` also implements: products of an f16 scale and
//! small integers are exact in f32, so the only rounding is each element's
//! final add or subtract, the same in both. The committed fixtures are
//! checked against gguf-py element for element.
//!
//! ComfyUI-GGUF's default dequantizes in f16 (its `dequant_dtype` left
//! unset) before converting to the model dtype; ours is f32 then the model
//! dtype, as llama.cpp and ComfyUI-GGUF with `dequant_dtype` f32 do. Not
//! handled: the `IQ*`, `TQ*` and `MXFP4` types, `Q8_1`/`Q8_K` (activation
//! formats), integer and f64 tensors; each is refused by name.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements in a k-quant super-block.
const QK_K: usize = 256;
/// Blocks one rayon task dequantizes (64 Ki elements of a 256-element type).
const BLOCKS_PER_TASK: usize = 256;
/// The alignment candle's block structs need (their widest field, an f32 in `Q8_K`; 2 for ours).
const BLOCK_ALIGN: usize = 4;

/// A GGML tensor type we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type of GGML's numeric id (`enum ggml_type`), or the id's name
    /// where we cannot read it.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => return Err(unsupported_name(other)),
        })
    }

    /// GGML's name of the type (`Q4_K`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Types stored as blocks with scales (not a plain float per element).
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes of a tensor of `shape` (PyTorch order: the last dimension is
    /// the one blocks run along), or why it cannot be stored in this type.
    pub fn nbytes(self, shape: &[usize]) -> Result<usize, String> {
        let (block, size) = self.block();
        let row = shape.last().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(format!("its rows of {row} elements are not whole {} blocks of {block}", self.name()));
        }
        let rows: usize = shape.iter().rev().skip(1).try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("too large")?;
        rows.checked_mul(row / block).and_then(|b| b.checked_mul(size)).ok_or_else(|| "too large".to_string())
    }

    /// The `n` elements stored in `bytes` (exactly [`Self::nbytes`] of them), as f32.
    pub fn dequantize(self, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
        let (block, size) = self.block();
        if n % block != 0 || bytes.len() != n / block * size {
            return Err(format!("{} bytes do not hold {n} elements of {}", bytes.len(), self.name()));
        }
        let mut out = vec![0f32; n];
        let one: fn(&[u8], &mut [f32]) = match self {
            Self::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F16 => |b, y| y[0] = half_at(b, 0),
            Self::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Self::Q4_0 => q4_0,
            Self::Q4_1 => q4_1,
            Self::Q5_0 => q5_0,
            Self::Q5_1 => q5_1,
            Self::Q8_0 => q8_0,
            Self::Q2K => q2_k,
            Self::Q3K => q3_k,
            Self::Q4K => q4_k,
            Self::Q5K => q5_k,
            Self::Q6K => q6_k,
        };
        // Blocks are independent: spread runs of them over rayon's threads.
        let run = BLOCKS_PER_TASK;
        out.par_chunks_mut(block * run).zip(bytes.par_chunks(size * run)).for_each(|(y, b)| {
            for (b, y) in b.chunks_exact(size).zip(y.chunks_exact_mut(block)) {
                one(b, y);
            }
        });
        Ok(out)
    }
}

impl GgmlType {
    /// candle's name of a quantized type (`None` for the float types).
    fn candle(self) -> Option<GgmlDType> {
        Some(match self {
            Self::F32 | Self::F16 | Self::BF16 => return None,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        })
    }

    /// The blocks in `bytes` (a tensor of `shape`, this type) as candle's
    /// quantized tensor on `device`, kept quantized there: on the CPU a copy
    /// of the blocks, on a GPU one upload. candle reads blocks in place, so
    /// bytes not aligned for them are first copied to an aligned buffer.
    pub fn qtensor(self, bytes: &[u8], shape: &[usize], device: &Device) -> candle_core::Result<QTensor> {
        let dtype =
            self.candle().ok_or_else(|| candle_core::Error::Msg(format!("{} is not quantized", self.name())))?;
        let expected = self.nbytes(shape).map_err(candle_core::Error::Msg)?;
        if bytes.len() != expected {
            return Err(candle_core::Error::Msg(format!("{} bytes, expected {expected}", bytes.len())));
        }
        let mut words: Vec<u64>;
        let data: &[u8] = if bytes.as_ptr() as usize % BLOCK_ALIGN == 0 {
            bytes
        } else {
            words = vec![0; bytes.len().div_ceil(8)];
            let buf: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
            buf[..bytes.len()].copy_from_slice(bytes);
            &buf[..bytes.len()]
        };
        QTensor::new(QStorage::from_data(Cow::Borrowed(data), device, dtype)?, shape)
    }
}

/// The name of a GGML type id we do not read, for the error.
fn unsupported_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16..=19 | 21 | 22 | 29 => "an IQ (importance) type",
        20 => "IQ4_NL",
        23 => "IQ4_XS",
        24..=27 => "an integer type",
        28 => "F64",
        34 | 35 => "a ternary type (TQ1_0/TQ2_0)",
        39 => "MXFP4",
        _ => "an unknown type",
    };
    format!(
        "GGML type {id} ({name}) is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
         Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
    )
}

/// The little-endian f16 at byte `at`, as f32.
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `Q4_0`: f16 scale, 16 bytes of 4-bit values (low nibbles are elements 0–15, high 16–31), offset 8.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `Q4_1`: f16 scale and minimum, then `Q4_0`'s nibbles, unsigned.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bits of a 5-bit block: bit `j` of the 32-bit word for element `j`.
fn fifth_bits(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// `Q5_0`: f16 scale, the 32 fifth bits, `Q4_0`'s nibbles; offset 16.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let high = fifth_bits(&b[2..6]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let lo = (q & 0xF) as u32 | ((high >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((high >> (j + 16)) & 1) << 4;
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// `Q5_1`: f16 scale and minimum, the fifth bits, the nibbles; unsigned.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let high = fifth_bits(&b[4..8]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let lo = (q & 0xF) as u32 | ((high >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((high >> (j + 16)) & 1) << 4;
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

/// `Q8_0`: f16 scale, 32 signed bytes.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

/// `Q2_K`: 16 scale bytes (low nibble scale, high nibble minimum, one per 16
/// elements), 64 bytes of 2-bit values, f16 super-scale and super-minimum.
/// Each 32 bytes of values serve 128 elements, four 2-bit planes of 32.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    let mut out = y.iter_mut();
    let mut sc = scales.iter();
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for part in half.chunks_exact(16) {
                let s = sc.next().copied().unwrap_or(0);
                let (dl, ml) = (d * (s & 0xF) as f32, dmin * (s >> 4) as f32);
                // `part` first: a zip ends by asking its first iterator, so none of `out` is skipped.
                for (&q, y) in part.iter().zip(&mut out) {
                    *y = dl * ((q >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// `Q3_K`'s 16 six-bit scales from their 12 packed bytes (low nibbles in
/// bytes 0–7, the two high bits of each in bytes 8–11), offset 32.
fn q3_k_scales(p: &[u8]) -> [i32; 16] {
    let mut s = [0i32; 16];
    for (i, s) in s.iter_mut().enumerate() {
        let low = if i < 8 { p[i] & 0xF } else { p[i - 8] >> 4 };
        let high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | high << 4) as i32 - 32;
    }
    s
}

/// `Q3_K`: 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of
/// packed scales, f16 super-scale. An element's value is its two low bits,
/// less 4 where its mask bit is clear; the layout of the planes is `Q2_K`'s.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = half_at(b, 108);
    let mut out = y.iter_mut();
    let mut sc = scales.iter();
    let mut plane = 0;
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (part, mask) in half.chunks_exact(16).zip(hmask.chunks_exact(16)) {
                let dl = d * sc.next().copied().unwrap_or(0) as f32;
                for ((&q, &m), y) in part.iter().zip(mask).zip(&mut out) {
                    let low = ((q >> shift) & 3) as i32;
                    let high = if m & (1 << plane) != 0 { 0 } else { 4 };
                    *y = dl * (low - high) as f32;
                }
            }
            plane += 1;
        }
    }
}

/// The scale and minimum `j` (0–7) of `Q4_K`/`Q5_K`'s 12 packed bytes: six
/// bits each; 0–3 in the low bits of bytes 0–7, 4–7 from a nibble of bytes
/// 8–11 and the top two bits of bytes 0–7.
fn scale_min_k4(j: usize, p: &[u8]) -> (f32, f32) {
    let (s, m) = if j < 4 {
        (p[j] & 63, p[j + 4] & 63)
    } else {
        ((p[j + 4] & 0xF) | ((p[j - 4] >> 6) << 4), (p[j + 4] >> 4) | ((p[j] >> 6) << 4))
    };
    (s as f32, m as f32)
}

/// `Q4_K`: f16 super-scale and super-minimum, 12 bytes of packed 6-bit
/// scales and minimums (one pair per 32 elements), 128 bytes of nibbles:
/// each 32 bytes hold 64 elements, low nibbles first.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let packed = &b[4..16];
    for (i, (qs, y)) in b[16..144].chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (s1, m1) = scale_min_k4(2 * i, packed);
        let (s2, m2) = scale_min_k4(2 * i + 1, packed);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for (l, &q) in qs.iter().enumerate() {
            y[l] = d1 * (q & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// `Q5_K`: `Q4_K` with 32 bytes of fifth bits before the nibbles; byte `l`'s
/// bits `2i` and `2i + 1` go to element `l` of the low and high nibbles of
/// the `i`-th 32 nibble bytes.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (packed, qh) = (&b[4..16], &b[16..48]);
    for (i, (qs, y)) in b[48..176].chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (s1, m1) = scale_min_k4(2 * i, packed);
        let (s2, m2) = scale_min_k4(2 * i + 1, packed);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        for (l, (&q, &h)) in qs.iter().zip(qh).enumerate() {
            let lo = (q & 0xF) | ((h >> (2 * i)) & 1) << 4;
            let hi = (q >> 4) | ((h >> (2 * i + 1)) & 1) << 4;
            y[l] = d1 * lo as f32 - m1;
            y[l + 32] = d2 * hi as f32 - m2;
        }
    }
}

/// `Q6_K`: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed
/// scales (one per 16 elements), f16 super-scale; offset 32. Each half of
/// 128 elements takes 64 low bytes, 32 high bytes and 8 scales.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for (n, y) in y.chunks_exact_mut(128).enumerate() {
        let (ql, qh, sc) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32], &sc[8 * n..8 * n + 8]);
        for l in 0..32 {
            let is = l / 16;
            let h = qh[l];
            let q = [
                (ql[l] & 0xF) | (h & 3) << 4,
                (ql[l + 32] & 0xF) | ((h >> 2) & 3) << 4,
                (ql[l] >> 4) | ((h >> 4) & 3) << 4,
                (ql[l + 32] >> 4) | ((h >> 6) & 3) << 4,
            ];
            for (k, q) in q.into_iter().enumerate() {
                y[l + 32 * k] = d * sc[is + 2 * k] as i8 as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ids_round_trip() {
        for id in [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30] {
            let t = GgmlType::from_id(id).unwrap();
            let (block, size) = t.block();
            assert_eq!(t.nbytes(&[3, 2 * block]).unwrap(), 6 * size, "{}", t.name());
            assert_eq!(t.dequantize(&vec![0; 6 * size], 6 * block).unwrap(), vec![0.0; 6 * block]);
        }
        let e = GgmlType::from_id(23).unwrap_err();
        assert!(e.contains("IQ4_XS") && e.contains("not supported"), "{e}");
        assert!(GgmlType::Q4K.nbytes(&[2, 100]).unwrap_err().contains("not whole Q4_K blocks"));
        assert!(GgmlType::Q8_0.dequantize(&[0; 33], 32).is_err());
    }

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        // Scale 0.5 (f16 0x3800), values -128..: Q8_0 is q·d.
        let mut b = vec![0x00, 0x38];
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = GgmlType::Q8_0.dequantize(&b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);
        // Q4_0: byte j holds elements j (low nibble) and j + 16 (high), offset 8.
        let mut b = vec![0x00, 0x40]; // 2.0
        b.extend((0..16).map(|j| (j as u8) | (15 - j as u8) << 4));
        let y = GgmlType::Q4_0.dequantize(&b, 32).unwrap();
        assert_eq!((y[0], y[15], y[16], y[31]), (-16.0, 14.0, 14.0, -16.0));
    }

    #[test]
    fn q3_k_scales_unpack_six_bits() {
        // Scale i = i + 7 (all within 0..64), packed as Q3_K packs them.
        let want: Vec<u8> = (0..16).map(|i| i + 7).collect();
        let mut p = [0u8; 12];
        for (i, &s) in want.iter().enumerate() {
            if i < 8 {
                p[i] |= s & 0xF;
            } else {
                p[i - 8] |= (s & 0xF) << 4;
            }
            p[8 + i % 4] |= (s >> 4) << (2 * (i / 4));
        }
        let got = q3_k_scales(&p);
        assert_eq!(got.to_vec(), want.iter().map(|&s| s as i32 - 32).collect::<Vec<_>>());
    }
}
