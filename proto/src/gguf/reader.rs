//! The GGUF container (llama.cpp's model file), versions 2 and 3, little-endian: header,
//! metadata of every value type (arrays of arrays included), tensor infos, `general.alignment`,
//! and bounds-checked reads of a tensor's raw bytes.
//!
//! Nothing a file says is trusted: every count and length is checked against the bytes that are
//! left before anything is allocated, so a truncated or lying file is one clear error naming the
//! file and what is wrong, never a panic or a huge allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::ggml_type::GgmlType;

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The bytes do not follow the GGUF format (truncated, lying counts, bad values).
    #[error("{path}: not a valid GGUF file: {message}")]
    Malformed { path: String, message: String },
    /// A valid file that asks for something Distillery does not implement.
    #[error("{path}: {message}")]
    Unsupported { path: String, message: String },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array: one element type per array (an array of arrays holds arrays that may each
/// have their own element type). Stored unboxed so a large vocabulary stays compact.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

// GGUF value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Deepest nesting of arrays accepted (real files nest at most one level; the bound keeps a
/// crafted file from exhausting the stack).
const MAX_ARRAY_DEPTH: u32 = 8;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The fewest bytes one element of a value type occupies on disk, `None` for an unknown type.
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,    // the length
        T_ARRAY => 4 + 8, // element type and count
        _ => return None,
    })
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// An integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(u64::from(v)),
            Value::U16(v) => Some(u64::from(v)),
            Value::U32(v) => Some(u64::from(v)),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float32 or float64 (widened exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type, for messages.
    pub fn element_type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "uint8",
            Array::I8(_) => "int8",
            Array::U16(_) => "uint16",
            Array::I16(_) => "int16",
            Array::U32(_) => "uint32",
            Array::I32(_) => "int32",
            Array::U64(_) => "uint64",
            Array::I64(_) => "int64",
            Array::F32(_) => "float32",
            Array::F64(_) => "float64",
            Array::Bool(_) => "bool",
            Array::String(_) => "string",
            Array::Array(_) => "array",
        }
    }

    /// String elements. Here and in the other element getters an empty array of any element
    /// type counts as empty: some writers (candle's) cannot know an empty array's type.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            a if a.is_empty() => Some(&[]),
            _ => None,
        }
    }

    /// Integer elements of any width, widened (`None` for other element types or a u64 that
    /// does not fit).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            a if a.is_empty() => Vec::new(),
            Array::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            Array::I64(v) => v.clone(),
            Array::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            _ => return None,
        })
    }

    /// Float elements (float32 or float64), as f32.
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            a if a.is_empty() => Some(Vec::new()),
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (the fastest-varying axis).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Where the data starts, from the beginning of the file.
    pub file_offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in row-major order (outermost first), as candle and numpy write it.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension fits in usize: the reader checked the tensor's bytes fit in the file.
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened GGUF file: everything but the tensor data, which [`GgufFile::tensor_data`] reads.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Reads the header through a byte budget: the file's length bounds every read.
struct Cursor<'a> {
    r: BufReader<&'a File>,
    path: &'a Path,
    pos: u64,
    len: u64,
    /// What is being read, for error messages (`the value of key "x"`).
    what: String,
}

impl Cursor<'_> {
    fn malformed(&self, message: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.display().to_string(),
            message,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes exist.
    fn need(&self, n: u64) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(self.malformed(format!(
                "{} needs {n} bytes at byte {} but the file ends at byte {} (is it truncated?)",
                self.what, self.pos, self.len
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, GgufError> {
        self.need(n)?;
        // `need` bounded n by the file length, so the allocation is no larger than the file.
        let mut b = vec![0u8; usize::try_from(n).map_err(|_| self.malformed("too large".into()))?];
        self.r.read_exact(&mut b).map_err(|source| GgufError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.pos += n;
        Ok(b)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        self.need(N as u64)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|source| GgufError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.fixed()?))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        let b = self.bytes(n)?;
        String::from_utf8(b)
            .map_err(|_| self.malformed(format!("{}: a string is not valid UTF-8", self.what)))
    }

    /// `n` elements of `size` bytes each, checked against the bytes left before allocating.
    fn elements(&mut self, n: u64, size: u64) -> Result<Vec<u8>, GgufError> {
        let total = n.checked_mul(size).ok_or_else(|| {
            self.malformed(format!("{}: an array claims {n} elements", self.what))
        })?;
        self.bytes(total)
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            T_U8 => Value::U8(self.fixed::<1>()?[0]),
            T_I8 => Value::I8(i8::from_le_bytes(self.fixed()?)),
            T_U16 => Value::U16(u16::from_le_bytes(self.fixed()?)),
            T_I16 => Value::I16(i16::from_le_bytes(self.fixed()?)),
            T_U32 => Value::U32(self.u32()?),
            T_I32 => Value::I32(i32::from_le_bytes(self.fixed()?)),
            T_U64 => Value::U64(self.u64()?),
            T_I64 => Value::I64(i64::from_le_bytes(self.fixed()?)),
            T_F32 => Value::F32(f32::from_le_bytes(self.fixed()?)),
            T_F64 => Value::F64(f64::from_le_bytes(self.fixed()?)),
            // llama.cpp reads a bool as one byte, non-zero meaning true.
            T_BOOL => Value::Bool(self.fixed::<1>()?[0] != 0),
            T_STRING => Value::String(self.string()?),
            T_ARRAY => Value::Array(self.array(depth + 1)?),
            t => {
                return Err(self.malformed(format!("{} has unknown value type {t}", self.what)));
            }
        })
    }

    fn array(&mut self, depth: u32) -> Result<Array, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.malformed(format!(
                "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                self.what
            )));
        }
        let elem = self.u32()?;
        let n = self.u64()?;
        let min = min_size(elem).ok_or_else(|| {
            self.malformed(format!(
                "{} is an array of unknown value type {elem}",
                self.what
            ))
        })?;
        // A count the rest of the file cannot hold is a lie: refuse it before allocating.
        if n.checked_mul(min).is_none_or(|b| b > self.remaining()) {
            return Err(self.malformed(format!(
                "{} claims {n} elements at byte {}, more than the {} bytes left can hold (is it truncated?)",
                self.what,
                self.pos,
                self.remaining()
            )));
        }
        fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match elem {
            T_U8 => Array::U8(self.elements(n, 1)?),
            T_I8 => Array::I8(chunks(&self.elements(n, 1)?, i8::from_le_bytes)),
            T_BOOL => Array::Bool(self.elements(n, 1)?.iter().map(|&b| b != 0).collect()),
            T_U16 => Array::U16(chunks(&self.elements(n, 2)?, u16::from_le_bytes)),
            T_I16 => Array::I16(chunks(&self.elements(n, 2)?, i16::from_le_bytes)),
            T_U32 => Array::U32(chunks(&self.elements(n, 4)?, u32::from_le_bytes)),
            T_I32 => Array::I32(chunks(&self.elements(n, 4)?, i32::from_le_bytes)),
            T_F32 => Array::F32(chunks(&self.elements(n, 4)?, f32::from_le_bytes)),
            T_U64 => Array::U64(chunks(&self.elements(n, 8)?, u64::from_le_bytes)),
            T_I64 => Array::I64(chunks(&self.elements(n, 8)?, i64::from_le_bytes)),
            T_F64 => Array::F64(chunks(&self.elements(n, 8)?, f64::from_le_bytes)),
            T_STRING => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.string()?);
                }
                Array::String(v)
            }
            T_ARRAY => {
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.array(depth + 1)?);
                }
                Array::Array(v)
            }
            t => {
                return Err(self.malformed(format!(
                    "{} is an array of unknown value type {t}",
                    self.what
                )))
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file's header (metadata and tensor infos); checks that every
    /// tensor's data lies inside the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut c = Cursor {
            r: BufReader::with_capacity(1 << 16, &file),
            path,
            pos: 0,
            len,
            what: "the GGUF magic".into(),
        };
        let unsupported = |message: String| GgufError::Unsupported {
            path: path.display().to_string(),
            message,
        };
        if len < 4 || c.fixed::<4>()? != *b"GGUF" {
            return Err(c.malformed(
                "has no GGUF magic at its start: is it a llama.cpp model file?".into(),
            ));
        }
        c.what = "the version".into();
        let version = c.u32()?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(unsupported(
                    "is GGUF version 1, which predates 64-bit counts; convert it again with a current llama.cpp".into(),
                ))
            }
            v if matches!(v.swap_bytes(), 2 | 3) => {
                return Err(unsupported(
                    "is a big-endian GGUF file; only little-endian files are supported (convert it again without --bigendian)".into(),
                ))
            }
            v => return Err(c.malformed(format!("has unknown GGUF version {v}"))),
        }
        c.what = "the tensor count".into();
        let n_tensors = c.u64()?;
        c.what = "the metadata count".into();
        let n_kv = c.u64()?;
        // Each metadata pair takes at least 12 bytes (key length, value type) and each tensor
        // info 24 (name length, dimension count, type, offset).
        let least = n_kv
            .checked_mul(12)
            .and_then(|a| n_tensors.checked_mul(24).and_then(|b| a.checked_add(b)));
        if least.is_none_or(|b| b > c.remaining()) {
            return Err(c.malformed(format!(
                "claims {n_kv} metadata pairs and {n_tensors} tensors, more than its {len} bytes can hold (is it truncated?)"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            c.what = format!("metadata key {i}");
            let key = c.string()?;
            c.what = format!("the value of key {key:?}");
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(c.malformed(format!("has key {key:?} twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(c.malformed(format!(
                    "general.alignment must be a power-of-two uint32, not {v:?}"
                )))
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::with_capacity(n_tensors as usize);
        let mut relative = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            c.what = format!("tensor info {i}");
            let name = c.string()?;
            c.what = format!("the info of tensor {name:?}");
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.malformed(format!(
                    "tensor {name:?} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let ggml_type = GgmlType(c.u32()?);
            let offset = c.u64()?;
            let layout = match (ggml_type.name(), ggml_type.layout()) {
                (_, Some(l)) => l,
                (Some(n), None) => {
                    return Err(unsupported(format!(
                        "tensor {name:?} is {n}, a type ggml has removed; convert the model again with a current llama.cpp"
                    )))
                }
                (None, None) => {
                    return Err(unsupported(format!(
                        "tensor {name:?} has ggml type id {}, which this reader does not know (written by a newer llama.cpp?)",
                        ggml_type.0
                    )))
                }
            };
            let elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let Some(elements) = elements.filter(|&e| e <= i64::MAX as u64) else {
                return Err(c.malformed(format!(
                    "tensor {name:?} has dimensions {dims:?} whose product overflows"
                )));
            };
            if dims[0] % layout.elements != 0 {
                return Err(c.malformed(format!(
                    "tensor {name:?} has rows of {} elements, not a multiple of the {} of a {ggml_type} block",
                    dims[0], layout.elements
                )));
            }
            let Some(n_bytes) = (elements / layout.elements).checked_mul(layout.bytes) else {
                return Err(c.malformed(format!(
                    "tensor {name:?} has dimensions {dims:?} whose size in bytes overflows"
                )));
            };
            if offset % alignment != 0 {
                return Err(c.malformed(format!(
                    "tensor {name:?} starts at offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.malformed(format!("has tensor {name:?} twice")));
            }
            relative.push(offset);
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                file_offset: 0,
                n_bytes,
            });
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        for (t, offset) in tensors.iter_mut().zip(relative) {
            let end = data_start
                .checked_add(offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > len) {
                return Err(c.malformed(format!(
                    "the data of tensor {:?} ({} bytes at offset {offset} of the data section, which starts at byte {data_start}) runs past the end of the file at byte {len} (is it truncated?)",
                    t.name, t.n_bytes
                )));
            }
            t.file_offset = data_start + offset;
        }
        drop(c);
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            version,
            alignment,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The error for a key with a value of the wrong type.
    fn wrong_type(&self, key: &str, v: &Value, want: &str) -> GgufError {
        self.malformed(format!("{key} is a {}, expected {want}", v.type_name()))
    }

    /// A `Malformed` error about this file.
    pub fn malformed(&self, message: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// An `Unsupported` error about this file.
    pub fn unsupported(&self, message: impl Into<String>) -> GgufError {
        GgufError::Unsupported {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// An integer key (any width, not negative); an error if present with another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
            })
            .transpose()
    }

    /// A float key (float32 or float64).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, v, "a float")))
            .transpose()
    }

    /// A float key, read as the decimal a float32 was written from (`1e-6`, not
    /// `9.999999974752427e-7`): the value the model's config held before conversion.
    pub fn get_f64_decimal(&self, key: &str) -> Result<Option<f64>, GgufError> {
        Ok(match self.get(key) {
            Some(Value::F32(v)) => Some(f32_decimal(*v)),
            _ => self.get_f64(key)?,
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, v, "a string"))
            })
            .transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, v, "a bool")))
            .transpose()
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.wrong_type(key, v, "an array"))
            })
            .transpose()
    }

    /// The raw bytes of a tensor's data (`t.n_bytes` of them, bounds checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let io = |source: std::io::Error| GgufError::Io {
            path: self.path.display().to_string(),
            source: std::io::Error::new(
                source.kind(),
                format!("reading the data of tensor {:?}: {source}", t.name),
            ),
        };
        let n = usize::try_from(t.n_bytes)
            .map_err(|_| self.malformed(format!("tensor {:?} is too large", t.name)))?;
        let mut f = &self.file;
        f.seek(SeekFrom::Start(t.file_offset)).map_err(io)?;
        let mut b = vec![0u8; n];
        f.read_exact(&mut b).map_err(io)?;
        Ok(b)
    }
}

/// The shortest decimal that reads back as `v`, as f64: the number a float32 was rounded from
/// when it was written (`1e-6f32` gives `1e-6`).
pub fn f32_decimal(v: f32) -> f64 {
    // Display prints the shortest representation that round-trips through f32.
    format!("{v}").parse().unwrap_or(f64::from(v))
}

#[cfg(test)]
mod tests;
