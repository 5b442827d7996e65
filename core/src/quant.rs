//! Weight formats for linear layers and their host-side conversion: what the
//! WebGPU matmul reads (`ipaflux-gpu`), and what a pre-quantized checkpoint
//! stores (see [`crate::weights`] and `ipaflux quantize`).
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

use candle_core::{DType, Tensor};
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

    /// Values packed in one `u32` word.
    pub fn values_per_word(self) -> usize {
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
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::Unsupported(format!("unknown weight format `{s}`; expected f32, f16, q8 or q4")))
    }
}

/// A weight `[n, k]` in one [`WeightFormat`], ready to upload.
#[derive(Clone, PartialEq)]
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

impl fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuantizedMatrix({} [{}, {}])", self.format, self.n, self.k)
    }
}

impl QuantizedMatrix {
    /// Converts row-major `w` (`n * k` values).
    pub fn new(w: &[f32], n: usize, k: usize, format: WeightFormat) -> Result<Self, Error> {
        if w.len() != n * k {
            return Err(Error::Shape(format!("quantize: {} values for a [{n}, {k}] matrix", w.len())));
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

// ---------------------------------------------------------------------------
// Pre-quantized checkpoints (`ipaflux quantize`)
// ---------------------------------------------------------------------------

/// Safetensors metadata key a pre-quantized file carries (value: the format name).
pub const METADATA_KEY: &str = "ipaflux.quantized";

/// The two tensors a q8/q4 weight `name` of shape `[n, k]` is stored as in a
/// pre-quantized safetensors file:
/// - `{name}.{format}`: `U32 [n, stride / values_per_word]`, the words exactly
///   as [`QuantizedMatrix::words`] (little-endian, rows padded to the stride);
/// - `{name}.{format}_scales`: `F32 [n, stride / BLOCK]`, one scale per block.
///
/// f16 and f32 weights need no packing: they are ordinary `F16`/`F32` tensors.
pub fn packed_names(name: &str, format: WeightFormat) -> (String, String) {
    (format!("{name}.{}", format.name()), format!("{name}.{}_scales", format.name()))
}

/// The formats stored packed (two tensors per weight).
pub const PACKED_FORMATS: [WeightFormat; 2] = [WeightFormat::Q8, WeightFormat::Q4];

/// Shapes of the words and scales tensors of a packed `[n, k]` weight.
pub fn packed_shapes(format: WeightFormat, n: usize, k: usize) -> [Vec<usize>; 2] {
    let stride = format.row_stride(k);
    [vec![n, stride / format.values_per_word()], vec![n, stride / BLOCK]]
}

/// Finds the packed form of weight `name [n, k]` through `lookup` (a tensor by
/// name, `Ok(None)` where there is none): `Ok(None)` if it is not stored
/// packed, an error if it is stored packed but malformed (a tensor missing,
/// wrong shape or dtype) or a lookup fails.
pub fn find_packed(
    lookup: impl Fn(&str) -> Result<Option<Tensor>, Error>,
    name: &str,
    n: usize,
    k: usize,
) -> Result<Option<QuantizedMatrix>, Error> {
    for format in PACKED_FORMATS {
        let (wname, sname) = packed_names(name, format);
        let Some(words) = lookup(&wname)? else { continue };
        let bad = |what: String| Error::Shape(format!("pre-quantized weight `{name}` ([{n}, {k}], {format}): {what}"));
        let scales = lookup(&sname)?.ok_or_else(|| bad(format!("`{sname}` is missing")))?;
        let [wshape, sshape] = packed_shapes(format, n, k);
        for (t, tname, shape, dtype) in [(&words, &wname, &wshape, DType::U32), (&scales, &sname, &sshape, DType::F32)]
        {
            if t.dims() != shape.as_slice() || t.dtype() != dtype {
                return Err(bad(format!("`{tname}` is {:?} {:?}, expected {dtype:?} {shape:?}", t.dtype(), t.dims())));
            }
        }
        return Ok(Some(QuantizedMatrix {
            format,
            n,
            k,
            stride: format.row_stride(k),
            words: words.flatten_all()?.to_vec1::<u32>()?,
            scales: scales.flatten_all()?.to_vec1::<f32>()?,
        }));
    }
    Ok(None)
}

/// The packed format a store's tensors use, if any (`None`: an ordinary checkpoint).
pub fn stored_format<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<WeightFormat> {
    names.into_iter().find_map(|n| PACKED_FORMATS.into_iter().find(|f| n.ends_with(&format!(".{}_scales", f.name()))))
}

/// A tensor ready for `safetensors::serialize`.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A CPU tensor as stored bytes (f32, f16, bf16 and integer types as they
/// are; anything else widened to f32).
fn raw_tensor(t: &Tensor) -> Result<RawTensor, Error> {
    let flat = t.flatten_all()?;
    let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
        DType::F16 => (safetensors::Dtype::F16, flat.to_vec1::<f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => {
            (safetensors::Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
        DType::U32 => (safetensors::Dtype::U32, flat.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::I64 => (safetensors::Dtype::I64, flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        _ => (
            safetensors::Dtype::F32,
            flat.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    };
    Ok(RawTensor { dtype, shape: t.dims().to_vec(), data })
}

fn raw_u32(words: &[u32], shape: Vec<usize>) -> RawTensor {
    RawTensor { dtype: safetensors::Dtype::U32, shape, data: words.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

fn raw_f32(values: &[f32], shape: Vec<usize>) -> RawTensor {
    RawTensor { dtype: safetensors::Dtype::F32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

/// Writes a pre-quantized safetensors file (as bytes) from `tensors`: each
/// `(name, tensor)` whose name is in `linear` (the model's linear weights,
/// `[out, in]`) is stored in `format` — q8/q4 packed as [`packed_names`], f16
/// and f32 as ordinary tensors of that dtype — and every other tensor as it
/// is. The metadata records the format under [`METADATA_KEY`].
///
/// Quantizing here and uploading the result gives exactly the GPU weights
/// that quantizing the original at upload gives (same [`QuantizedMatrix::new`]).
pub fn quantize_checkpoint<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    linear: &[String],
    format: WeightFormat,
    mut progress: impl FnMut(usize, &str),
) -> Result<Vec<u8>, Error> {
    let linear: std::collections::BTreeSet<&str> = linear.iter().map(String::as_str).collect();
    let mut out: Vec<(String, RawTensor)> = Vec::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        progress(i, name);
        let &[n, k] = t.dims() else {
            out.push((name.to_string(), raw_tensor(t)?));
            continue;
        };
        if !linear.contains(name) {
            out.push((name.to_string(), raw_tensor(t)?));
            continue;
        }
        match format {
            WeightFormat::F32 => out.push((name.to_string(), raw_tensor(&t.to_dtype(DType::F32)?)?)),
            WeightFormat::F16 => out.push((name.to_string(), raw_tensor(&t.to_dtype(DType::F16)?)?)),
            WeightFormat::Q8 | WeightFormat::Q4 => {
                let w = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let q = QuantizedMatrix::new(&w, n, k, format)?;
                let (wname, sname) = packed_names(name, format);
                let [wshape, sshape] = packed_shapes(format, n, k);
                out.push((wname, raw_u32(&q.words, wshape)));
                out.push((sname, raw_f32(&q.scales, sshape)));
            }
        }
    }
    let metadata: std::collections::HashMap<String, String> =
        [(METADATA_KEY.to_string(), format.name().to_string())].into_iter().collect();
    safetensors::serialize(out.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
        .map_err(|e| Error::Unsupported(format!("writing the quantized safetensors failed: {e}")))
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

    /// A pre-quantized file written by [`quantize_checkpoint`] reads back as
    /// the same matrices, validates against the model's shapes, and serves
    /// dequantized weights through the `VarBuilder`.
    #[test]
    fn quantized_checkpoints_round_trip() -> Result<(), Error> {
        use crate::weights::TensorStore;
        use candle_core::Device;
        let (n, k) = (6, 70);
        let w = sample(n, k);
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)?;
        let bias = Tensor::from_vec(vec![0.5f32; n], n, &Device::Cpu)?;
        let other = Tensor::from_vec(sample(3, 4), (3, 4), &Device::Cpu)?;
        let tensors = [("l.weight", &wt), ("l.bias", &bias), ("pos.weight", &other)];
        let expected: Vec<(String, Vec<usize>)> =
            vec![("l.weight".into(), vec![n, k]), ("l.bias".into(), vec![n]), ("pos.weight".into(), vec![3, 4])];
        for format in WeightFormat::ALL {
            let mut seen = 0;
            let bytes = quantize_checkpoint(tensors, &["l.weight".to_string()], format, |_, _| seen += 1)?;
            assert_eq!(seen, 3);
            let store = TensorStore::from_safetensors(&bytes, "q.safetensors")?;
            store.validate(&expected)?;
            let packed = PACKED_FORMATS.contains(&format);
            assert_eq!(store.quantized_format(), packed.then_some(format), "{format}");
            // Tensors that are not linear weights are stored as they were.
            assert_eq!(store.get("pos.weight")?.map(|t| t.to_vec2::<f32>()).transpose()?, Some(other.to_vec2()?));
            let want = QuantizedMatrix::new(&w, n, k, format)?;
            let found = find_packed(|name| Ok(store.get(name)?.cloned()), "l.weight", n, k)?;
            assert_eq!(found.as_ref(), packed.then_some(&want), "{format}");
            let vb = store.var_builder(DType::F32, &Device::Cpu);
            let got = vb.get((n, k), "l.weight")?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, want.dequantize(), "{format}: the CPU sees exactly the dequantized weight");
            assert!(vb.contains_tensor("l.weight"));
        }
        Ok(())
    }

    #[test]
    fn malformed_packed_weights_are_named() -> Result<(), Error> {
        use crate::weights::TensorStore;
        use candle_core::Device;
        let wt = Tensor::from_vec(sample(4, 64), (4, 64), &Device::Cpu)?;
        let bytes = quantize_checkpoint([("l.weight", &wt)], &["l.weight".to_string()], WeightFormat::Q8, |_, _| {})?;
        let store = TensorStore::from_safetensors(&bytes, "q.safetensors")?;
        // The model expects another shape: the packed tensor is reported, with its expected shape.
        let err = store.validate(&[("l.weight".into(), vec![4, 96])]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("l.weight.q8") && err.contains("[4, 24]"), "{err}");
        // Scales missing.
        let store = store.filter_rename(|n| (!n.ends_with("_scales")).then(|| n.to_string()));
        let err = store.validate(&[("l.weight".into(), vec![4, 64])]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("l.weight.q8_scales") && err.contains("missing"), "{err}");
        let err = find_packed(|name| Ok(store.get(name)?.cloned()), "l.weight", 4, 64).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("`l.weight.q8_scales` is missing"));
        Ok(())
    }
}
