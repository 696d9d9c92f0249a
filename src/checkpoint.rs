//! Checkpoints: per-shard state files plus one `meta.json`, written atomically and readable at any
//! world size.
//!
//! Layout of `checkpoints/step-000100/`:
//! * `shard-00000-of-00002.safetensors`: this shard's fp32 master weights (`master`), optimizer
//!   state (`optim.*`) and EMA teacher (`teacher`), each a flat vector;
//! * `meta.json`: step, flat layout (which parameter pieces each shard holds), optimizer scalars,
//!   loader positions, AutoLR state;
//! * with in-run evaluation, the monitor's history (`monitor` in meta.json, see
//!   `monitor::resume`) and the utility floor's last good weights (`monitor.last_good`, a flat
//!   shard like `master`).
//!
//! Each rank writes its shard into `step-N.tmp/` (fsynced); after a barrier rank 0 writes
//! meta.json, renames the directory into place and updates `checkpoints/latest`. A crash at any
//! point leaves the previous checkpoint intact and `latest` pointing at it. Under ZeRO-0 every
//! rank holds the same state, so only rank 0 writes (one shard). Before writing, rank 0 checks
//! that the filesystem has room for the whole checkpoint (a clear error instead of a full disk
//! halfway); older checkpoints beyond `train.keep_checkpoints` are removed only after the new one
//! is complete.
//!
//! Resharding: a rank restoring at another world size asks, for each parameter piece its new
//! shard needs, which old shard held it (the old layout's segments), and copies just those
//! element ranges out of the memory-mapped old files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::data::loader::{Loader, LoaderState};
use crate::dist::zero::FlatLayout;
use crate::dist::{watchdog, Collective};
use crate::error::{Error, IoContext, Result};
use crate::fault::{self, Fault};
use crate::methods::autolr::AutoLr;
use crate::methods::{Method, Objective};
use crate::model::weights::{publish_dir, write_atomic, SafetensorsFile};
use crate::optim::Optimizer;

/// The parts of a run a checkpoint holds, borrowed from the trainer: saved from them, restored
/// into them.
pub struct Parts<'a> {
    pub step: u64,
    pub method_name: &'static str,
    pub layout: &'a FlatLayout,
    /// This rank's shard of `layout`.
    pub shard: usize,
    /// The fp32 master shard (`master`).
    pub master: &'a mut Tensor,
    /// Optimizer state shards (`optim.*`) and scalars.
    pub optim: &'a mut dyn Optimizer,
    /// The EMA teacher shard (`teacher`) and AutoLR, where the method has them.
    pub method: &'a mut dyn Method,
    /// Sampler positions, by objective.
    pub loaders: Vec<(Objective, &'a mut Loader)>,
}

impl Parts<'_> {
    fn loader_state(&self, obj: Objective) -> Option<LoaderState> {
        self.loaders.iter().find(|(o, _)| *o == obj).map(|(_, l)| l.state())
    }
}

/// State of the run outside the trainer that a checkpoint carries (the in-run evaluation's, see
/// `monitor::resume`): a JSON value, meta.json's `monitor`, and flat shard tensors laid out like
/// `master` and named `monitor.*`.
#[derive(Default)]
pub struct Attached {
    pub meta: Option<serde_json::Value>,
    pub tensors: Vec<(String, Tensor)>,
}

/// Prefix of the attached tensors' names.
const ATTACHED: &str = "monitor.";

/// What is written: flat shard tensors by name (all of length `layout.shard_len()`) and meta.json.
struct State {
    tensors: Vec<(String, Tensor)>,
    meta: Meta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub step: u64,
    pub world: usize,
    pub layout: FlatLayout,
    pub tensors: Vec<String>,
    pub optim_scalars: serde_json::Value,
    pub forget: Option<LoaderState>,
    pub retain: Option<LoaderState>,
    pub autolr: Option<AutoLr>,
    pub method: String,
    pub tool_version: String,
    /// [`Attached::meta`]; absent when the run evaluates nothing (and in checkpoints written
    /// before runs kept their evaluation history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<serde_json::Value>,
}

pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

fn shard_file(shard: usize, shards: usize) -> String {
    format!("shard-{shard:05}-of-{shards:05}.safetensors")
}

/// Save the run's `parts` under `root/step-N` and keep the last `keep` checkpoints (collective:
/// every rank calls it).
pub fn save(root: &Path, parts: &mut Parts, attached: &Attached, comm: &dyn Collective, keep: usize) -> Result<PathBuf> {
    let mut tensors = vec![("master".to_string(), parts.master.shallow_clone())];
    for (n, t) in parts.optim.state() {
        tensors.push((format!("optim.{n}"), t));
    }
    if let Some(t) = parts.method.teacher_shard() {
        tensors.push(("teacher".to_string(), t.shallow_clone()));
    }
    for (n, t) in &attached.tensors {
        debug_assert!(n.starts_with(ATTACHED) && t.numel() as i64 == parts.layout.shard_len(), "{n}");
        tensors.push((n.clone(), t.shallow_clone()));
    }
    let meta = Meta {
        step: parts.step,
        world: comm.world(),
        layout: parts.layout.clone(),
        tensors: tensors.iter().map(|(n, _)| n.clone()).collect(),
        optim_scalars: parts.optim.scalars(),
        forget: parts.loader_state(Objective::Forget),
        retain: parts.loader_state(Objective::Retain),
        autolr: parts.method.autolr().cloned(),
        method: parts.method_name.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        monitor: attached.meta.clone(),
    };
    save_state(root, &State { tensors, meta }, comm, keep)
}

/// Restore `parts` from the checkpoint in `dir` (written at any world size); returns its step and
/// what was attached to it (this rank's shards of the attached tensors).
pub fn restore(dir: &Path, parts: &mut Parts) -> Result<(u64, Attached)> {
    let ck = Loaded::open(dir)?;
    if ck.meta.method != parts.method_name {
        return Err(crate::other!("{}: checkpoint of method `{}`, config says `{}`", dir.display(), ck.meta.method, parts.method_name));
    }
    let (layout, rank) = (parts.layout, parts.shard);
    ck.read_shard("master", layout, rank, parts.master)?;
    let mut optim_tensors = vec![];
    for n in ck.tensor_names().into_iter().filter(|n| n.starts_with("optim.")) {
        let mut t = Tensor::zeros([layout.shard_len()], (Kind::Float, parts.master.device()));
        ck.read_shard(&n, layout, rank, &mut t)?;
        optim_tensors.push((n.trim_start_matches("optim.").to_string(), t));
    }
    parts.optim.restore(optim_tensors, &ck.meta.optim_scalars)?;
    if let Some(t) = parts.method.teacher_shard_mut() {
        ck.read_shard("teacher", layout, rank, t)?;
    }
    for (obj, loader) in &mut parts.loaders {
        let saved = match obj {
            Objective::Forget => ck.meta.forget,
            Objective::Retain => ck.meta.retain,
        };
        if let Some(s) = saved {
            loader.restore(s).map_err(|e| crate::other!("{}: {} loader: {e}", dir.display(), obj.name()))?;
        }
    }
    if let (Some(a), Some(saved)) = (parts.method.autolr(), ck.meta.autolr.clone()) {
        *a = saved;
    }
    let mut attached = Attached { meta: ck.meta.monitor.clone(), tensors: vec![] };
    for n in ck.tensor_names().into_iter().filter(|n| n.starts_with(ATTACHED)) {
        let mut t = Tensor::zeros([layout.shard_len()], (Kind::Float, parts.master.device()));
        ck.read_shard(&n, layout, rank, &mut t)?;
        attached.tensors.push((n, t));
    }
    Ok((ck.meta.step, attached))
}

fn save_state(root: &Path, state: &State, comm: &dyn Collective, keep: usize) -> Result<PathBuf> {
    let step = state.meta.step;
    let final_dir = step_dir(root, step);
    let tmp = root.join(format!("step-{step:06}.tmp"));
    let rank = comm.rank();
    let shards = state.meta.layout.shards;
    let text = serde_json::to_string_pretty(&state.meta).expect("meta serializes");
    let barrier = |what: &str| -> Result<()> {
        let _g = watchdog::enter(format!("barrier of the checkpoint of step {step}: {what}"));
        comm.barrier()
    };
    if rank == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp)?; // left by an interrupted save of this step
        }
        let needed = shards as u64 * shard_bytes(&state.tensors) + text.len() as u64;
        check_free_space(root, needed, step)?;
        std::fs::create_dir_all(&tmp).at(&tmp)?;
    }
    barrier("directory made")?;
    // Under ZeRO-0 (one shard) only rank 0 writes; otherwise shard r is rank r's.
    if rank < shards {
        let path = tmp.join(shard_file(rank, shards));
        let written = fault::check_io(Fault::Checkpoint, step, &path).and_then(|_| write_safetensors(&path, &state.tensors));
        if written.is_err() {
            let _ = std::fs::remove_file(&path); // give the space back; the previous checkpoint stays
        }
        written?;
    }
    barrier("every shard written")?;
    fault_injection_stall(step);
    if rank == 0 {
        write_atomic(&tmp.join("meta.json"), text.as_bytes())?;
        publish_dir(&tmp, &final_dir)?;
        write_atomic(&root.join("latest"), final_dir.file_name().unwrap().to_string_lossy().as_bytes())?;
        prune(root, keep, step)?;
    }
    barrier("published")?;
    Ok(final_dir)
}

/// Bytes of one shard file: the fp32 tensors and a header (names, shapes, offsets).
fn shard_bytes(tensors: &[(String, Tensor)]) -> u64 {
    tensors.iter().map(|(n, t)| t.numel() as u64 * 4 + n.len() as u64 + 96).sum::<u64>() + 64
}

/// Refuse to start a checkpoint the filesystem has no room for, naming the path and the bytes.
fn check_free_space(root: &Path, needed: u64, step: u64) -> Result<()> {
    let free = free_bytes(root)?;
    if free < needed {
        let msg = format!(
            "no room for the checkpoint of step {step}: it needs {needed} bytes ({}), the filesystem has {free} bytes ({}) free; \
             free some space, or keep fewer checkpoints (train.keep_checkpoints; the oldest is removed only once the new one is \
             complete); the previous checkpoint is intact",
            human_bytes(needed),
            human_bytes(free)
        );
        return Err(Error::io(root, std::io::Error::new(std::io::ErrorKind::StorageFull, msg)));
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| Error::format(path, e.to_string()))?;
    // SAFETY: a zeroed statvfs filled by the call; `c` is a valid NUL-terminated path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Fault injection for the crash-consistency test: with `UNLEARN_FAULT_STALL_CHECKPOINT=N` the
/// save of step N stops after the shard files are written (before meta.json and the rename), says
/// so on stderr and waits to be killed. Never set in normal use.
fn fault_injection_stall(step: u64) {
    if std::env::var("UNLEARN_FAULT_STALL_CHECKPOINT").ok().and_then(|v| v.parse::<u64>().ok()) == Some(step) {
        eprintln!("fault injection: checkpoint of step {step} stalled mid-write");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// Keep the `keep` most recent complete checkpoints (the one of `step`, just published, among
/// them); remove older ones and the temporaries of interrupted saves of earlier steps.
fn prune(root: &Path, keep: usize, step: u64) -> Result<()> {
    let mut steps: Vec<PathBuf> = vec![];
    for e in std::fs::read_dir(root).at(root)? {
        let p = e.at(root)?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|n| n.strip_suffix(".tmp")) {
            if n.parse::<u64>().is_ok_and(|n| n < step) {
                std::fs::remove_dir_all(&p).at(&p)?;
            }
            continue;
        }
        if name.starts_with("step-") && p.join("meta.json").exists() {
            steps.push(p);
        }
    }
    steps.sort();
    while steps.len() > keep {
        let old = steps.remove(0);
        std::fs::remove_dir_all(&old).at(&old)?;
    }
    Ok(())
}

/// The checkpoint `latest` points to under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let p = root.join("latest");
    if !p.exists() {
        return Ok(None);
    }
    let name = crate::files::read_text(&p)?;
    let dir = crate::files::inside(root, name.trim(), &p)?;
    if !dir.join("meta.json").exists() {
        return Err(Error::format(&p, format!("points to {} which is not a complete checkpoint", dir.display())));
    }
    Ok(Some(dir))
}

/// Write `(name, flat tensor)` pairs into one fp32 safetensors file, fsynced; each tensor is
/// brought to the host only when its turn comes.
fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let shapes: Vec<[i64; 1]> = tensors.iter().map(|(_, t)| [t.numel() as i64]).collect();
    let entries: Vec<(&str, &[i64])> = tensors.iter().zip(&shapes).map(|((n, _), s)| (n.as_str(), &s[..])).collect();
    let mut file = SafetensorsFile::create(path, &entries, Kind::Float, None)?;
    for (_, t) in tensors {
        file.write(t)?;
    }
    file.finish()
}

/// An opened checkpoint: meta.json checked against itself and against every shard file.
pub struct Loaded {
    pub dir: PathBuf,
    pub meta: Meta,
    shards: Vec<(PathBuf, Mmap)>,
}

impl Loaded {
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text = crate::files::read_text(&meta_path)?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| Error::format(&meta_path, format!("not a checkpoint meta file: {e}")))?;
        check_meta(&meta, dir).map_err(|msg| Error::format(&meta_path, msg))?;
        let n = meta.layout.shards;
        let shard_len = meta.layout.shard_len() as usize;
        let mut shards = vec![];
        for r in 0..n {
            let path = dir.join(shard_file(r, n));
            if !path.exists() {
                return Err(Error::format(&path, format!("checkpoint shard {r} of {n} is missing (meta.json lists {n} shards)")));
            }
            let file = crate::files::open_regular(&path)?;
            // SAFETY: read-only map of a file we do not modify.
            let mmap = unsafe { Mmap::map(&file) }.at(&path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::format(&path, format!("corrupt checkpoint shard: {e}")))?;
            for name in &meta.tensors {
                let view = st.tensor(name).map_err(|e| Error::format(&path, format!("state `{name}` (listed in meta.json): {e}")))?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape() != [shard_len] {
                    return Err(Error::format(
                        &path,
                        format!(
                            "state `{name}` is {:?} of shape {:?}; meta.json's layout needs F32 of shape [{shard_len}]",
                            view.dtype(),
                            view.shape()
                        ),
                    ));
                }
            }
            shards.push((path, mmap));
        }
        Ok(Loaded { dir: dir.to_path_buf(), meta, shards })
    }

    pub fn tensor_names(&self) -> Vec<String> {
        self.meta.tensors.clone()
    }

    /// Fill `out` (this rank's shard of `name` under `layout`) from the old shards.
    pub fn read_shard(&self, name: &str, layout: &FlatLayout, rank: usize, out: &mut Tensor) -> Result<()> {
        if !self.meta.tensors.iter().any(|n| n == name) {
            return Err(Error::format(self.dir.join("meta.json"), format!("checkpoint has no `{name}` state")));
        }
        self.check_same_parameters(layout)?;
        // param -> list of (param_offset, len, old shard, old shard offset)
        let mut old: BTreeMap<&str, Vec<(i64, i64, usize, i64)>> = BTreeMap::new();
        let old_segments: Vec<_> = (0..self.meta.layout.shards).map(|r| (r, self.meta.layout.segments(r))).collect();
        for (r, segs) in &old_segments {
            for s in segs {
                old.entry(s.param.as_str()).or_default().push((s.param_offset, s.len, *r, s.shard_offset));
            }
        }
        // Raw little-endian f32 bytes, decoded piece by piece: nothing assumes the data section
        // is aligned (safetensors only promises that for files it wrote itself).
        let views: Vec<&[u8]> = self
            .shards
            .iter()
            .map(|(path, mmap)| -> Result<&[u8]> {
                let st = SafeTensors::deserialize(mmap).map_err(|e| Error::format(path, e.to_string()))?;
                let view = st.tensor(name).map_err(|e| Error::format(path, format!("`{name}`: {e}")))?;
                let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                Ok(&mmap[offset..offset + view.data().len()])
            })
            .collect::<Result<_>>()?;
        let mut host = vec![0f32; layout.shard_len() as usize];
        for seg in layout.segments(rank) {
            let pieces = old
                .get(seg.param.as_str())
                .ok_or_else(|| Error::format(&self.dir, format!("checkpoint has no parameter `{}`", seg.param)))?;
            let (lo, hi) = (seg.param_offset, seg.param_offset + seg.len);
            let mut covered = 0;
            for &(p_off, len, r, s_off) in pieces {
                let (a, b) = (lo.max(p_off), hi.min(p_off + len));
                if a < b {
                    let src = (s_off + a - p_off) as usize * 4..(s_off + b - p_off) as usize * 4;
                    let bytes = views[r]
                        .get(src)
                        .ok_or_else(|| Error::format(&self.shards[r].0, format!("`{name}` is shorter than meta.json's layout")))?;
                    let dst = &mut host[(seg.shard_offset + a - lo) as usize..(seg.shard_offset + b - lo) as usize];
                    for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                    covered += b - a;
                }
            }
            if covered != seg.len {
                return Err(Error::format(&self.dir, format!("checkpoint does not cover all of `{}`", seg.param)));
            }
        }
        let t = Tensor::from_slice(&host).to_device(out.device()).to_kind(out.kind());
        tch::no_grad(|| out.copy_(&t));
        Ok(())
    }

    /// A resumed run must train exactly the parameters the checkpoint holds: restoring a subset
    /// would silently reset the others to the base model, a superset has no saved state.
    fn check_same_parameters(&self, layout: &FlatLayout) -> Result<()> {
        let saved: BTreeMap<&str, &[i64]> = self.meta.layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        let now: BTreeMap<&str, &[i64]> = layout.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        if saved == now {
            return Ok(());
        }
        let only_saved = saved.keys().filter(|k| !now.contains_key(*k)).count();
        let only_now = now.keys().filter(|k| !saved.contains_key(*k)).count();
        let example = saved.iter().find(|(k, v)| now.get(*k) != Some(*v)).or_else(|| now.iter().find(|(k, _)| !saved.contains_key(*k)));
        Err(Error::format(
            self.dir.join("meta.json"),
            format!(
                "the checkpoint holds {} trainable parameters, this run trains {} ({only_saved} only in the checkpoint, {only_now} only in this run, e.g. `{}`); \
                 resume with the model and `model.trainable` of the run that wrote it",
                saved.len(),
                now.len(),
                example.map(|(k, _)| *k).unwrap_or_default()
            ),
        ))
    }
}

/// meta.json must describe a layout that can be read: consistent buckets and parameters, at least
/// one shard, the master weights among the states, and the step its directory is named after.
fn check_meta(meta: &Meta, dir: &Path) -> std::result::Result<(), String> {
    if let Some(n) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse::<u64>().ok()) {
        if n != meta.step {
            return Err(format!("`step` is {}, but the checkpoint directory is {}", meta.step, dir.display()));
        }
    }
    if !meta.tensors.iter().any(|t| t == "master") {
        return Err(format!("`tensors` {:?} lacks the master weights `master`", meta.tensors));
    }
    check_layout(&meta.layout).map_err(|m| format!("`layout`: {m}"))
}

fn check_layout(l: &FlatLayout) -> std::result::Result<(), String> {
    if l.shards == 0 || l.shards > 1 << 20 {
        return Err(format!("`shards` must be in 1..=2^20, got {}", l.shards));
    }
    let mut offset = 0i64;
    let mut next_param = 0usize;
    for (bi, b) in l.buckets.iter().enumerate() {
        if b.offset != offset || b.params.start != next_param || b.params.end < b.params.start || b.params.end > l.params.len() {
            return Err(format!("bucket {bi} does not follow the previous one"));
        }
        if b.len < 0 || b.padded < b.len || b.padded % l.shards as i64 != 0 || b.padded - b.len >= l.shards as i64 {
            return Err(format!("bucket {bi}: length {} and padded length {} do not fit {} shards", b.len, b.padded, l.shards));
        }
        let mut p_off = b.offset;
        for (pi, p) in l.params[b.params.clone()].iter().enumerate() {
            let numel = p.shape.iter().try_fold(1i64, |acc, &d| if d >= 0 { acc.checked_mul(d) } else { None });
            if numel != Some(p.numel) || p.offset != p_off || p.bucket != bi {
                return Err(format!("parameter `{}` (#{}) does not match its shape or place in bucket {bi}", p.name, b.params.start + pi));
            }
            p_off += p.numel;
        }
        if p_off - b.offset != b.len {
            return Err(format!("bucket {bi}: its parameters do not add up to its length {}", b.len));
        }
        offset = offset.checked_add(b.padded).filter(|&o| o <= 1 << 42).ok_or("more than 2^42 elements")?;
        next_param = b.params.end;
    }
    if next_param != l.params.len() || offset != l.total {
        return Err(format!("buckets cover {next_param} of {} parameters and {offset} of {} elements", l.params.len(), l.total));
    }
    let mut names: Vec<&str> = l.params.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("parameter `{}` appears twice", w[0]));
    }
    Ok(())
}
