//! HF model directories in and out: `config.json`, `model.safetensors` or sharded
//! `model.safetensors.index.json`, tokenizer files.
//!
//! Loading memory-maps every shard and copies one tensor at a time into its destination, so the
//! process never holds the model twice. Saving streams tensors into the safetensors layout (header
//! first, computed from shapes, then one tensor's bytes at a time) inside a temporary directory
//! that is renamed into place only when complete.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::config::Config;
use super::llama::{param_specs, Llama, ParamSpec};
use crate::error::{Error, IoContext, Result};

/// Files copied next to the weights when a model directory is written.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
];

/// HF's default shard size for `save_pretrained` is 5 GB; keep the same so files look familiar.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A memory-mapped safetensors checkpoint (one file or several shards).
pub struct Checkpoint {
    shards: Vec<(PathBuf, Mmap)>,
    /// tensor name -> shard index
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Open `dir/model.safetensors.index.json` if present, else `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            shard_files(dir, &index_path)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(no_safetensors(dir));
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = crate::files::open_regular(&path)?;
            // SAFETY: the file is opened read-only and we never write through the map; a
            // concurrent truncation by another process is outside what we can defend against.
            let mmap = unsafe { Mmap::map(&file) }.at(&path)?;
            // The safetensors parser checks the header length and every tensor's byte range
            // against the file's size before anything is read, so a header claiming a huge
            // tensor is refused here without allocating it.
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::format(&path, format!("not a valid safetensors file ({e}); truncated or corrupt?")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            shards.push((path, mmap));
        }
        Ok(Checkpoint { shards, index })
    }

    /// The safetensors files, in the (sorted) order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|(p, _)| p.as_path())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Where a tensor lives (for error messages).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].0.as_path())
    }

    /// Copy tensor `name` out of the map as a CPU tensor of its stored dtype, checking the shape.
    pub fn tensor(&self, name: &str, expected_shape: Option<&[i64]>) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            let path = self.shards.first().map(|s| s.0.clone()).unwrap_or_default();
            return Err(Error::MissingTensor { path, name: name.to_string() });
        };
        let (path, mmap) = &self.shards[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| Error::format(path, e.to_string()))?;
        let view = st.tensor(name).map_err(|e| Error::format(path, e.to_string()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if let Some(exp) = expected_shape {
            if exp != shape.as_slice() {
                return Err(Error::ShapeMismatch { path: path.clone(), name: name.to_string(), expected: exp.to_vec(), got: shape });
            }
        }
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(Error::unsupported(path, format!("dtype {other:?} of tensor `{name}`")));
            }
        };
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        // The bytes are copied: drop the file pages from this process's RSS right away, so that
        // loading never costs the model twice in resident memory (pages refault if read again).
        let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        // SAFETY: read-only private file mapping; DONTNEED only discards clean cached pages.
        let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, view.data().len()) };
        Ok(t)
    }
}

/// The distinct shard files a `model.safetensors.index.json` names, each inside `dir`.
fn shard_files(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::files::read_text(index_path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(index_path, format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::format(index_path, "missing object `weight_map`"))?;
    let mut files = map
        .iter()
        .map(|(tensor, f)| match f.as_str() {
            Some(name) => crate::files::inside(dir, name, index_path),
            None => Err(Error::format(index_path, format!("`weight_map`: the entry of `{tensor}` must be a file name, found {f}"))),
        })
        .collect::<Result<Vec<_>>>()?;
    files.sort();
    files.dedup();
    Ok(files)
}

/// Why a directory has no weights we can read: none at all, or only PyTorch pickles.
fn no_safetensors(dir: &Path) -> Error {
    let pickles: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| [".bin", ".pt", ".pth", ".ckpt"].iter().any(|ext| n.ends_with(ext)) || n == "pytorch_model.bin.index.json")
        .collect();
    if let Some(first) = pickles.iter().min() {
        return Error::unsupported(
            dir,
            format!(
                "weights: {first} is a PyTorch pickle and there are no safetensors files. Loading a pickle can execute \
                 arbitrary code, so unlearn never reads one. Convert it once, where you trust the file: \
                 python -c \"from transformers import AutoModelForCausalLM as M; \
                 M.from_pretrained('{d}').save_pretrained('{d}-safetensors')\" (safetensors is the default format)",
                d = dir.display()
            ),
        );
    }
    Error::format(dir, "no model.safetensors or model.safetensors.index.json in this directory")
}

/// A loaded HF model directory.
pub struct LoadedModel {
    pub model: Llama,
    pub config: Config,
    /// The original `config.json`, written back unchanged (bar dtype) on save.
    pub raw_config: Value,
    pub dir: PathBuf,
}

/// Load `dir` (config.json + safetensors) onto `device` in `kind` (fp32 or bf16).
pub fn load_model(dir: &Path, kind: Kind, device: Device) -> Result<LoadedModel> {
    let cfg_path = super::config::config_path(dir)?;
    let text = crate::files::read_text(&cfg_path)?;
    let raw_config: Value = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
    let config = Config::from_json(&raw_config, &cfg_path)?;
    let ckpt = Checkpoint::open(dir)?;
    let specs = param_specs(&config);
    let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    for name in ckpt.names() {
        let ignorable = name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight");
        if !known.contains(name) && !ignorable {
            tracing::warn!("{}: ignoring unexpected tensor `{name}`", ckpt.path_of(name).unwrap().display());
        }
    }
    let model = Llama::new(&config, |spec| {
        let t = ckpt.tensor(&spec.name, Some(&spec.shape))?;
        Ok(t.to_kind(kind).to_device(device))
    })?;
    Ok(LoadedModel { model, config, raw_config, dir: dir.to_path_buf() })
}

/// The first parameter holding a NaN or an infinity, to name when a model's outputs are not finite.
pub fn first_non_finite(model: &mut Llama) -> Option<String> {
    tch::no_grad(|| model.named_params().into_iter().find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0).map(|(n, _)| n))
}

fn safetensors_dtype(kind: Kind) -> Result<(&'static str, usize)> {
    Ok(match kind {
        Kind::Float => ("F32", 4),
        Kind::BFloat16 => ("BF16", 2),
        Kind::Half => ("F16", 2),
        Kind::Double => ("F64", 8),
        other => return Err(crate::other!("cannot save tensors of kind {other:?}")),
    })
}

fn torch_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Streams an HF model directory to disk. Tensors must be written in the order of the `specs`
/// given to [`HfWriter::create`]; the directory appears under its final name only on
/// [`HfWriter::finish`]. Dropping an unfinished writer removes the temporary directory.
pub struct HfWriter {
    out: PathBuf,
    tmp: PathBuf,
    kind: Kind,
    /// For each shard: file name and the tensor names it holds, in order.
    plan: Vec<(String, Vec<String>)>,
    specs: BTreeMap<String, ParamSpec>,
    current: Option<(usize, usize, SafetensorsFile)>, // (shard, tensor position, file)
    finished: bool,
}

impl HfWriter {
    /// Plan the shards (greedy, in spec order, at most `max_shard_bytes` each unless one tensor is
    /// larger) and write `config.json` with `torch_dtype` set to `kind`.
    pub fn create(out: &Path, raw_config: &Value, specs: &[ParamSpec], kind: Kind, max_shard_bytes: u64) -> Result<Self> {
        let (_, elsize) = safetensors_dtype(kind)?;
        let tmp = temp_sibling(out);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).at(&tmp)?;
        let mut groups: Vec<Vec<String>> = vec![vec![]];
        let mut size = 0u64;
        for s in specs {
            let bytes = s.numel() as u64 * elsize as u64;
            if size > 0 && size + bytes > max_shard_bytes {
                groups.push(vec![]);
                size = 0;
            }
            groups.last_mut().unwrap().push(s.name.clone());
            size += bytes;
        }
        let n = groups.len();
        let plan: Vec<(String, Vec<String>)> = groups
            .into_iter()
            .enumerate()
            .map(|(i, names)| {
                let file = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
                (file, names)
            })
            .collect();
        let mut cfg = raw_config.clone();
        if let Some(obj) = cfg.as_object_mut() {
            // transformers 4.x reads `torch_dtype`, 5.x writes `dtype`; set whichever is present.
            let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
            obj.insert(key.into(), Value::from(torch_dtype_name(kind)));
        }
        write_json(&tmp.join("config.json"), &cfg)?;
        let specs = specs.iter().map(|s| (s.name.clone(), s.clone())).collect();
        Ok(HfWriter { out: out.to_path_buf(), tmp, kind, plan, specs, current: None, finished: false })
    }

    /// The temporary directory being filled, for extra files (tokenizer, generation config) that
    /// must be published together with the weights.
    pub fn staging_dir(&self) -> &Path {
        &self.tmp
    }

    /// The position the next tensor must have: (shard, index in shard).
    fn next_slot(&self) -> Option<(usize, usize)> {
        match &self.current {
            None => Some((0, 0)),
            Some((shard, pos, _)) => {
                if pos + 1 < self.plan[*shard].1.len() {
                    Some((*shard, pos + 1))
                } else if shard + 1 < self.plan.len() {
                    Some((shard + 1, 0))
                } else {
                    None
                }
            }
        }
    }

    fn open_shard(&self, shard: usize) -> Result<SafetensorsFile> {
        let (file, names) = &self.plan[shard];
        let entries: Vec<(&str, &[i64])> = names.iter().map(|n| (n.as_str(), self.specs[n].shape.as_slice())).collect();
        SafetensorsFile::create(&self.tmp.join(file), &entries, self.kind, Some(serde_json::json!({"format": "pt"})))
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((_, _, file)) = self.current.take() {
            file.finish()?;
        }
        Ok(())
    }

    /// Write the next tensor; `name` must follow the spec order given to `create`.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let (shard, pos) = self.next_slot().ok_or_else(|| crate::other!("HfWriter: more tensors than planned"))?;
        let expected = &self.plan[shard].1[pos];
        if expected != name {
            return Err(crate::other!("HfWriter: expected tensor `{expected}` next, got `{name}`"));
        }
        let spec = &self.specs[name];
        if t.size() != spec.shape {
            return Err(Error::ShapeMismatch { path: self.out.clone(), name: name.into(), expected: spec.shape.clone(), got: t.size() });
        }
        if pos == 0 {
            self.close_current()?;
            let w = self.open_shard(shard)?;
            self.current = Some((shard, 0, w));
        }
        let cur = self.current.as_mut().unwrap();
        cur.1 = pos;
        cur.2.write(t)
    }

    /// Write the index (if sharded), copy tokenizer files from `copy_from`, fsync and rename into place.
    pub fn finish(self, copy_from: Option<&Path>) -> Result<PathBuf> {
        self.finish_with(copy_from, &|_| Ok(()))
    }

    /// [`HfWriter::finish`], with `extra` writing more files into the directory before it is published.
    pub fn finish_with(mut self, copy_from: Option<&Path>, extra: &dyn Fn(&Path) -> Result<()>) -> Result<PathBuf> {
        if self.next_slot().is_some() {
            let missing = match self.next_slot() {
                Some((s, p)) => self.plan[s].1[p].clone(),
                None => unreachable!(),
            };
            return Err(crate::other!("HfWriter: tensor `{missing}` was never written"));
        }
        self.close_current()?;
        if self.plan.len() > 1 {
            let (_, elsize) = safetensors_dtype(self.kind)?;
            let total: u64 = self.specs.values().map(|s| s.numel() as u64 * elsize as u64).sum();
            let mut weight_map = serde_json::Map::new();
            for (file, names) in &self.plan {
                for n in names {
                    weight_map.insert(n.clone(), Value::from(file.clone()));
                }
            }
            write_json(
                &self.tmp.join("model.safetensors.index.json"),
                &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
            )?;
        }
        if let Some(src) = copy_from {
            copy_tokenizer_files(src, &self.tmp)?;
        }
        extra(&self.tmp)?;
        publish_dir(&self.tmp, &self.out)?;
        self.finished = true;
        Ok(self.out.clone())
    }
}

impl Drop for HfWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// One safetensors file written as a stream: the header (computed from the names and shapes, the
/// data section kept 8-byte aligned as the reference writer does) first, then each tensor's bytes
/// in the header's order, brought to the host one at a time; fsynced on [`SafetensorsFile::finish`].
/// Model shards ([`HfWriter`]) and checkpoint shards are both written by it.
pub struct SafetensorsFile {
    path: PathBuf,
    kind: Kind,
    w: BufWriter<File>,
}

impl SafetensorsFile {
    /// Create `path` for `entries` (name, shape) in `kind`, with optional `__metadata__`.
    pub fn create(path: &Path, entries: &[(&str, &[i64])], kind: Kind, metadata: Option<Value>) -> Result<Self> {
        let (dtype, elsize) = safetensors_dtype(kind)?;
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in entries {
            let bytes = shape.iter().product::<i64>() as usize * elsize;
            header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
            offset += bytes;
        }
        if let Some(m) = metadata {
            header.insert("__metadata__".into(), m);
        }
        let mut text = serde_json::to_string(&Value::Object(header)).expect("header serializes");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let mut w = BufWriter::with_capacity(1 << 22, File::create(path).at(path)?);
        w.write_all(&(text.len() as u64).to_le_bytes()).at(path)?;
        w.write_all(text.as_bytes()).at(path)?;
        Ok(SafetensorsFile { path: path.to_path_buf(), kind, w })
    }

    /// The next tensor's bytes (converted to the file's dtype on the host).
    pub fn write(&mut self, t: &Tensor) -> Result<()> {
        let cpu = t.to_device(Device::Cpu).to_kind(self.kind).contiguous();
        self.w.write_all(tensor_bytes(&cpu)).at(&self.path)
    }

    /// Flush and fsync.
    pub fn finish(self) -> Result<()> {
        let file = self.w.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().at(&self.path)
    }
}

/// Save a whole model held in memory (single process).
pub fn save_model(model: &mut Llama, raw_config: &Value, out: &Path, copy_from: Option<&Path>, max_shard_bytes: u64) -> Result<PathBuf> {
    let specs = param_specs(model.config());
    let mut w = HfWriter::create(out, raw_config, &specs, model.kind(), max_shard_bytes)?;
    for (name, t) in model.named_params() {
        w.write(&name, &t)?;
    }
    w.finish(copy_from)
}

/// Raw bytes of a contiguous CPU tensor.
pub fn tensor_bytes(t: &Tensor) -> &[u8] {
    assert!(t.device() == Device::Cpu && t.is_contiguous(), "tensor_bytes needs a contiguous CPU tensor");
    let n = t.numel() * t.kind().elt_size_in_bytes();
    // SAFETY: contiguous CPU storage of exactly `n` bytes, alive as long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.exists() {
            std::fs::copy(&from, dst.join(f)).at(&from)?;
        }
    }
    Ok(())
}

/// `out` with a temporary suffix, in the same directory (so the final rename is atomic).
pub fn temp_sibling(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.tmp-{}", std::process::id()))
}

/// Move a completed temporary directory to `out`, replacing an existing `out`.
/// Files are fsynced first so that a crash never leaves a renamed-but-empty directory.
pub fn publish_dir(tmp: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).at(tmp)? {
        let p = entry.at(tmp)?.path();
        if p.is_file() {
            File::open(&p).and_then(|f| f.sync_all()).at(&p)?;
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let old = out.with_file_name(format!("{}.old-{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).at(out)?;
    }
    std::fs::rename(tmp, out).at(out)?;
    if had_old {
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent).and_then(|f| f.sync_all()).at(parent)?;
    }
    Ok(())
}

/// Write JSON to a file (pretty, trailing newline).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    text.push('\n');
    std::fs::write(path, text).at(path)
}

/// Write a file atomically: temporary name, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    {
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    std::fs::rename(&tmp, path).at(path)
}
