//! GGUF (llama.cpp's single-file model format, versions 2 and 3): header, metadata, tensor table,
//! and dequantization of the common tensor types to f32.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, the metadata
//! key/values, the tensor infos (name, dims with `ne[0]` the fastest-varying one, ggml type,
//! offset), padding to `general.alignment` (default 32), then the tensor data. Everything is little
//! endian. The file is memory-mapped; tensors are dequantized one at a time on request.
//!
//! Every read is bounds-checked against the file, and every tensor's data range is checked at
//! open, so a truncated or corrupt file fails with a message naming the file, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensor types: (id, name, elements per block, bytes per block), as in gguf-py's
/// `GGML_QUANT_SIZES`. Types we cannot dequantize are still listed so that their data ranges
/// can be checked and errors can name them.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

/// The tensor types [`GgufFile::dequantize`] implements.
pub const DEQUANTIZABLE: &[&str] = &["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"];

/// A ggml tensor type id, with its name and block geometry when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        GGML_TYPES.iter().find(|e| e.0 == self.0)
    }
    /// `Q4_1`, `F32`, ... or `type 99` for an id this reader does not know.
    pub fn name(self) -> String {
        self.entry().map(|e| e.1.to_string()).unwrap_or_else(|| format!("type {}", self.0))
    }
    /// (elements per block, bytes per block).
    pub fn block(self) -> Option<(u64, u64)> {
        self.entry().map(|e| (e.2, e.3))
    }
    pub fn is_dequantizable(self) -> bool {
        self.entry().is_some_and(|e| DEQUANTIZABLE.contains(&e.1))
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type, as i64 (None for u64 values beyond i64 and non-integers).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }
    /// Floats as f64. An f32 goes through its shortest decimal form, so that `1e-5` stored as
    /// f32 comes back as the `1e-5` the model's authors wrote, not `9.99999974e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => v.to_string().parse().ok(),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` varies fastest (the reverse of the PyTorch/HF shape).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// The row-major (PyTorch/HF) shape: `dims` reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
    /// Bytes of data, when the type's block size is known and the fastest dim is a whole number
    /// of blocks.
    fn n_bytes(&self) -> Option<u64> {
        let (block_elems, block_bytes) = self.ggml_type.block()?;
        let ne0 = *self.dims.first().unwrap_or(&1);
        if !ne0.is_multiple_of(block_elems) {
            return None;
        }
        self.n_elements().checked_div(block_elems)?.checked_mul(block_bytes)
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

/// A bounds-checked little-endian reader over the mapped header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= self.buf.len() as u64).ok_or_else(|| {
            Error::format(
                self.path,
                format!(
                    "truncated or corrupt GGUF header: {what} needs {n} bytes at offset {}, but the file has {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            )
        })?;
        let s = &self.buf[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returns N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::format(self.path, format!("{what} is not valid UTF-8 (offset {})", self.pos)))
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(what)?[0]),
            1 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                let elem_ty = self.u32(what)?;
                // GGUF writers emit flat arrays only; refusing nesting also bounds the recursion
                // (a crafted file could otherwise nest deep enough to overflow the stack).
                if elem_ty == 9 {
                    return Err(Error::format(
                        self.path,
                        format!("{what} is an array of arrays, which GGUF models do not use; corrupt file?"),
                    ));
                }
                let n = self.u64(what)?;
                // Every element takes at least one byte: a larger count is corruption, and
                // checking it first keeps a corrupt count from allocating unbounded memory.
                if n > self.remaining() {
                    return Err(Error::format(
                        self.path,
                        format!("truncated or corrupt GGUF header: {what} claims {n} elements, more than the bytes left"),
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, what)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(Error::format(self.path, format!("{what} has unknown GGUF value type {other}")));
            }
        })
    }
}

impl GgufFile {
    /// Map and parse `path`, checking magic, version, and that every tensor's data lies inside
    /// the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path)?;
        // SAFETY: read-only map, never written through; a concurrent truncation by another
        // process is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        let mut c = Cursor { buf: &mmap, pos: 0, path };
        let magic = c
            .take(4, "magic")
            .map_err(|_| Error::format(path, format!("not a GGUF file: only {} bytes, too short for a GGUF header", mmap.len())))?;
        if magic != MAGIC {
            return Err(Error::format(
                path,
                format!("not a GGUF file: starts with {:?}, expected \"GGUF\"", String::from_utf8_lossy(magic)),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                path,
                format!("GGUF version {version} (supported: 2 and 3; a huge number means a big-endian file)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let value = c.value(ty, &format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("rank of tensor `{name}`"))?;
            if n_dims > 8 {
                return Err(Error::format(path, format!("tensor `{name}` claims {n_dims} dimensions; corrupt file?")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&format!("shape of tensor `{name}`"))).collect::<Result<Vec<_>>>()?;
            // Checked once here, so that `n_elements` and `shape` never overflow later.
            if dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_none_or(|n| n > i64::MAX as u64) {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` claims dimensions {dims:?} whose element count overflows; corrupt file?"),
                ));
            }
            let ggml_type = GgmlType(c.u32(&format!("type of tensor `{name}`"))?);
            let offset = c.u64(&format!("offset of tensor `{name}`"))?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_i64()
                .filter(|&a| a > 0 && (a as u64).is_power_of_two())
                .ok_or_else(|| Error::format(path, format!("`general.alignment` must be a power of two, got {v:?}")))?
                as u64,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let g = GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors, data_start };
        g.check_tensor_ranges(alignment)?;
        Ok(g)
    }

    fn check_tensor_ranges(&self, alignment: u64) -> Result<()> {
        let file_len = self.mmap.len() as u64;
        for t in &self.tensors {
            if t.offset % alignment != 0 {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{}` starts at offset {}, not a multiple of the alignment {alignment}", t.name, t.offset),
                ));
            }
            // Types of unknown geometry can only be checked to start inside the file.
            let len = t.n_bytes().unwrap_or(0);
            let end = self.data_start.checked_add(t.offset).and_then(|s| s.checked_add(len));
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "truncated file: tensor `{}` ({}, {len} bytes at data offset {}) ends past the end of the file ({file_len} bytes)",
                        t.name,
                        t.ggml_type.name(),
                        t.offset
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, want: &str) -> Error {
        Error::format(&self.path, format!("metadata `{key}` must be {want}, got {:?}", self.metadata[key]))
    }

    /// An optional integer key; present with another type is an error naming the key.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.get(key).map(|v| v.as_i64().ok_or_else(|| self.wrong_type(key, "an integer"))).transpose()
    }
    pub fn require_i64(&self, key: &str) -> Result<i64> {
        self.get_i64(key)?.ok_or_else(|| Error::format(&self.path, format!("missing metadata `{key}`")))
    }
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number"))).transpose()
    }
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string"))).transpose()
    }
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "true or false"))).transpose()
    }
    /// An optional array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of strings"))?;
        items.iter().map(|x| x.as_str().ok_or_else(|| self.wrong_type(key, "an array of strings"))).collect::<Result<_>>().map(Some)
    }
    /// An optional array of integers.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of integers"))?;
        items.iter().map(|x| x.as_i64().ok_or_else(|| self.wrong_type(key, "an array of integers"))).collect::<Result<_>>().map(Some)
    }

    /// The raw bytes of a tensor (range checked at open).
    fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        let len = t.n_bytes().ok_or_else(|| self.unsupported_type(t))?;
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.mmap[start..start + len as usize])
    }

    fn unsupported_type(&self, t: &TensorInfo) -> Error {
        Error::unsupported(
            &self.path,
            format!("GGUF tensor type {} of tensor `{}` (supported: {})", t.ggml_type.name(), t.name, DEQUANTIZABLE.join(", ")),
        )
    }

    /// Fail unless [`GgufFile::dequantize`] can read `t`.
    pub fn check_dequantizable(&self, t: &TensorInfo) -> Result<()> {
        if !t.ggml_type.is_dequantizable() {
            return Err(self.unsupported_type(t));
        }
        if t.n_bytes().is_none() {
            let (block, _) = t.ggml_type.block().expect("dequantizable types have a block size");
            return Err(Error::format(
                &self.path,
                format!("tensor `{}` has rows of {} elements, not a multiple of the {block}-element block", t.name, t.dims[0]),
            ));
        }
        Ok(())
    }

    /// The tensor's values as f32, in GGUF (= row-major HF) element order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        self.check_dequantizable(t)?;
        let raw = self.raw(t)?;
        let n = t.n_elements() as usize;
        let mut out = Vec::with_capacity(n);
        match t.ggml_type.name().as_str() {
            "F32" => out.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()))),
            "F16" => out.extend(raw.chunks_exact(2).map(|b| half_at(b, 0))),
            "BF16" => out.extend(raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            "Q8_0" => {
                // block: f16 scale d, 32 x i8 q; w = d * q
                for b in raw.chunks_exact(34) {
                    let d = half_at(b, 0);
                    out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
                }
            }
            "Q4_0" => {
                // block: f16 d, 16 bytes; low nibbles are weights 0..16, high nibbles 16..32;
                // w = d * (q - 8)
                for b in raw.chunks_exact(18) {
                    let d = half_at(b, 0);
                    out.extend(b[2..].iter().map(|&q| d * ((q & 0x0F) as i32 - 8) as f32));
                    out.extend(b[2..].iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
                }
            }
            "Q4_1" => {
                // block: f16 d, f16 min m, 16 bytes of nibbles as in Q4_0; w = d * q + m
                for b in raw.chunks_exact(20) {
                    let (d, m) = (half_at(b, 0), half_at(b, 2));
                    out.extend(b[4..].iter().map(|&q| d * (q & 0x0F) as f32 + m));
                    out.extend(b[4..].iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
            _ => unreachable!("check_dequantizable lets only DEQUANTIZABLE types through"),
        }
        debug_assert_eq!(out.len(), n);
        Ok(out)
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}
