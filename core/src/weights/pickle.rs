//! A restricted unpickler for PyTorch state dicts.
//!
//! It interprets the pickle opcodes that `torch.save` emits for a (nested)
//! dict of tensors and builds plain values; it **never executes anything**.
//! `GLOBAL`/`STACK_GLOBAL` may only name the functions and classes that
//! rebuild tensors (see [`Allowed`]); any other name — `posix.system`,
//! `builtins.eval`, a user class — stops parsing with
//! [`Error::UnsafePickle`](crate::Error::UnsafePickle). Opcode semantics follow
//! CPython's `Lib/pickletools.py` documentation.

use std::collections::HashMap;

use candle_core::DType;

/// The only globals a state-dict pickle may reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allowed {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(DType),
}

impl Allowed {
    fn lookup(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch", "FloatStorage") => Self::Storage(DType::F32),
            ("torch", "HalfStorage") => Self::Storage(DType::F16),
            ("torch", "BFloat16Storage") => Self::Storage(DType::BF16),
            ("torch", "DoubleStorage") => Self::Storage(DType::F64),
            ("torch", "LongStorage") => Self::Storage(DType::I64),
            ("torch", "ByteStorage") => Self::Storage(DType::U8),
            _ => return None,
        })
    }
}

/// A tensor as the pickle describes it: which storage, and how to view it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub storage_key: String,
    pub dtype: DType,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Allowed),
    Storage { key: String, dtype: DType },
    Tensor(TensorRef),
    Mark,
}

pub(crate) type PResult<T> = Result<T, PickleError>;

#[derive(Debug)]
pub(crate) enum PickleError {
    Unsafe(String),
    Malformed(String),
}

fn bad<T>(msg: impl Into<String>) -> PResult<T> {
    Err(PickleError::Malformed(msg.into()))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => bad(format!("pickle truncated at byte {}", self.pos)),
        }
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or(PickleError::Malformed("unterminated line".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> PResult<String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

fn as_usize(v: &Value) -> PResult<usize> {
    match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).or_else(|_| bad("integer too large")),
        other => bad(format!("expected a non-negative integer, found {other:?}")),
    }
}

fn usize_tuple(v: &Value) -> PResult<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(as_usize).collect(),
        other => bad(format!("expected a tuple of integers, found {other:?}")),
    }
}

/// Applies an allowed callable to its argument tuple.
fn call(func: Allowed, args: Vec<Value>) -> PResult<Value> {
    match func {
        Allowed::OrderedDict => Ok(Value::Dict(Vec::new())),
        Allowed::RebuildTensorV2 => {
            let [storage, offset, shape, stride, ..] = args.as_slice() else {
                return bad("_rebuild_tensor_v2 called with too few arguments");
            };
            let Value::Storage { key, dtype } = storage else {
                return bad("_rebuild_tensor_v2: first argument is not a storage");
            };
            Ok(Value::Tensor(TensorRef {
                storage_key: key.clone(),
                dtype: *dtype,
                offset: as_usize(offset)?,
                shape: usize_tuple(shape)?,
                stride: usize_tuple(stride)?,
            }))
        }
        Allowed::RebuildParameter => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => bad("_rebuild_parameter without a tensor"),
        },
        Allowed::Storage(_) => bad("a storage class cannot be called"),
    }
}

/// `persistent_load` for torch's zip format: ('storage', StorageClass, key, location, numel).
fn persistent(pid: Value) -> PResult<Value> {
    let Value::Tuple(items) = pid else { return bad("persistent id is not a tuple") };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Allowed::Storage(dtype)), key, ..] if tag == "storage" => {
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => return bad(format!("storage key {other:?}")),
            };
            Ok(Value::Storage { key, dtype: *dtype })
        }
        _ => bad("unsupported persistent id"),
    }
}

struct Machine {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl Machine {
    fn pop(&mut self) -> PResult<Value> {
        self.stack.pop().ok_or(PickleError::Malformed("stack underflow".into()))
    }
    fn top(&mut self) -> PResult<&mut Value> {
        self.stack.last_mut().ok_or(PickleError::Malformed("stack underflow".into()))
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or(PickleError::Malformed("no MARK".into()))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }
    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.stack.last().cloned().ok_or(PickleError::Malformed("memo of empty stack".into()))?;
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> PResult<()> {
        let v = self.memo.get(&idx).cloned().ok_or(PickleError::Malformed(format!("memo {idx} unset")))?;
        self.stack.push(v);
        Ok(())
    }
    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        match Allowed::lookup(module, name) {
            Some(a) => {
                self.stack.push(Value::Global(a));
                Ok(())
            }
            None => Err(PickleError::Unsafe(format!("{module}.{name}"))),
        }
    }
    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        let Value::Dict(d) = self.top()? else { return bad("SETITEM(S) on a non-dict") };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }
    fn append(&mut self, items: Vec<Value>) -> PResult<()> {
        match self.top()? {
            Value::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => bad("APPEND(S) on a non-list"),
        }
    }
}

/// Interprets a pickle stream and returns the object it builds.
pub(crate) fn load(data: &[u8]) -> PResult<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut m = Machine { stack: Vec::new(), memo: HashMap::new() };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME
            }
            b'.' => return m.pop(),
            b'}' => m.stack.push(Value::Dict(Vec::new())),
            b']' => m.stack.push(Value::List(Vec::new())),
            b')' => m.stack.push(Value::Tuple(Vec::new())),
            b'(' => m.stack.push(Value::Mark),
            b'N' => m.stack.push(Value::None),
            0x88 => m.stack.push(Value::Bool(true)),
            0x89 => m.stack.push(Value::Bool(false)),
            b'K' => {
                let v = r.u8()?;
                m.stack.push(Value::Int(i64::from(v)))
            }
            b'M' => {
                let v = r.u16()?;
                m.stack.push(Value::Int(i64::from(v)))
            }
            b'J' => {
                let v = r.u32()? as i32;
                m.stack.push(Value::Int(i64::from(v)))
            }
            0x8a => {
                let n = usize::from(r.u8()?);
                let bytes = r.take(n)?;
                if n > 8 {
                    return bad("LONG1 wider than 64 bits");
                }
                let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(bytes);
                m.stack.push(Value::Int(i64::from_le_bytes(buf)))
            }
            b'G' => {
                let mut a = [0u8; 8];
                a.copy_from_slice(r.take(8)?);
                m.stack.push(Value::Float(f64::from_be_bytes(a)))
            }
            b'X' => {
                let n = r.u32()? as usize;
                let s = r.string(n)?;
                m.stack.push(Value::Str(s))
            }
            0x8c => {
                let n = usize::from(r.u8()?);
                let s = r.string(n)?;
                m.stack.push(Value::Str(s))
            }
            0x8d => {
                let n = usize::try_from(r.u64()?).or_else(|_| bad("string too long"))?;
                let s = r.string(n)?;
                m.stack.push(Value::Str(s))
            }
            b'B' => {
                let n = r.u32()? as usize;
                m.stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'C' => {
                let n = usize::from(r.u8()?);
                m.stack.push(Value::Bytes(r.take(n)?.to_vec()))
            }
            b'q' => {
                let i = r.u8()?;
                m.memo_put(u32::from(i))?
            }
            b'r' => {
                let i = r.u32()?;
                m.memo_put(i)?
            }
            0x94 => {
                let i = m.memo.len() as u32;
                m.memo_put(i)?
            }
            b'h' => {
                let i = r.u8()?;
                m.memo_get(u32::from(i))?
            }
            b'j' => {
                let i = r.u32()?;
                m.memo_get(i)?
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                m.global(&module, &name)?
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => m.global(&module, &name)?,
                    _ => return bad("STACK_GLOBAL without two strings"),
                }
            }
            b't' => {
                let items = m.pop_mark()?;
                m.stack.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if m.stack.len() < n {
                    return bad("stack underflow");
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.stack.push(Value::Tuple(items))
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                m.set_items(vec![k, v])?
            }
            b'u' => {
                let items = m.pop_mark()?;
                m.set_items(items)?
            }
            b'a' => {
                let v = m.pop()?;
                m.append(vec![v])?
            }
            b'e' => {
                let items = m.pop_mark()?;
                m.append(items)?
            }
            b'R' => {
                let args = m.pop()?;
                let func = m.pop()?;
                let (Value::Global(func), Value::Tuple(args)) = (func, args) else {
                    return bad("REDUCE on something other than an allowed callable");
                };
                m.stack.push(call(func, args)?)
            }
            b'b' => {
                // BUILD: state for an already-built object (OrderedDict's `_metadata`). Not needed; dropped.
                m.pop()?;
            }
            b'Q' => {
                let pid = m.pop()?;
                m.stack.push(persistent(pid)?)
            }
            other => return bad(format!("unsupported pickle opcode 0x{other:02x} at byte {}", r.pos - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system_protocol0() {
        // `cposix\nsystem\n(S'echo pwned'\ntR.` — the classic malicious pickle.
        let evil = b"cposix\nsystem\n(S'echo pwned'\ntR.";
        match load(evil) {
            Err(PickleError::Unsafe(g)) => assert_eq!(g, "posix.system"),
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn refuses_stack_global_builtins_eval() {
        let mut p = vec![0x80, 4, 0x8c, 8];
        p.extend(b"builtins");
        p.extend([0x8c, 4]);
        p.extend(b"eval");
        p.push(0x93);
        match load(&p) {
            Err(PickleError::Unsafe(g)) => assert_eq!(g, "builtins.eval"),
            other => panic!("expected refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_dict_of_ints() {
        // pickle.dumps({'a': 1, 'b': [2, 3]}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(K\x02K\x03eu.";
        let v = load(p).unwrap();
        let Value::Dict(items) = v else { panic!() };
        assert_eq!(items[0], (Value::Str("a".into()), Value::Int(1)));
        assert_eq!(items[1], (Value::Str("b".into()), Value::List(vec![Value::Int(2), Value::Int(3)])));
    }

    #[test]
    fn truncated_is_malformed_not_panic() {
        let full = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.";
        assert!(load(full).is_ok());
        for n in 0..full.len() {
            let p = &full[..n];
            assert!(load(p).is_err());
        }
    }
}
