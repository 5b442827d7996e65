//! Weight formats of [`crate::GpuLinear`] and their host-side conversion.
//!
//! A linear layer's weight `W [N, K]` is stored row by row with a padded row
//! stride, as `u32` words the shader unpacks:
//! - `f32`: one word per value (stride `K`).
//! - `f16`: two IEEE halves per word (`unpack2x16float`; stride rounded up to 2).
//!   Needs no `shader-f16` support.
//! - `q8`: blocks of [`BLOCK`] values along K with one f32 scale each
//!   (`scale = max|w| / 127`, values `round(w / scale)` as i8, four per word).
//!   The symmetric scheme of GGML's Q8_0.
//! - `q4`: blocks of [`BLOCK`] with one f32 scale (`max|w| / 7`), values
//!   `round(w / scale)` in −7…7 stored as 4-bit `q + 8`, eight per word.
//!   Symmetric like GGML's Q4_0 (which uses −8…7 with a signed scale).
//!
//! Rows are padded with zeros to the stride, so blocks never straddle rows.
//! [`QuantizedMatrix::dequantize`] is the exact value the shader computes
//! (used by the tests as the reference for quantized kernels).

use std::fmt;
use std::str::FromStr;

use half::f16;

use crate::error::Error;

/// Values per quantisation block (along the input dimension K).
pub const BLOCK: usize = 32;

/// How a linear layer's weights are stored on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    #[default]
    F32,
    F16,
    Q8,
    Q4,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 4] = [Self::F32, Self::F16, Self::Q8, Self::Q4];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The padded row stride for `k` inputs.
    pub fn row_stride(self, k: usize) -> usize {
        match self {
            Self::F32 => k,
            Self::F16 => k.div_ceil(2) * 2,
            Self::Q8 | Self::Q4 => k.div_ceil(BLOCK) * BLOCK,
        }
    }

    fn values_per_word(self) -> usize {
        match self {
            Self::F32 => 1,
            Self::F16 => 2,
            Self::Q8 => 4,
            Self::Q4 => 8,
        }
    }

    /// Bytes of one `[n, k]` weight in this format, scales included.
    pub fn bytes(self, n: usize, k: usize) -> u64 {
        let stride = self.row_stride(k);
        let words = (n * stride) / self.values_per_word();
        let scales = if matches!(self, Self::Q8 | Self::Q4) { n * stride / BLOCK } else { 0 };
        4 * (words + scales) as u64
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| Error::Format(s.into()))
    }
}

/// A weight `[n, k]` in one [`WeightFormat`], ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedMatrix {
    pub format: WeightFormat,
    pub n: usize,
    pub k: usize,
    /// Padded values per row.
    pub stride: usize,
    pub words: Vec<u32>,
    /// One per block for q8/q4 (`n * stride / BLOCK`), empty otherwise.
    pub scales: Vec<f32>,
}

impl QuantizedMatrix {
    /// Converts row-major `w` (`n * k` values).
    pub fn new(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Result<Self, Error> {
        if w.len() != n * k {
            return Err(Error::Shape { op: "quantize", detail: format!("{} values for a [{n}, {k}] matrix", w.len()) });
        }
        let stride = format.row_stride(k);
        let per = format.values_per_word();
        let mut words = vec![0u32; n * stride / per];
        let mut scales = Vec::new();
        for (r, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let base = r * stride;
            match format {
                WeightFormat::F32 => {
                    for (c, v) in row.iter().enumerate() {
                        words[base + c] = v.to_bits();
                    }
                }
                WeightFormat::F16 => {
                    for (c, v) in row.iter().enumerate() {
                        let i = base + c;
                        words[i / 2] |= u32::from(f16::from_f32(*v).to_bits()) << (16 * (i % 2));
                    }
                }
                WeightFormat::Q8 | WeightFormat::Q4 => {
                    let (qmax, bits) = if format == WeightFormat::Q8 { (127.0f32, 8) } else { (7.0, 4) };
                    for b in 0..stride / BLOCK {
                        let vals = row.get(b * BLOCK..((b + 1) * BLOCK).min(k)).unwrap_or(&[]);
                        let amax = vals.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let scale = if amax > 0.0 { amax / qmax } else { 0.0 };
                        scales.push(scale);
                        for (j, v) in vals.iter().enumerate() {
                            let q = if scale > 0.0 { (v / scale).round().clamp(-qmax, qmax) as i32 } else { 0 };
                            let code = if bits == 8 { (q as u32) & 0xff } else { (q + 8) as u32 & 0xf };
                            let i = base + b * BLOCK + j;
                            words[i / per] |= code << (bits * (i % per));
                        }
                    }
                }
            }
        }
        Ok(Self { format, n, k, stride, words, scales })
    }

    /// The values the shader reads, row-major `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.format.values_per_word();
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for c in 0..self.k {
                let i = r * self.stride + c;
                let word = self.words[i / per];
                let v = match self.format {
                    WeightFormat::F32 => f32::from_bits(word),
                    WeightFormat::F16 => f16::from_bits((word >> (16 * (i % 2))) as u16).to_f32(),
                    WeightFormat::Q8 => {
                        let q = ((word >> (8 * (i % 4))) & 0xff) as u8 as i8;
                        f32::from(q) * self.scales[i / BLOCK]
                    }
                    WeightFormat::Q4 => {
                        let q = ((word >> (4 * (i % 8))) & 0xf) as i32 - 8;
                        q as f32 * self.scales[i / BLOCK]
                    }
                };
                out.push(v);
            }
        }
        out
    }

    /// Rows `start..start + len` as a matrix of their own (for splitting a
    /// weight over several buffers).
    pub fn rows(&self, start: usize, len: usize) -> Self {
        let per = self.format.values_per_word();
        let w0 = start * self.stride / per;
        let w1 = (start + len) * self.stride / per;
        let scales = if self.scales.is_empty() {
            Vec::new()
        } else {
            self.scales[start * self.stride / BLOCK..(start + len) * self.stride / BLOCK].to_vec()
        };
        Self { format: self.format, n: len, k: self.k, stride: self.stride, words: self.words[w0..w1].to_vec(), scales }
    }

    /// Bytes of the words (without scales).
    pub fn word_bytes(&self) -> u64 {
        4 * self.words.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, k: usize) -> Vec<f32> {
        (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 3) as f32)).collect()
    }

    #[test]
    fn f32_roundtrips_exactly_and_f16_to_half_precision() -> Result<(), Error> {
        let w = sample(5, 13);
        assert_eq!(QuantizedMatrix::new(&w, 5, 13, WeightFormat::F32)?.dequantize(), w);
        let h = QuantizedMatrix::new(&w, 5, 13, WeightFormat::F16)?.dequantize();
        for (a, b) in w.iter().zip(&h) {
            assert_eq!(*b, f16::from_f32(*a).to_f32());
        }
        Ok(())
    }

    /// Symmetric block quantisation errs by at most half a step per value.
    #[test]
    fn block_quantization_error_is_within_half_a_step() -> Result<(), Error> {
        let (n, k) = (4, 70); // 70: a partial last block
        let w = sample(n, k);
        for (format, qmax) in [(WeightFormat::Q8, 127.0f32), (WeightFormat::Q4, 7.0)] {
            let q = QuantizedMatrix::new(&w, n, k, format)?;
            assert_eq!(q.stride, 96);
            assert_eq!(q.scales.len(), n * 3);
            let d = q.dequantize();
            for r in 0..n {
                for c in 0..k {
                    let b = c / BLOCK;
                    let block = &w[r * k + b * BLOCK..r * k + ((b + 1) * BLOCK).min(k)];
                    let step = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / qmax;
                    let err = (d[r * k + c] - w[r * k + c]).abs();
                    assert!(err <= step / 2.0 + 1e-6, "{format} r{r} c{c}: err {err} > half step {step}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn sizes_and_row_splits_agree() -> Result<(), Error> {
        let w = sample(6, 64);
        for f in WeightFormat::ALL {
            let q = QuantizedMatrix::new(&w, 6, 64, f)?;
            assert_eq!(q.word_bytes() + 4 * q.scales.len() as u64, f.bytes(6, 64), "{f}");
            let tail = q.rows(2, 4).dequantize();
            assert_eq!(tail, q.dequantize()[2 * 64..].to_vec(), "{f}");
        }
        // q4: 4 bits + a 32-bit scale per 32 values = 5 bits; q8: 9 bits; f32: 32.
        assert_eq!(WeightFormat::Q4.bytes(1152, 1152) * 32, WeightFormat::F32.bytes(1152, 1152) * 5);
        assert_eq!(WeightFormat::Q8.bytes(1152, 1152) * 32, WeightFormat::F32.bytes(1152, 1152) * 9);
        assert!("q5".parse::<WeightFormat>().is_err());
        Ok(())
    }
}
