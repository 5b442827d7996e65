//! Checkpoint parsing: named tensors from safetensors bytes, a PyTorch zip
//! pickle or a GGUF file, and validation of those names and shapes against a
//! model.
//!
//! Everything here works on byte slices the caller provides (a native caller
//! memory-maps files; the browser passes fetched buffers). No file IO.
//!
//! A store made from [`SharedBytes`] (`from_safetensors_shared`,
//! `from_torch_zip_shared`: a memory-mapped file) keeps referring to them:
//! each tensor is read from the bytes when it is used, not when the store is
//! made. A model built through [`TensorStore::var_builder`] reads each
//! tensor once, converts it and moves it to its device, so a CUDA load never
//! holds a host copy of the whole checkpoint (T5-XXL: 9.5 GB).
//! [`TensorStore::get`] keeps what it read in the store;
//! [`TensorStore::shape`] reads nothing.
//!
//! The bytes a model takes once loaded are known before it loads
//! ([`loaded_bytes`]: elements × the dtype it loads in, from the names and
//! shapes it fetches); [`TensorStore::fetched_bytes`] counts what its var
//! builders actually handed out, so tests can hold the two equal.
//!
//! GGUF's quantized tensors ([`ggml`]) read as f32: each is dequantized when
//! it is read. [`TensorStore::take_quantized`] hands one over as its GGML
//! blocks instead, for a layer that keeps them quantized.

pub mod ggml;
pub mod gguf;
mod pickle;
mod zip;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, TensorProblem};
use crate::quant;
use pickle::{PickleError, TensorRef, Value};

/// Bytes a store may keep referring to instead of copying (a memory-mapped
/// checkpoint; any owned buffer).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Named tensors on the CPU, as stored (dtype unchanged), with the name of
/// where they came from for error messages.
#[derive(Debug, Clone, Default)]
pub struct TensorStore {
    pub source_name: String,
    tensors: BTreeMap<String, Entry>,
    /// Bytes handed out by this store's var builders (shared by its clones).
    fetched: Arc<AtomicU64>,
}

/// Bytes `expected` (names and shapes a model fetches) take loaded in `dtype`:
/// the figure a memory registry should hold for the loaded model.
pub fn loaded_bytes(expected: &[(String, Vec<usize>)], dtype: DType) -> u64 {
    let elements: usize = expected.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    (elements * dtype.size_in_bytes()) as u64
}

/// One tensor: read, or where to read it from.
#[derive(Clone)]
struct Entry {
    /// The dtype it reads as (f32 for a GGML-quantized one).
    dtype: DType,
    shape: Vec<usize>,
    /// Its bytes in a shared buffer (`None`: made in memory, `read` is set).
    mapped: Option<(SharedBytes, std::ops::Range<usize>)>,
    /// GGML blocks to dequantize when read (a GGUF file's quantized tensor).
    ggml: Option<ggml::GgmlType>,
    /// The tensor, once read (and kept) by [`TensorStore::get`].
    read: OnceLock<Tensor>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("mapped", &self.mapped.as_ref().map(|(_, r)| r))
            .field("ggml", &self.ggml.map(ggml::GgmlType::name))
            .field("read", &self.read.get().is_some())
            .finish()
    }
}

impl Entry {
    fn of(t: Tensor) -> Self {
        let read = OnceLock::new();
        let (dtype, shape) = (t.dtype(), t.dims().to_vec());
        // A fresh cell: the set cannot fail.
        let _ = read.set(t);
        Self { dtype, shape, mapped: None, ggml: None, read }
    }

    /// A tensor to read from `bytes[range]` when used.
    fn mapped(dtype: DType, shape: Vec<usize>, bytes: SharedBytes, range: std::ops::Range<usize>) -> Self {
        Self { dtype, shape, mapped: Some((bytes, range)), ggml: None, read: OnceLock::new() }
    }

    /// The tensor, from the cell or newly read from the shared bytes (not kept).
    fn tensor(&self) -> candle_core::Result<Tensor> {
        if let Some(t) = self.read.get() {
            return Ok(t.clone());
        }
        match &self.mapped {
            Some((bytes, range)) => {
                let data = (*bytes).as_ref().as_ref().get(range.clone()).ok_or_else(|| {
                    candle_core::Error::Msg(format!("tensor bytes {range:?} past the end of the shared buffer"))
                })?;
                match self.ggml {
                    Some(ty) => {
                        let values = ty.dequantize(data, self.elements()).map_err(candle_core::Error::Msg)?;
                        Tensor::from_vec(values, self.shape.as_slice(), &Device::Cpu)
                    }
                    None => Tensor::from_raw_buffer(data, self.dtype, &self.shape, &Device::Cpu),
                }
            }
            None => Err(candle_core::Error::Msg("tensor neither read nor mapped".into())),
        }
    }

    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes as stored (a quantized tensor's blocks).
    fn nbytes(&self) -> usize {
        match (&self.mapped, self.ggml) {
            (Some((_, range)), Some(_)) => range.len(),
            _ => self.elements() * self.dtype.size_in_bytes(),
        }
    }

    /// Bytes it takes in memory once read.
    fn read_nbytes(&self) -> usize {
        self.elements() * self.dtype.size_in_bytes()
    }
}

impl TensorStore {
    pub fn new(source_name: impl Into<String>) -> Self {
        Self { source_name: source_name.into(), tensors: BTreeMap::new(), fetched: Arc::default() }
    }

    /// A store of tensors made in memory (names unique by construction).
    pub fn from_tensors(source_name: impl Into<String>, tensors: BTreeMap<String, Tensor>) -> Self {
        let tensors = tensors.into_iter().map(|(name, t)| (name, Entry::of(t))).collect();
        Self { source_name: source_name.into(), tensors, fetched: Arc::default() }
    }

    /// Parses one safetensors file (or one shard of a sharded checkpoint).
    pub fn from_safetensors(bytes: &[u8], source_name: &str) -> Result<Self> {
        let mut store = Self::new(source_name);
        store.add_safetensors(bytes, source_name)?;
        Ok(store)
    }

    /// Adds the tensors of one more shard, copied out of `bytes`; a name
    /// present twice is an error.
    pub fn add_safetensors(&mut self, bytes: &[u8], shard_name: &str) -> Result<()> {
        let fmt_err =
            |reason: String| Error::Format { source_name: shard_name.to_string(), format: "safetensors", reason };
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| fmt_err(describe_safetensors_error(&e)))?;
        for (name, view) in st.tensors() {
            let dtype = safetensors_dtype(view.dtype()).map_err(|d| fmt_err(format!("tensor `{name}` {d}")))?;
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                .map_err(|e| fmt_err(format!("tensor `{name}`: {e}")))?;
            self.insert_new(name, Entry::of(t), shard_name)?;
        }
        Ok(())
    }

    /// Parses one safetensors file kept in `bytes`: tensors are read from
    /// them when used (module docs).
    pub fn from_safetensors_shared(bytes: SharedBytes, source_name: &str) -> Result<Self> {
        let mut store = Self::new(source_name);
        store.add_safetensors_shared(bytes, source_name)?;
        Ok(store)
    }

    /// [`Self::add_safetensors`] without the copy: the store keeps `bytes`.
    pub fn add_safetensors_shared(&mut self, bytes: SharedBytes, shard_name: &str) -> Result<()> {
        let fmt_err =
            |reason: String| Error::Format { source_name: shard_name.to_string(), format: "safetensors", reason };
        let buf: &[u8] = (*bytes).as_ref();
        let st = safetensors::SafeTensors::deserialize(buf).map_err(|e| fmt_err(describe_safetensors_error(&e)))?;
        let base = buf.as_ptr() as usize;
        let mut entries = Vec::new();
        for (name, view) in st.tensors() {
            let dtype = safetensors_dtype(view.dtype()).map_err(|d| fmt_err(format!("tensor `{name}` {d}")))?;
            // `deserialize` checked that each tensor's bytes lie in the buffer and fit its shape.
            let start = view.data().as_ptr() as usize - base;
            let range = start..start + view.data().len();
            entries.push((name, Entry::mapped(dtype, view.shape().to_vec(), bytes.clone(), range)));
        }
        for (name, entry) in entries {
            self.insert_new(name, entry, shard_name)?;
        }
        Ok(())
    }

    /// Adds a tensor made in memory (random weights for benchmarks, tests);
    /// a name present twice is an error.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) -> Result<()> {
        let from = self.source_name.clone();
        self.insert_new(name.into(), Entry::of(t), &from)
    }

    fn insert_new(&mut self, name: String, t: Entry, from: &str) -> Result<()> {
        if self.tensors.contains_key(&name) {
            return Err(Error::Format {
                source_name: from.to_string(),
                format: "checkpoint",
                reason: format!("tensor `{name}` appears twice"),
            });
        }
        self.tensors.insert(name, t);
        Ok(())
    }

    /// Parses a PyTorch `torch.save` zip archive holding a (nested) dict of
    /// tensors without executing its pickle, copying each tensor out. Nested
    /// dict keys are joined with `.`: `{"image_proj": {"norm.weight": t}}`
    /// gives `image_proj.norm.weight`.
    pub fn from_torch_zip(bytes: &[u8], source_name: &str) -> Result<Self> {
        let mut store = Self::new(source_name);
        for (name, storage, tref) in torch_zip_tensors(bytes, source_name)? {
            let t = tensor_from_storage(&bytes[storage], &tref)
                .map_err(|r| torch_zip_err(source_name, format!("tensor `{name}`: {r}")))?;
            store.insert_new(name, Entry::of(t), source_name)?;
        }
        Ok(store)
    }

    /// [`Self::from_torch_zip`] keeping `bytes`: a tensor whose view is
    /// contiguous (as saved parameters are) is read when used; a strided one
    /// is gathered now.
    pub fn from_torch_zip_shared(bytes: SharedBytes, source_name: &str) -> Result<Self> {
        let buf: &[u8] = (*bytes).as_ref();
        let mut store = Self::new(source_name);
        for (name, storage, tref) in torch_zip_tensors(buf, source_name)? {
            let err = |r: String| torch_zip_err(source_name, format!("tensor `{name}`: {r}"));
            let entry = match view_bytes(storage.len(), &tref).map_err(err)? {
                Some(view) => Entry::mapped(
                    tref.dtype,
                    tref.shape.clone(),
                    bytes.clone(),
                    storage.start + view.start..storage.start + view.end,
                ),
                None => Entry::of(tensor_from_storage(&buf[storage], &tref).map_err(err)?),
            };
            store.insert_new(name, entry, source_name)?;
        }
        Ok(store)
    }

    /// Parses a GGUF file kept in `bytes` (ComfyUI-GGUF's and llama.cpp's
    /// format): tensors are read from them when used; quantized ones are
    /// dequantized to f32 then ([`ggml`]). Names are as stored (a Flux file
    /// from city96's converter has BFL's).
    pub fn from_gguf_shared(bytes: SharedBytes, source_name: &str) -> Result<Self> {
        let file = gguf::parse((*bytes).as_ref()).map_err(|reason| Error::Format {
            source_name: source_name.to_string(),
            format: "GGUF",
            reason,
        })?;
        let mut store = Self::new(source_name);
        for t in file.tensors {
            let dtype = match t.ty {
                ggml::GgmlType::F32 => Some(DType::F32),
                ggml::GgmlType::F16 => Some(DType::F16),
                ggml::GgmlType::BF16 => Some(DType::BF16),
                _ => None,
            };
            let mut entry = Entry::mapped(dtype.unwrap_or(DType::F32), t.shape, bytes.clone(), t.range);
            entry.ggml = dtype.is_none().then_some(t.ty);
            store.insert_new(t.name, entry, source_name)?;
        }
        Ok(store)
    }

    /// The GGML type a GGUF tensor is stored in (`None`: no such tensor, or not from a GGUF file).
    pub fn ggml_type(&self, name: &str) -> Option<ggml::GgmlType> {
        self.tensors.get(name).and_then(|e| e.ggml)
    }

    /// A tensor, read from the shared bytes on first use and kept in the
    /// store from then on (`Ok(None)` where there is no such tensor; an error
    /// where its bytes cannot be read). Use [`Self::shape`] or
    /// [`Self::contains`] where the values are not needed.
    pub fn get(&self, name: &str) -> Result<Option<&Tensor>> {
        let Some(entry) = self.tensors.get(name) else { return Ok(None) };
        if let Some(t) = entry.read.get() {
            return Ok(Some(t));
        }
        let t = entry.tensor().map_err(|e| self.unreadable(name, e))?;
        Ok(Some(entry.read.get_or_init(|| t)))
    }

    fn unreadable(&self, name: &str, e: candle_core::Error) -> Error {
        Error::TensorData { source_name: self.source_name.clone(), name: name.to_string(), reason: e.to_string() }
    }

    /// A tensor's shape as stored (reads no tensor data).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// A tensor's bytes as stored (a GGML-quantized one's blocks; reads no tensor data).
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        self.tensors.get(name).map(Entry::nbytes)
    }

    /// A tensor's dtype as stored, or as read for a GGML-quantized one (f32; reads no tensor data).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Bytes of the tensors read into host memory so far (kept by [`Self::get`] or made in memory).
    pub fn read_bytes(&self) -> usize {
        self.tensors.values().filter(|e| e.read.get().is_some()).map(Entry::read_nbytes).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Removes and returns a tensor (models that rearrange weights take them
    /// out as they go); one not read yet is read now (`Ok(None)`: no such
    /// tensor; an error where its bytes cannot be read).
    pub fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(entry) = self.tensors.remove(name) else { return Ok(None) };
        match entry.read.into_inner() {
            Some(t) => Ok(Some(t)),
            None => {
                let t = Entry { read: OnceLock::new(), ..entry }.tensor().map_err(|e| self.unreadable(name, e))?;
                Ok(Some(t))
            }
        }
    }

    /// Removes a GGML-quantized tensor and returns it as candle's quantized
    /// tensor on `device`, its blocks as stored (`Ok(None)`: no such tensor,
    /// or not a quantized one; [`Self::take`] reads those).
    pub fn take_quantized(&mut self, name: &str, device: &Device) -> Result<Option<QTensor>> {
        let Some(Entry { ggml: Some(ty), mapped: Some((bytes, range)), shape, .. }) = self.tensors.get(name) else {
            return Ok(None);
        };
        let data = (*bytes).as_ref().as_ref().get(range.clone()).ok_or_else(|| {
            self.unreadable(name, candle_core::Error::Msg(format!("bytes {range:?} past the end of the shared buffer")))
        })?;
        let q = ty.qtensor(data, shape, device).map_err(|e| self.unreadable(name, e))?;
        self.tensors.remove(name);
        Ok(Some(q))
    }

    /// Moves tensor `name` into `to` as `new_name`, unread if it was (a
    /// missing name or one `to` already holds is an error).
    pub fn move_to(&mut self, name: &str, to: &mut TensorStore, new_name: String) -> Result<()> {
        let entry = self.tensors.remove(name).ok_or_else(|| Error::Checkpoint {
            source_name: self.source_name.clone(),
            problems: vec![TensorProblem::Missing { name: name.to_string(), expected: vec![] }],
        })?;
        let from = self.source_name.clone();
        to.insert_new(new_name, entry, &from)
    }

    /// Removes `name` and adds its rows to `to` as consecutive pieces, each
    /// `(new name, rows)` (a fused QKV split into query, key and value). A
    /// dense tensor still in the shared bytes stays there: each piece is a
    /// byte range of it, read when used; one read already is cut now.
    pub fn split_rows_to(&mut self, name: &str, to: &mut TensorStore, pieces: &[(String, usize)]) -> Result<()> {
        let from = self.source_name.clone();
        let missing = || Error::Checkpoint {
            source_name: from.clone(),
            problems: vec![TensorProblem::Missing { name: name.to_string(), expected: vec![] }],
        };
        let entry = self.tensors.remove(name).ok_or_else(missing)?;
        let total: usize = pieces.iter().map(|(_, rows)| rows).sum();
        let Some((&first, rest)) = entry.shape.split_first() else { return Err(missing()) };
        if first != total {
            return Err(Error::Checkpoint {
                source_name: from.clone(),
                problems: vec![TensorProblem::WrongShape {
                    name: name.to_string(),
                    expected: [&[total][..], rest].concat(),
                    found: entry.shape.clone(),
                }],
            });
        }
        let row_bytes = rest.iter().product::<usize>() * entry.dtype.size_in_bytes();
        let mut row = 0;
        for (new_name, rows) in pieces {
            let shape = [&[*rows][..], rest].concat();
            let piece = match (&entry.mapped, entry.ggml, entry.read.get()) {
                (Some((bytes, range)), None, None) => {
                    let start = range.start + row * row_bytes;
                    Entry::mapped(entry.dtype, shape, bytes.clone(), start..start + rows * row_bytes)
                }
                _ => {
                    let t = entry.tensor().map_err(|e| self.unreadable(name, e))?;
                    Entry::of(t.narrow(0, row, *rows)?.contiguous()?)
                }
            };
            to.insert_new(new_name.clone(), piece, &from)?;
            row += rows;
        }
        Ok(())
    }

    /// Total bytes of all tensors as stored.
    pub fn nbytes(&self) -> usize {
        self.tensors.values().map(Entry::nbytes).sum()
    }

    /// Bytes of the floating-point tensors `keep` accepts once read in
    /// `dtype` (a GGML-quantized one counts as dequantized): what a model
    /// that fetches each of them in `dtype` takes. Integer buffers (position
    /// ids some checkpoints carry) are not weights and do not count.
    pub fn bytes_as(&self, dtype: DType, keep: impl Fn(&str) -> bool) -> u64 {
        let counted = self.tensors.iter().filter(|(n, e)| keep(n) && e.dtype.is_float());
        let elements: usize = counted.map(|(_, e)| e.elements()).sum();
        (elements * dtype.size_in_bytes()) as u64
    }

    /// Bytes the var builders made from this store (and its clones) have
    /// handed out so far, in the dtype each asked for: what the models built
    /// from it hold.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Keeps only tensors for which `rename` returns a new name, renamed.
    pub fn filter_rename(self, rename: impl Fn(&str) -> Option<String>) -> Self {
        let tensors = self.tensors.into_iter().filter_map(|(k, v)| rename(&k).map(|k| (k, v))).collect();
        Self { source_name: self.source_name, tensors, fetched: self.fetched }
    }

    /// Compares the stored tensors with what a model expects and reports every
    /// missing, unexpected or mis-shaped tensor in one [`Error::Checkpoint`].
    pub fn validate(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        let mut problems = Vec::new();
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for (name, shape) in expected {
            seen.insert(name.clone());
            match self.tensors.get(name) {
                None => match self.packed_problem(name, shape) {
                    Some(Ok(stored)) => seen.extend(stored),
                    Some(Err(problem)) => problems.push(problem),
                    None => problems.push(TensorProblem::Missing { name: name.clone(), expected: shape.clone() }),
                },
                Some(t) if t.shape != *shape => problems.push(TensorProblem::WrongShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        for (name, t) in &self.tensors {
            if !seen.contains(name) {
                problems.push(TensorProblem::Unexpected { name: name.clone(), shape: t.shape.clone() });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint { source_name: self.source_name.clone(), problems })
        }
    }

    /// For an expected 2-D weight stored pre-quantized ([`crate::quant`]):
    /// `Some(Ok(names of its two tensors))` when they fit `shape`,
    /// `Some(Err(problem))` when they do not, `None` when not stored packed.
    fn packed_problem(&self, name: &str, shape: &[usize]) -> Option<std::result::Result<[String; 2], TensorProblem>> {
        let &[n, k] = shape else { return None };
        quant::PACKED_FORMATS.into_iter().find_map(|format| {
            let (wname, sname) = quant::packed_names(name, format);
            let words = self.shape(&wname)?;
            let [wshape, sshape] = quant::packed_shapes(format, n, k);
            let wrong = |tname: &str, expected: &[usize], found: Option<&[usize]>| {
                Err(match found {
                    None => TensorProblem::Missing { name: tname.to_string(), expected: expected.to_vec() },
                    Some(f) => TensorProblem::WrongShape {
                        name: tname.to_string(),
                        expected: expected.to_vec(),
                        found: f.to_vec(),
                    },
                })
            };
            Some(if words != wshape.as_slice() {
                wrong(&wname, &wshape, Some(words))
            } else {
                match self.shape(&sname) {
                    Some(s) if s == sshape.as_slice() => Ok([wname, sname]),
                    found => wrong(&sname, &sshape, found),
                }
            })
        })
    }

    /// The packed format of a pre-quantized store (`ipaflux quantize`), if it is one.
    pub fn quantized_format(&self) -> Option<quant::WeightFormat> {
        quant::stored_format(self.names())
    }

    /// A candle `VarBuilder` over these tensors, converting to `dtype` on
    /// `device` as each is fetched. Pre-quantized (q8/q4) weights are
    /// dequantized as they are fetched, one at a time; their packed tensors
    /// stay reachable by name (`get_unchecked`) for backends that use them as stored.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        let backend = StoreBackend { tensors: self.tensors.clone(), fetched: self.fetched.clone() };
        candle_nn::VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }
}

/// [`TensorStore::var_builder`]'s backend: dense tensors as stored (each
/// read when fetched and not kept here), packed weights dequantized on demand.
struct StoreBackend {
    tensors: BTreeMap<String, Entry>,
    fetched: Arc<AtomicU64>,
}

impl StoreBackend {
    fn lookup(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        self.tensors.get(name).map(Entry::tensor).transpose()
    }

    /// `t` as handed out, counted.
    fn hand_out(&self, t: Tensor) -> Tensor {
        self.fetched.fetch_add((t.elem_count() * t.dtype().size_in_bytes()) as u64, Ordering::Relaxed);
        t
    }
}

impl candle_nn::var_builder::SimpleBackend for StoreBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match (self.tensors.get(name), s.dims()) {
            (Some(e), _) => e.tensor()?,
            (None, &[n, k]) => match quant::find_packed(|n| Ok(self.lookup(n)?), name, n, k) {
                Ok(Some(q)) => Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?,
                Ok(None) => return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }),
                Err(e) => return Err(candle_core::Error::Msg(e.to_string())),
            },
            (None, _) => return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }),
        };
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(self.hand_out(t.to_device(dev)?.to_dtype(dtype)?))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.lookup(name)?.ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        Ok(self.hand_out(t.to_device(dev)?.to_dtype(dtype)?))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || quant::PACKED_FORMATS.into_iter().any(|f| self.tensors.contains_key(&quant::packed_names(name, f).0))
    }
}

/// Lists the distinct shard file names of a `model.safetensors.index.json`, in order of first use.
pub fn shards_from_index_json(json: &str, source_name: &str) -> Result<Vec<String>> {
    let err =
        |reason: String| Error::Format { source_name: source_name.to_string(), format: "safetensors index", reason };
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| err(e.to_string()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| err("no `weight_map` object".into()))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file.as_str().ok_or_else(|| err("a weight_map value is not a file name".into()))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(err(format!("shard name `{file}` is not a plain file name")));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// Our dtype for a safetensors one (the error: a description of one we do not take).
fn safetensors_dtype(d: safetensors::Dtype) -> std::result::Result<DType, String> {
    Ok(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::U32 => DType::U32,
        // fp8 checkpoints (e.g. `flux1-dev-fp8`): kept as stored, upcast where used.
        safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
        other => return Err(format!("has unsupported dtype {other:?}")),
    })
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::MetadataIncompleteBuffer | E::InvalidHeaderLength => {
            format!("the file is truncated or not safetensors ({e:?})")
        }
        other => format!("{other:?}"),
    }
}

fn flatten(prefix: &str, v: Value, out: &mut Vec<(String, TensorRef)>) -> Result<(), String> {
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s,
                    Value::Int(i) => i.to_string(),
                    other => return Err(format!("dict key {other:?} is not a string")),
                };
                let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                flatten(&name, v, out)?;
            }
            Ok(())
        }
        Value::Tensor(t) => {
            out.push((prefix.to_string(), t));
            Ok(())
        }
        // Non-tensor leaves (version numbers, metadata) carry no weights.
        Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_) => Ok(()),
        other => Err(format!("`{prefix}` holds {other:?}, which is not a tensor or dict")),
    }
}

/// Builds a contiguous tensor from a storage blob and a (possibly strided) view of it.
fn torch_zip_err(source_name: &str, reason: String) -> Error {
    Error::Format { source_name: source_name.to_string(), format: "PyTorch zip checkpoint", reason }
}

/// The tensors of a `torch.save` zip: each name, the byte range of its
/// storage in `bytes`, and its view of that storage (pickle run restricted).
fn torch_zip_tensors(bytes: &[u8], source_name: &str) -> Result<Vec<(String, std::ops::Range<usize>, TensorRef)>> {
    let fmt_err = |reason: String| torch_zip_err(source_name, reason);
    if bytes.len() >= 2 && bytes[0] == 0x80 {
        return Err(fmt_err(
            "this is a legacy (pre-1.6) PyTorch pickle, not a zip archive; re-save it with torch.save".into(),
        ));
    }
    let entries = zip::read_entries(bytes).map_err(fmt_err)?;
    let (pkl_name, pkl) = entries
        .iter()
        .find(|(n, _)| n.ends_with("data.pkl"))
        .ok_or_else(|| fmt_err("no data.pkl entry in the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
        if bytes.get(order.offset..order.offset + order.len) == Some(b"big".as_slice()) {
            return Err(fmt_err("big-endian checkpoints are not supported".into()));
        }
    }
    let root = pickle::load(&bytes[pkl.offset..pkl.offset + pkl.len]).map_err(|e| match e {
        PickleError::Unsafe(global) => Error::UnsafePickle { source_name: source_name.to_string(), global },
        PickleError::Malformed(m) => fmt_err(format!("data.pkl: {m}")),
    })?;
    let mut flat = Vec::new();
    flatten("", root, &mut flat).map_err(fmt_err)?;
    flat.into_iter()
        .map(|(name, tref)| {
            let entry = entries.get(&format!("{prefix}data/{}", tref.storage_key)).ok_or_else(|| {
                fmt_err(format!("tensor `{name}`: storage {} missing from the archive", tref.storage_key))
            })?;
            Ok((name, entry.offset..entry.offset + entry.len, tref))
        })
        .collect()
}

/// Checks that view `t` lies within a storage of `storage_len` bytes; the
/// byte range it covers when it is contiguous (`None`: strided).
fn view_bytes(storage_len: usize, t: &TensorRef) -> Result<Option<std::ops::Range<usize>>, String> {
    let es = t.dtype.size_in_bytes();
    let n: usize = t.shape.iter().product();
    if t.stride.len() != t.shape.len() {
        return Err("stride and shape ranks differ".into());
    }
    // Highest element index the view touches must lie inside the storage.
    let last = t.offset + t.shape.iter().zip(&t.stride).map(|(d, s)| d.saturating_sub(1) * s).sum::<usize>();
    if n > 0 && (last + 1) * es > storage_len {
        return Err(format!(
            "view needs {} bytes but its storage has {} (truncated file?)",
            (last + 1) * es,
            storage_len
        ));
    }
    let contiguous = {
        let mut expect = 1;
        t.shape.iter().zip(&t.stride).rev().all(|(&d, &s)| {
            let ok = d <= 1 || s == expect;
            expect *= d;
            ok
        })
    };
    Ok(contiguous.then(|| t.offset * es..(t.offset + n) * es))
}

fn tensor_from_storage(storage: &[u8], t: &TensorRef) -> Result<Tensor, String> {
    let es = t.dtype.size_in_bytes();
    let n: usize = t.shape.iter().product();
    let bytes: std::borrow::Cow<[u8]> = if let Some(view) = view_bytes(storage.len(), t)? {
        std::borrow::Cow::Borrowed(&storage[view])
    } else {
        let mut out = Vec::with_capacity(n * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..n {
            let e = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[e * es..(e + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        std::borrow::Cow::Owned(out)
    };
    Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, &Device::Cpu).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_sizes_count_weights_in_the_dtype_they_load_in_and_fetches_are_metered() {
        let mut store = TensorStore::new("t");
        store.insert("w", Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        store.insert("ids", Tensor::zeros(5, DType::I64, &Device::Cpu).unwrap()).unwrap();
        // 12 f32 elements at 2 bytes; the integer buffer does not count.
        assert_eq!(store.bytes_as(DType::BF16, |_| true), 24);
        assert_eq!(store.bytes_as(DType::BF16, |n| n != "w"), 0);
        assert_eq!(loaded_bytes(&[("w".into(), vec![3, 4])], DType::F16), 24);
        let clone = store.clone();
        let vb = store.var_builder(DType::BF16, &Device::Cpu);
        vb.get((3, 4), "w").unwrap();
        assert_eq!(store.fetched_bytes(), 24);
        // A clone shares the meter; a failed fetch hands nothing out.
        assert!(clone.var_builder(DType::F32, &Device::Cpu).get((4, 3), "w").is_err());
        clone.var_builder(DType::F32, &Device::Cpu).get((3, 4), "w").unwrap();
        assert_eq!(store.fetched_bytes(), 24 + 48);
    }

    #[test]
    fn rows_split_into_pieces_stay_in_the_shared_bytes() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((6, 2)).unwrap();
        let bytes = safetensors::serialize([("qkv", &t)], None).unwrap();
        for shared in [true, false] {
            let mut store = if shared {
                TensorStore::from_safetensors_shared(Arc::new(bytes.clone()), "s").unwrap()
            } else {
                TensorStore::from_safetensors(&bytes, "s").unwrap()
            };
            let mut out = TensorStore::new("out");
            let pieces = [("q".to_string(), 1), ("k".to_string(), 2), ("v".to_string(), 3)];
            store.split_rows_to("qkv", &mut out, &pieces).unwrap();
            assert!(!store.contains("qkv"));
            assert_eq!(out.read_bytes(), if shared { 0 } else { 48 }, "nothing read from shared bytes");
            let rows = |n: &str| out.get(n).unwrap().unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows("q"), vec![vec![0.0, 1.0]]);
            assert_eq!(rows("k"), vec![vec![2.0, 3.0], vec![4.0, 5.0]]);
            assert_eq!(rows("v")[2], vec![10.0, 11.0]);
        }
        let mut store = TensorStore::from_safetensors(&bytes, "s").unwrap();
        let e = store.split_rows_to("qkv", &mut TensorStore::new("o"), &[("a".into(), 4)]).unwrap_err();
        assert!(e.to_string().contains("qkv"), "{e}");
    }

    #[test]
    fn index_json_lists_shards_once() {
        let json = r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors",
            "b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#;
        let shards = shards_from_index_json(json, "i").unwrap();
        assert_eq!(shards, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert!(shards_from_index_json(r#"{"weight_map":{"a":"../x"}}"#, "i").is_err());
    }

    #[test]
    fn strided_view_is_gathered() {
        // A 2x3 tensor stored transposed (3x2 storage), f32 values 0..6.
        let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t =
            TensorRef { storage_key: "0".into(), dtype: DType::F32, offset: 0, shape: vec![2, 3], stride: vec![1, 2] };
        let x = tensor_from_storage(&storage, &t).unwrap();
        assert_eq!(x.to_vec2::<f32>().unwrap(), vec![vec![0., 2., 4.], vec![1., 3., 5.]]);
        let too_far = TensorRef { offset: 1, ..t };
        assert!(tensor_from_storage(&storage, &too_far).is_err());
    }

    #[test]
    fn validation_lists_every_problem() {
        let mut s = TensorStore::new("ckpt");
        s.insert("a", Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        s.insert("extra", Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let err = s.validate(&[("a".into(), vec![2, 3]), ("b".into(), vec![4])]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3 problem(s)"), "{msg}");
        assert!(msg.contains("`a` has shape [2, 2], expected [2, 3]"), "{msg}");
        assert!(msg.contains("missing tensor `b`"), "{msg}");
        assert!(msg.contains("unexpected tensor `extra`"), "{msg}");
    }

    #[test]
    fn a_shared_store_reads_each_tensor_when_used() {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::from_vec(vec![1u8, 2, 3], 3, &Device::Cpu).unwrap();
        let bytes = safetensors::serialize([("a", &a), ("b", &b)], None).unwrap();
        let shared: SharedBytes = Arc::new(bytes);
        let mut store = TensorStore::from_safetensors_shared(shared.clone(), "s.safetensors").unwrap();
        // Made, sized and validated from the header alone.
        assert_eq!(store.read_bytes(), 0);
        assert_eq!(store.shape("a"), Some(&[2, 3][..]));
        assert_eq!(store.dtype("b"), Some(DType::U8));
        assert_eq!(store.nbytes(), 6 * 4 + 3);
        store.validate(&[("a".into(), vec![2, 3]), ("b".into(), vec![3])]).unwrap();
        assert!(store.validate(&[("a".into(), vec![3, 2]), ("b".into(), vec![3])]).is_err());
        assert_eq!(store.read_bytes(), 0);
        // A model's fetch reads the tensor and leaves nothing in the store.
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        assert_eq!(vb.get((2, 3), "a").unwrap().to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(store.read_bytes(), 0);
        // `get` keeps what it read; `take` hands the tensor over and forgets it.
        assert_eq!(store.get("a").unwrap().unwrap().to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(store.read_bytes(), 24);
        assert_eq!(store.take("b").unwrap().unwrap().to_vec1::<u8>().unwrap(), [1, 2, 3]);
        assert!(!store.contains("b") && store.take("b").unwrap().is_none());
        // The copying parser: the same tensors, all read up front.
        let copied = TensorStore::from_safetensors((*shared).as_ref(), "s.safetensors").unwrap();
        assert_eq!(copied.read_bytes(), copied.nbytes());
        assert_eq!(copied.get("b").unwrap().unwrap().to_vec1::<u8>().unwrap(), [1, 2, 3]);
    }

    #[test]
    fn a_gguf_store_reads_and_dequantizes_each_tensor_when_used() {
        use super::gguf::tests::{str_value, write};
        let w: Vec<u8> = (0..6).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
        // One Q8_0 row of 32: scale 0.25 (f16 0x3400), values -16..16.
        let mut q = vec![0x00, 0x34];
        q.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let bytes = write(
            &[("general.architecture", 8, str_value("flux"))],
            &[("w", vec![3, 2], 30, w), ("q", vec![32, 1], 8, q)],
        );
        let mut store = TensorStore::from_gguf_shared(Arc::new(bytes), "m.gguf").unwrap();
        assert_eq!(store.read_bytes(), 0);
        assert_eq!((store.dtype("w"), store.dtype("q")), (Some(DType::BF16), Some(DType::F32)));
        assert_eq!((store.ggml_type("w"), store.ggml_type("q")), (None, Some(ggml::GgmlType::Q8_0)));
        assert_eq!(store.nbytes(), 12 + 34, "bytes as stored");
        store.validate(&[("w".into(), vec![2, 3]), ("q".into(), vec![1, 32])]).unwrap();
        assert_eq!(store.get("q").unwrap().unwrap().dims(), [1, 32]);
        assert_eq!(store.read_bytes(), 32 * 4, "held dequantized");
        let q = store.take("q").unwrap().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(q, (0..32).map(|i| (i - 16) as f32 * 0.25).collect::<Vec<_>>());
        let w = store.take("w").unwrap().unwrap().to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(w, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]);
        let e = TensorStore::from_gguf_shared(Arc::new(b"GGUF\x01\0\0\0".to_vec()), "old.gguf").unwrap_err();
        assert!(e.to_string().contains("old.gguf: not a valid GGUF file: GGUF version 1"), "{e}");
    }

    /// Bytes that can shrink after the store was made, as a file truncated under its map.
    struct Shrinking {
        bytes: Vec<u8>,
        cut: std::sync::atomic::AtomicBool,
    }

    impl AsRef<[u8]> for Shrinking {
        fn as_ref(&self) -> &[u8] {
            let n = if self.cut.load(std::sync::atomic::Ordering::Relaxed) { 8 } else { self.bytes.len() };
            &self.bytes[..n]
        }
    }

    #[test]
    fn unreadable_tensor_bytes_are_an_error_that_names_the_tensor_not_an_absence() {
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let bytes = safetensors::serialize([("a", &a)], None).unwrap();
        let shared = Arc::new(Shrinking { bytes, cut: false.into() });
        let mut store = TensorStore::from_safetensors_shared(shared.clone(), "s.safetensors").unwrap();
        shared.cut.store(true, std::sync::atomic::Ordering::Relaxed);
        let expect = |e: Error| {
            let msg = e.to_string();
            assert!(matches!(e, Error::TensorData { .. }), "{msg}");
            assert!(msg.contains("s.safetensors") && msg.contains("tensor `a`") && msg.contains("truncated"), "{msg}");
        };
        expect(store.get("a").unwrap_err());
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        assert!(vb.get((2, 3), "a").is_err());
        expect(store.take("a").unwrap_err());
        // A missing tensor stays an absence.
        assert!(store.get("nope").unwrap().is_none() && store.take("nope").unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"abc", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"PK\x05\x06"] {
            assert!(TensorStore::from_safetensors(bytes, "x").is_err());
            assert!(TensorStore::from_torch_zip(bytes, "x").is_err());
        }
    }
}
