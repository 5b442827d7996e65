//! The GGUF container (llama.cpp's format, as ComfyUI-GGUF and city96's Flux
//! quantizations use it): header, metadata, and where each tensor's bytes lie.
//!
//! Read from a byte slice, nothing executed, every count and offset checked
//! against the buffer (a malformed file is an error, never a panic or a huge
//! allocation). Versions 2 and 3, little-endian. Shapes come out in PyTorch
//! order (GGUF lists the innermost dimension first); ComfyUI-GGUF's
//! `comfy.gguf.orig_shape.<name>` metadata, where present, replaces a
//! tensor's shape as ComfyUI-GGUF's loader does. Dequantization is
//! [`super::ggml`]'s.

use std::collections::BTreeMap;
use std::ops::Range;

use super::ggml::GgmlType;

/// `GGUF` as a little-endian u32 at the start of the file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The alignment of the tensor data when `general.alignment` does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Where ComfyUI-GGUF records a tensor's shape before it was reshaped to quantize.
const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// A metadata value (GGUF's value types, integers widened).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// PyTorch order: blocks run along the last dimension.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Its bytes in the file.
    pub range: Range<usize>,
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
}

impl GgufFile {
    /// `general.architecture` (`flux`, `t5`, ...), where the file says.
    pub fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(MetaValue::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Parses the header of a GGUF file held in `bytes` (reads no tensor data).
pub fn parse(bytes: &[u8]) -> Result<GgufFile, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err("it does not start with `GGUF`".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        let hint = if version.swap_bytes() <= 3 { " (a big-endian file: not supported)" } else { "" };
        return Err(format!("GGUF version {version} is not supported (2 and 3 are){hint}"));
    }
    let n_tensors = r.count("tensor count", 8 + 4 + 8 + 4 + 8)?;
    let n_kv = r.count("metadata count", 8 + 4)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
        metadata.insert(key, value);
    }
    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        infos.push(r.tensor_info()?);
    }
    let alignment = match metadata.get("general.alignment") {
        Some(MetaValue::UInt(a)) if a.is_power_of_two() => *a,
        Some(other) => return Err(format!("`general.alignment` is {other:?}, not a power of two")),
        None => DEFAULT_ALIGNMENT,
    };
    let data_start = (r.at as u64).div_ceil(alignment) * alignment;
    let tensors =
        infos.into_iter().map(|info| info.locate(&metadata, data_start, bytes.len())).collect::<Result<Vec<_>, _>>()?;
    Ok(GgufFile { version, metadata, tensors })
}

/// A tensor info as stored, before it is placed in the file.
struct RawInfo {
    name: String,
    /// GGUF order: innermost first.
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

impl RawInfo {
    fn locate(self, metadata: &BTreeMap<String, MetaValue>, data_start: u64, len: usize) -> Result<GgufTensor, String> {
        let name = self.name;
        let err = |e: String| format!("tensor `{name}`: {e}");
        let ty = GgmlType::from_id(self.ty).map_err(err)?;
        let stored: Vec<usize> = self
            .dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).map_err(|_| err(format!("dimension {d} too large"))))
            .collect::<Result<_, _>>()?;
        let nbytes = ty.nbytes(&stored).map_err(err)?;
        let start = data_start.checked_add(self.offset).and_then(|s| usize::try_from(s).ok());
        let range = start.and_then(|s| s.checked_add(nbytes).map(|e| s..e)).filter(|r| r.end <= len);
        let range =
            range.ok_or_else(|| err(format!("its {nbytes} bytes at offset {} lie past the end", self.offset)))?;
        let shape = match metadata.get(&format!("{ORIG_SHAPE_PREFIX}{name}")) {
            None => stored,
            Some(v) => orig_shape(v, &stored).map_err(err)?,
        };
        Ok(GgufTensor { name, shape, ty, range })
    }
}

/// ComfyUI-GGUF's original shape of a reshaped tensor: an integer array with the same element count.
fn orig_shape(v: &MetaValue, stored: &[usize]) -> Result<Vec<usize>, String> {
    let dims = match v {
        MetaValue::Array(items) => items
            .iter()
            .map(|d| match d {
                MetaValue::Int(d) => usize::try_from(*d).ok(),
                MetaValue::UInt(d) => usize::try_from(*d).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>(),
        _ => None,
    };
    match dims {
        Some(d) if d.iter().product::<usize>() == stored.iter().product::<usize>() => Ok(d),
        _ => Err(format!("its original-shape metadata {v:?} does not fit its {stored:?} elements")),
    }
}

/// Arrays nested deeper than this are refused (GGUF files use one level).
const MAX_NESTING: u32 = 4;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("the header ends early (at byte {} of {})", self.at, self.bytes.len()))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of records of at least `min_size` bytes each: more than the
    /// bytes left could hold is an error (before anything is allocated).
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) / min_size.max(1);
        usize::try_from(n).ok().filter(|&n| n <= left).ok_or_else(|| format!("{what} {n} does not fit in the file"))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.count("string length", 1)?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::UInt(self.array::<1>()?[0].into()),
            1 => MetaValue::Int((self.array::<1>()?[0] as i8).into()),
            2 => MetaValue::UInt(u16::from_le_bytes(self.array()?).into()),
            3 => MetaValue::Int(i16::from_le_bytes(self.array()?).into()),
            4 => MetaValue::UInt(self.u32()?.into()),
            5 => MetaValue::Int(i32::from_le_bytes(self.array()?).into()),
            6 => MetaValue::Float(f32::from_le_bytes(self.array()?).into()),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 if depth < MAX_NESTING => {
                let elem = self.u32()?;
                let n = self.count("array length", 1)?;
                let items = (0..n).map(|_| self.value(elem, depth + 1)).collect::<Result<_, _>>()?;
                MetaValue::Array(items)
            }
            9 => return Err("arrays nested too deep".into()),
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    fn tensor_info(&mut self) -> Result<RawInfo, String> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims > 8 {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let dims = (0..n_dims).map(|_| self.u64()).collect::<Result<Vec<_>, _>>()?;
        let ty = self.u32()?;
        let offset = self.u64()?;
        Ok(RawInfo { name, dims, ty, offset })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GGUF v3 file in memory: metadata as (key, type id, value bytes), tensors as (name, GGUF dims, type, data).
    pub(crate) fn write(meta: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        let mut b = MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        for (k, ty, v) in meta {
            s(&mut b, k);
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        for (_, _, _, data) in tensors {
            b.resize(b.len().div_ceil(32) * 32, 0);
            b.extend(data);
        }
        b
    }

    pub(crate) fn str_value(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn header_tensors_and_metadata() {
        let w: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let q = vec![0u8; 2 * 34];
        // An array (type 9) of three i32 (type 5): [2, 1, 32].
        let mut shape_meta = 5u32.to_le_bytes().to_vec();
        shape_meta.extend(3u64.to_le_bytes());
        [2i32, 1, 32].iter().for_each(|d| shape_meta.extend(d.to_le_bytes()));
        let bytes = write(
            &[("general.architecture", 8, str_value("flux")), ("comfy.gguf.orig_shape.q", 9, shape_meta)],
            &[("w", vec![3, 2], 0, w), ("q", vec![32, 2], 8, q)],
        );
        let f = parse(&bytes).unwrap();
        assert_eq!((f.version, f.architecture()), (3, Some("flux")));
        assert_eq!(f.tensors[0].shape, [2, 3]);
        assert_eq!(f.tensors[0].range.len(), 24);
        assert_eq!(f.tensors[0].range.start % 32, 0);
        assert_eq!((f.tensors[1].shape.clone(), f.tensors[1].ty), (vec![2, 1, 32], GgmlType::Q8_0));
        assert_eq!(f.tensors[1].range.start, f.tensors[0].range.start + 32);
    }

    #[test]
    fn malformed_headers_are_errors_not_panics() {
        let good = write(&[], &[("w", vec![4], 0, vec![0; 16])]);
        for cut in 0..good.len() - 16 {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(parse(&huge).unwrap_err().contains("tensor count"));
        let mut v1 = good.clone();
        v1[4] = 1;
        assert!(parse(&v1).unwrap_err().contains("version 1"));
        let past = write(&[], &[("w", vec![4], 0, vec![0; 16])]);
        assert!(parse(&past[..past.len() - 1]).unwrap_err().contains("past the end"));
        let odd = write(&[], &[("w", vec![40], 8, vec![0; 34])]);
        assert!(parse(&odd).unwrap_err().contains("not whole Q8_0 blocks"));
        let iq = write(&[], &[("w", vec![32], 23, vec![0; 34])]);
        let e = parse(&iq).unwrap_err();
        assert!(e.contains("tensor `w`") && e.contains("IQ4_XS"), "{e}");
    }
}
