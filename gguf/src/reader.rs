use std::collections::BTreeMap;
use std::path::Path;

use crate::quant::{GgmlType, dequantize};
use crate::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GgufError, GgufWriter, TensorPayload, Value,
};

/// Most dimensions a GGML tensor can have.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted in metadata (GGUF writers never nest more than once).
const MAX_ARRAY_DEPTH: u32 = 4;

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` (ne0) varies fastest in memory.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements (the product of `dims`).
    pub n_elems: u64,
    /// Bytes of storage.
    pub n_bytes: u64,
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    data: Vec<u8>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what() })
    }

    fn value(&mut self, key: &str, ty: u32, depth: u32) -> Result<Value, GgufError> {
        let what = || format!("value of {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Invalid(format!("{key:?}: bool byte {b}"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid(format!(
                        "{key:?}: arrays nested too deep"
                    )));
                }
                let elem_ty = self.u32(&what)?;
                let count = self.u64(&what)?;
                // Every element takes at least one byte: a count beyond the bytes left is a lie,
                // caught here before any allocation.
                let remaining = (self.buf.len() - self.pos) as u64;
                if count > remaining {
                    return Err(GgufError::Truncated {
                        what: format!("{count} array elements of {key:?}"),
                        offset: self.pos as u64,
                        needed: count,
                        len: self.buf.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            found => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    found,
                });
            }
        })
    }
}

impl GgufFile {
    /// Reads and validates a GGUF file from disk.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(data)
    }

    /// Parses and validates a GGUF image held in memory.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, GgufError> {
        let mut c = Cursor { buf: &data, pos: 0 };
        let magic = c.u32(&|| "magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32(&|| "version".into())?;
        if version != GGUF_VERSION {
            return Err(GgufError::UnsupportedVersion { found: version });
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("type of {key:?}"))?;
            let value = c.value(&key, ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Invalid(format!(
                    "duplicate metadata key {key:?}"
                )));
            }
        }

        let mut tensors = Vec::new();
        let mut index = BTreeMap::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("name of tensor #{i}"))?;
            let what = || format!("directory entry of tensor {name:?}");
            let n_dims = c.u32(&what)?;
            let bad = |reason: String| GgufError::BadTensor {
                tensor: name.clone(),
                reason,
            };
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("{n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let code = c.u32(&what)?;
            let ty = GgmlType::from_code(code).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: name.clone(),
                found: code,
            })?;
            let offset = c.u64(&what)?;
            let n_elems = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let n_bytes = ty.bytes_for(n_elems).ok_or_else(|| {
                bad(format!(
                    "{n_elems} elements is not a whole number of {ty} blocks"
                ))
            })?;
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("duplicate tensor name".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elems,
                n_bytes,
            });
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(GgufError::Invalid(format!("general.alignment {v:?}"))),
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (data.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            if t.offset % alignment != 0 {
                return Err(GgufError::BadTensor {
                    tensor: t.name.clone(),
                    reason: format!("offset {} is not aligned to {alignment}", t.offset),
                });
            }
            let end = t.offset.checked_add(t.n_bytes);
            // An empty tensor fits in an empty data section, but its bytes are still read at
            // `data_start`: the section must begin inside the file.
            if end.is_none_or(|e| e > data_len) || data_start > data.len() as u64 {
                return Err(GgufError::Truncated {
                    what: format!("data of tensor {:?}", t.name),
                    offset: data_start.saturating_add(t.offset),
                    needed: t.n_bytes,
                    len: data.len() as u64,
                });
            }
        }
        let data_start = data_start as usize;
        Ok(Self {
            metadata,
            tensors,
            index,
            data,
            data_start,
        })
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// One metadata value, or a `MissingKey` error.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    fn wrong(key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::WrongValueType {
            key: key.to_string(),
            expected,
            found: v.type_name(),
        }
    }

    /// A metadata value that must be a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| Self::wrong(key, "unsigned integer", v))
    }

    /// A metadata value that must be a float.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| Self::wrong(key, "float", v))
    }

    /// A metadata value that must be a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    /// A metadata value that must be a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong(key, "bool", v)),
        }
    }

    /// A metadata value that must be an array; its elements are returned as they are.
    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            v => Err(Self::wrong(key, "array", v)),
        }
    }

    /// A metadata value that must be an array of strings.
    pub fn get_string_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Self::wrong(key, "array of strings", v))
            })
            .collect()
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor's directory entry.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// Whether the file has a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The raw stored bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.tensor(name)?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.data[start..start + t.n_bytes as usize])
    }

    /// A file with this file's metadata (and `extra`, which replaces keys of the same name) and
    /// only the tensors `names`, their stored bytes copied unchanged: a part of a model that
    /// computes exactly what the whole does. The data is re-aligned to the default alignment.
    pub fn subset(
        &self,
        names: &[String],
        extra: Vec<(String, Value)>,
    ) -> Result<GgufWriter, GgufError> {
        let mut w = GgufWriter::new();
        for (key, value) in &self.metadata {
            if key != "general.alignment" && !extra.iter().any(|(k, _)| k == key) {
                w.kv(key.clone(), value.clone());
            }
        }
        for (key, value) in extra {
            w.kv(key, value);
        }
        for name in names {
            let t = self.tensor(name)?;
            w.tensor(TensorPayload {
                name: name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                bytes: self.tensor_bytes(name)?.to_vec(),
            });
        }
        Ok(w)
    }

    /// A tensor decoded to f32 in storage order (`dims[0]` fastest), with its dimensions.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<f32>, Vec<u64>), GgufError> {
        let t = self.tensor(name)?;
        let values = dequantize(name, t.ty, self.tensor_bytes(name)?)?;
        Ok((values, t.dims.clone()))
    }
}
