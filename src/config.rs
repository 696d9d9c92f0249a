//! `unlearn run` configuration: TOML files in configs/, overridable with `--set key=value`.
//!
//! Parsing is done by hand over the TOML tree rather than by serde so that every error can name
//! the file, the dotted key and the allowed values ("configs/x.toml: `optim.name`: unknown value
//! \"adam\" (allowed: adamw, sgd)"). Keys that do not apply to the chosen method are rejected too:
//! a typo must never silently fall back to a default.
//!
//! Every choice is parsed here, once, into an enum ([`Choice`]); nothing downstream compares
//! configuration strings. The `[method]` section belongs to the method: `method.name` picks a
//! registration from `methods::REGISTRY`, whose parser reads its keys through a [`Section`] (the
//! keys it reads are the keys it accepts) into its own typed settings.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind};
use toml::{Table, Value};

use crate::data::loader::Sampling;
use crate::data::{Overflow, TemplateKind};
use crate::dist::Backend;
use crate::error::{Error, Result};
use crate::methods::{self, MethodCfg, Objective};
use crate::model::ParamRole;
use crate::optim::ScheduleKind;

/// The methods `method.name` accepts (the registry's names).
pub const METHODS: &[&str] = methods::NAMES;

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub model: ModelCfg,
    pub data: DataCfg,
    pub method: MethodCfg,
    pub optim: OptimCfg,
    pub train: TrainCfg,
    pub dist: DistCfg,
    /// `[eval]`, `[stop]` and `[best]`: evaluation inside the run and what it decides.
    #[serde(flatten)]
    pub monitor: crate::monitor::config::MonitorCfg,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCfg {
    pub path: PathBuf,
    /// Compute dtype of the student (master weights, optimizer state and teacher are fp32).
    pub dtype: Dtype,
    pub device: DeviceChoice,
    /// Which parameters train.
    pub trainable: Trainable,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataCfg {
    pub forget: Vec<PathBuf>,
    pub retain: Vec<PathBuf>,
    pub forget_limit: Option<usize>,
    pub retain_limit: Option<usize>,
    /// Token length of retain/pretraining examples (defaults to `train.max_len`); the
    /// mean-teacher recipe uses 1024-token forget articles and 512-token pretraining chunks.
    pub retain_max_len: Option<usize>,
    /// How forget texts longer than `train.max_len` are handled: truncate or chunk.
    pub forget_overflow: Overflow,
    pub retain_overflow: Overflow,
    /// `shuffle` (epoch permutations) or `replacement` (i.i.d. draws, as mt-unlearn's RandomSampler).
    pub sampling: Sampling,
    /// Prompt format of QA records (see `data::template`); evaluation of the result uses the same.
    pub template: TemplateKind,
}

/// Where one objective's examples come from.
pub struct DataSource<'a> {
    pub paths: &'a [PathBuf],
    pub limit: Option<usize>,
    pub max_len: usize,
    pub overflow: Overflow,
}

impl DataCfg {
    /// The files, limit, token length and overflow rule of `obj`'s data set.
    pub fn source(&self, obj: Objective, train_max_len: usize) -> DataSource<'_> {
        match obj {
            Objective::Forget => {
                DataSource { paths: &self.forget, limit: self.forget_limit, max_len: train_max_len, overflow: self.forget_overflow }
            }
            Objective::Retain => DataSource {
                paths: &self.retain,
                limit: self.retain_limit,
                max_len: self.retain_max_len.unwrap_or(train_max_len),
                overflow: self.retain_overflow,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OptimCfg {
    pub name: OptimName,
    pub lr: f64,
    pub betas: (f64, f64),
    #[serde(rename = "eps")]
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Global gradient-norm clip of the update direction (0 = off).
    pub clip_norm: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainCfg {
    pub steps: u64,
    /// Global micro-batch size (sequences per micro-step, summed over ranks).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub seed: u64,
    pub out_dir: PathBuf,
    pub log_every: u64,
    pub checkpoint_every: u64,
    /// Complete checkpoints kept (the oldest is removed only once a newer one is complete).
    pub keep_checkpoints: usize,
    /// Consecutive steps with a non-finite loss or gradient norm that are skipped (no update)
    /// before the run stops with an error.
    pub max_skipped_steps: u64,
    /// Recompute each layer in backward instead of keeping activations (tch has no checkpointing).
    pub recompute: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DistCfg {
    pub backend: Backend,
    pub zero: u8,
    pub bucket_mb: f64,
    pub teacher: TeacherMode,
    pub verify_every: u64,
    /// When gradients are reduced: once per optimizer step, or every micro-batch (ZeRO-2/3).
    pub reduce: ReduceMode,
    /// The dtype gradients travel in when reduced over ranks (accumulation is fp32 either way).
    pub reduce_dtype: Dtype,
    /// Run collectives while backward computes (false: wait for each as soon as it is issued).
    pub overlap: bool,
    /// Seconds a collective may take before the watchdog ends the job.
    pub timeout_s: f64,
}

/// A configuration choice: a closed set of values, each with the one name configs spell it by.
pub trait Choice: Copy + PartialEq + 'static {
    /// Every value with its name, in the order error messages list them.
    const VALUES: &'static [(&'static str, Self)];

    fn name(self) -> &'static str {
        Self::VALUES.iter().find(|(_, v)| *v == self).map(|(n, _)| *n).expect("every value of a choice is named")
    }
    fn from_name(name: &str) -> Option<Self> {
        Self::VALUES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
    fn names() -> Vec<&'static str> {
        Self::VALUES.iter().map(|(n, _)| *n).collect()
    }
}

/// A choice given on a command line (clap's `value_parser`), with the allowed names on error.
pub fn parse_choice<C: Choice>(s: &str) -> std::result::Result<C, String> {
    C::from_name(s).ok_or_else(|| format!("unknown value {s:?} (allowed: {})", C::names().join(", ")))
}

/// Names the values of an enum for configs ([`Choice`]) and serializes each by its name.
macro_rules! choice {
    ($ty:ty { $($name:literal => $value:expr),+ $(,)? }) => {
        impl $crate::config::Choice for $ty {
            const VALUES: &'static [(&'static str, Self)] = &[$(($name, $value)),+];
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str($crate::config::Choice::name(*self))
            }
        }
    };
}
pub(crate) use choice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Fp32,
    Bf16,
}
choice!(Dtype { "fp32" => Dtype::Fp32, "bf16" => Dtype::Bf16 });

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::Fp32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when libtorch sees a GPU, else the CPU.
    Auto,
    Cpu,
    Cuda,
}
choice!(DeviceChoice { "auto" => DeviceChoice::Auto, "cpu" => DeviceChoice::Cpu, "cuda" => DeviceChoice::Cuda });

impl DeviceChoice {
    /// The device this rank computes on (a rank's own GPU among the node's).
    pub fn resolve(self) -> Result<Device> {
        let device = match self {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Cuda => {
                return Err(crate::other!("model.device = \"cuda\", but libtorch sees no GPU (built without the `cuda` feature?)"))
            }
        };
        crate::dist::rank_device(device)
    }
}

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Attention and MLP matrices only (embeddings, head, norms and biases frozen, as the
    /// mean-teacher recipe does for every method); the roles come from `model::layout`.
    Matrices,
    /// Every parameter.
    All,
}
choice!(Trainable { "matrices" => Trainable::Matrices, "all" => Trainable::All });

impl Trainable {
    pub fn includes(self, role: ParamRole) -> bool {
        self == Trainable::All || role == ParamRole::Matrix
    }
}

choice!(Overflow { "truncate" => Overflow::Truncate, "chunk" => Overflow::Chunk, "chunk-exact" => Overflow::ChunkExact });

/// `Sampling` serializes itself (kebab-case, the same names).
impl Choice for Sampling {
    const VALUES: &'static [(&'static str, Self)] = &[("shuffle", Sampling::Shuffle), ("replacement", Sampling::Replacement)];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimName {
    AdamW,
    Sgd,
}
choice!(OptimName { "adamw" => OptimName::AdamW, "sgd" => OptimName::Sgd });

choice!(ScheduleKind {
    "constant" => ScheduleKind::Constant,
    "linear-warmup" => ScheduleKind::LinearWarmup,
    "mt-warmup" => ScheduleKind::MtWarmup,
    "cosine" => ScheduleKind::Cosine,
});

choice!(Backend { "auto" => Backend::Auto, "none" => Backend::None, "mpi" => Backend::Mpi, "nccl" => Backend::Nccl });

/// Where the teacher's compute-dtype weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherMode {
    /// All-gathered after every EMA update into a full copy in the compute dtype.
    Replica,
    /// Gathered layer by layer for each teacher forward.
    Gather,
}
choice!(TeacherMode { "replica" => TeacherMode::Replica, "gather" => TeacherMode::Gather });

/// When gradients are reduced over ranks (`dist.reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceMode {
    /// `step` when a full-length fp32 gradient buffer fits the memory plan, else `micro-batch`.
    Auto,
    /// Accumulate micro-batches locally in fp32 and reduce once per optimizer step.
    Step,
    /// Reduce-scatter every micro-batch into the shard (ZeRO-2/3: no full-length gradient buffer).
    MicroBatch,
}
choice!(ReduceMode { "auto" => ReduceMode::Auto, "step" => ReduceMode::Step, "micro-batch" => ReduceMode::MicroBatch });

impl RunConfig {
    /// Read a TOML file and apply `--set key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table = read_table(path)?;
        apply_overrides(&mut table, overrides)?;
        Self::from_table(&table, &path.display().to_string(), true)
    }

    /// Validate a parsed table. Relative paths in the file are taken relative to the current
    /// directory (configs are run from the repository root, as README shows).
    pub fn from_table(t: &Table, file: &str, check_paths: bool) -> Result<Self> {
        let root = Section::new(file, "", t);
        root.only(&["model", "data", "method", "optim", "train", "dist", "eval", "stop", "best"])?;
        let model = root.section("model")?;
        let data = root.section("data")?;
        let method = root.section("method")?;
        let optim = root.section("optim")?;
        let train = root.section("train")?;
        let dist = root.section("dist")?;

        let registration = method.required_choice("name", METHODS, methods::lookup)?;
        let method_cfg = (registration.parse)(&method)?;
        method.only_read(&format!("method `{}`", registration.name))?;
        let spec = method_cfg.spec();

        model.only(&["path", "dtype", "device", "trainable"])?;
        let model_cfg = ModelCfg {
            path: model.model_dir("path")?.ok_or_else(|| model.missing("path"))?,
            dtype: model.choice("dtype", Dtype::Fp32)?,
            device: model.choice("device", DeviceChoice::Auto)?,
            // The method's own recipe decides what trains unless the config says.
            trainable: model.choice("trainable", spec.trainable)?,
        };

        data.only(&[
            "forget",
            "retain",
            "forget_limit",
            "retain_limit",
            "retain_max_len",
            "forget_overflow",
            "retain_overflow",
            "sampling",
            "template",
        ])?;
        let data_cfg = DataCfg {
            forget: data.paths("forget")?,
            retain: data.paths("retain")?,
            forget_limit: data.opt_int("forget_limit", 1)?.map(|v| v as usize),
            retain_limit: data.opt_int("retain_limit", 1)?.map(|v| v as usize),
            retain_max_len: data.opt_int("retain_max_len", 2)?.map(|v| v as usize),
            forget_overflow: data.choice("forget_overflow", Overflow::Truncate)?,
            retain_overflow: data.choice("retain_overflow", Overflow::Chunk)?,
            sampling: data.choice("sampling", Sampling::Shuffle)?,
            template: data.choice("template", TemplateKind::PhiQa)?,
        };
        for obj in spec.objectives() {
            let (key, paths) = match obj {
                Objective::Forget => ("data.forget", &data_cfg.forget),
                Objective::Retain => ("data.retain", &data_cfg.retain),
            };
            if paths.is_empty() {
                return Err(Error::config(file, key, format!("method `{}` needs {}", method_cfg.name(), method_cfg.data_words(obj))));
            }
        }
        for (key, paths) in [("data.forget", &data_cfg.forget), ("data.retain", &data_cfg.retain)] {
            for p in paths.iter().filter(|_| check_paths) {
                if !p.exists() {
                    let hint = if p.is_relative() {
                        format!(
                            " (relative paths are taken from the current directory, {})",
                            std::env::current_dir().unwrap_or_default().display()
                        )
                    } else {
                        String::new()
                    };
                    return Err(Error::config(file, key, format!("file not found: {}{hint}", p.display())));
                }
            }
        }
        if check_paths {
            check_forget_is_not_retain(file, &data_cfg)?;
        }
        for (key, dir) in method_cfg.model_dirs() {
            if check_paths && !dir.join("config.json").exists() {
                return Err(Error::config(
                    file,
                    format!("method.{key}"),
                    format!("{} is not an HF model directory (no config.json)", dir.display()),
                ));
            }
        }
        if check_paths && !model_cfg.path.join("config.json").exists() {
            return Err(Error::config(
                file,
                "model.path",
                format!("{} is not an HF model directory (no config.json)", model_cfg.path.display()),
            ));
        }

        optim.only(&["name", "lr", "betas", "eps", "weight_decay", "momentum", "schedule", "warmup_steps", "clip_norm"])?;
        let optim_name = optim.required_choice("name", &OptimName::names(), OptimName::from_name)?;
        let betas = optim.float_pair("betas", (0.9, 0.999))?;
        let optim_cfg = OptimCfg {
            lr: optim.float("lr", f64::NAN, Bound::Positive)?,
            betas,
            adam_eps: optim.float("eps", 1e-8, Bound::Positive)?,
            weight_decay: optim.float("weight_decay", if optim_name == OptimName::AdamW { 0.01 } else { 0.0 }, Bound::NonNegative)?,
            momentum: optim.float("momentum", 0.0, Bound::UnitInterval)?,
            schedule: optim.choice("schedule", ScheduleKind::Constant)?,
            warmup_steps: optim.int("warmup_steps", 0, 0)?,
            clip_norm: optim.float("clip_norm", 0.0, Bound::NonNegative)?,
            name: optim_name,
        };
        if optim_cfg.lr.is_nan() {
            return Err(optim.missing("lr"));
        }
        if optim_cfg.clip_norm > 0.0 && spec.clips_itself {
            return Err(optim.err(
                "clip_norm",
                format!(
                    "cannot be used with method `{}`: it clips its own update (method.clip) and scales its teacher's EMA rate \
                     by that clip factor, so a second clip would shrink the rate as well; set method.clip instead",
                    method_cfg.name()
                ),
            ));
        }

        train.only(&[
            "steps",
            "batch_size",
            "grad_accum",
            "max_len",
            "seed",
            "out_dir",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_skipped_steps",
            "recompute",
        ])?;
        let train_cfg = TrainCfg {
            steps: train.int("steps", 0, 1)?,
            batch_size: train.int("batch_size", 0, 1)? as usize,
            grad_accum: train.int("grad_accum", 1, 1)? as usize,
            max_len: train.int("max_len", 512, 2)? as usize,
            seed: train.int("seed", 0, 0)?,
            out_dir: train.path("out_dir")?.ok_or_else(|| train.missing("out_dir"))?,
            log_every: train.int("log_every", 1, 1)?,
            checkpoint_every: train.int("checkpoint_every", 0, 0)?,
            keep_checkpoints: train.int("keep_checkpoints", 2, 1)? as usize,
            max_skipped_steps: train.int("max_skipped_steps", 5, 0)?,
            recompute: train.boolean("recompute", false)?,
        };
        for key in ["steps", "batch_size"] {
            if train.table.get(key).is_none() {
                return Err(train.missing(key));
            }
        }
        check_batch_bounds(&train, &train_cfg, data_cfg.retain_max_len)?;

        dist.only(&["backend", "zero", "bucket_mb", "teacher", "verify_every", "timeout_s", "reduce", "reduce_dtype", "overlap"])?;
        let zero = dist.int("zero", 0, 0)?;
        if zero > 3 {
            return Err(dist.err("zero", format!("must be 0, 1, 2 or 3, got {zero}")));
        }
        let reduce = dist.choice("reduce", ReduceMode::Auto)?;
        if reduce == ReduceMode::MicroBatch && zero < 2 {
            return Err(dist.err(
                "reduce",
                format!(
                    "\"micro-batch\" keeps only this rank's shard of the gradient, which needs dist.zero = 2 or 3 \
                     (ZeRO-{zero} holds the full gradient anyway: use \"step\" or \"auto\")"
                ),
            ));
        }
        let dist_cfg = DistCfg {
            backend: dist.choice("backend", Backend::Auto)?,
            zero: zero as u8,
            bucket_mb: dist.float("bucket_mb", 25.0, Bound::Positive)?,
            teacher: dist.choice("teacher", TeacherMode::Replica)?,
            verify_every: dist.int("verify_every", 0, 0)?,
            reduce,
            reduce_dtype: dist.choice("reduce_dtype", Dtype::Fp32)?,
            overlap: dist.boolean("overlap", true)?,
            timeout_s: dist.float("timeout_s", crate::dist::watchdog::DEFAULT_TIMEOUT_S, Bound::Positive)?,
        };
        let monitor = crate::monitor::config::parse(&root, &model_cfg.path, &train_cfg.out_dir, check_paths)?;
        Ok(RunConfig { model: model_cfg, data: data_cfg, method: method_cfg, optim: optim_cfg, train: train_cfg, dist: dist_cfg, monitor })
    }

    /// The resolved config as TOML, written next to the run's outputs (and read back by
    /// `--resume`): every default made explicit, only the method keys the method accepts.
    pub fn to_toml(&self) -> String {
        let table = Table::try_from(self).expect("config serializes to TOML");
        toml::to_string_pretty(&table).expect("config serializes to TOML")
    }
}

/// Largest global micro-batch, in sequences and in tokens (`batch_size × max_len`). Far above any
/// real run (64 GPUs × 64 sequences × 8k tokens is 2^25 tokens), and checked before the loader
/// allocates index vectors and batches from them.
pub const MAX_BATCH_SEQUENCES: u64 = 1 << 20;
pub const MAX_BATCH_TOKENS: u64 = 1 << 31;
/// Longest sequence accepted (a few times the longest context of current models).
pub const MAX_LEN: u64 = 1 << 20;

fn check_batch_bounds(train: &Section, t: &TrainCfg, retain_max_len: Option<usize>) -> Result<()> {
    if t.batch_size as u64 > MAX_BATCH_SEQUENCES {
        return Err(
            train.err("batch_size", format!("{} is above the limit of {MAX_BATCH_SEQUENCES} sequences per micro-batch", t.batch_size))
        );
    }
    let longest = t.max_len.max(retain_max_len.unwrap_or(0)) as u64;
    if longest > MAX_LEN {
        return Err(
            train.err("max_len", format!("{longest} tokens (train.max_len or data.retain_max_len) is above the limit of {MAX_LEN}"))
        );
    }
    if t.batch_size as u64 * longest > MAX_BATCH_TOKENS {
        return Err(train.err(
            "batch_size",
            format!("{} sequences of up to {longest} tokens is above the limit of 2^31 tokens per micro-batch", t.batch_size),
        ));
    }
    Ok(())
}

/// Forgetting a set while training to keep the very same set cancels out (GradDiff's direction is
/// zero, NGDiff's is undefined): the same file, or files with identical content, is an error.
fn check_forget_is_not_retain(file: &str, d: &DataCfg) -> Result<()> {
    for f in &d.forget {
        for r in &d.retain {
            if crate::files::same_content(f, r).map_err(|e| Error::config(file, "data.retain", e.to_string()))? {
                return Err(Error::config(
                    file,
                    "data.retain",
                    format!(
                        "{} has the same content as the forget file {}; the forget and retain sets must differ",
                        r.display(),
                        f.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `data.template` of a run's saved config.toml (`None` when unset), checked as `unlearn run` checks it.
pub fn saved_template(path: &Path) -> Result<Option<TemplateKind>> {
    let table = read_table(path)?;
    let file = path.display().to_string();
    Section::new(&file, "", &table).section("data")?.opt_choice("template", &TemplateKind::names(), TemplateKind::from_name)
}

/// Parse a TOML file; a syntax error keeps its line, column and the offending text.
pub fn read_table(path: &Path) -> Result<Table> {
    let text = crate::files::read_text(path)?;
    text.parse().map_err(|e: toml::de::Error| Error::format(path, e.to_string().trim_end().to_string()))
}

/// Apply `key=value` overrides; the value is parsed as TOML (`1e-5`, `true`, `"x"`, `[1, 2]`),
/// and taken as a bare string if that fails (`--set data.forget=a.json`).
pub fn apply_overrides(table: &mut Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, raw) = o.split_once('=').ok_or_else(|| Error::config("--set", o.clone(), "expected key=value"))?;
        let key = key.trim();
        let value: Value =
            format!("v = {raw}").parse::<Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| Value::String(raw.to_string()));
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().filter(|s| !s.is_empty()).ok_or_else(|| Error::config("--set", key, "empty key"))?;
        let mut cur = &mut *table;
        for p in parts {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .ok_or_else(|| Error::config("--set", key, format!("`{p}` is not a table")))?;
        }
        cur.insert(last.to_string(), value);
    }
    Ok(())
}

/// What a number must be.
#[derive(Clone, Copy)]
pub enum Bound {
    Positive,
    NonNegative,
    UnitInterval,
}

/// A view of one `[section]` of the config with typed, error-naming getters. It remembers the
/// keys it was asked for, so that a section whose keys are stated only by the code that reads
/// them (a method's) can still reject every other key ([`Section::only_read`]).
pub struct Section<'a> {
    file: &'a str,
    prefix: &'a str,
    table: &'a Table,
    read: RefCell<Vec<String>>,
}

static EMPTY: std::sync::LazyLock<Table> = std::sync::LazyLock::new(Table::new);

impl<'a> Section<'a> {
    fn new(file: &'a str, prefix: &'a str, table: &'a Table) -> Self {
        Section { file, prefix, table, read: RefCell::new(vec![]) }
    }
    fn key(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }
    /// The value of `k`, noting that the key is known.
    pub(crate) fn get(&self, k: &str) -> Option<&'a Value> {
        let mut read = self.read.borrow_mut();
        if !read.iter().any(|r| r == k) {
            read.push(k.to_string());
        }
        self.table.get(k)
    }
    /// The config file (for errors about keys below this section).
    pub(crate) fn file(&self) -> &'a str {
        self.file
    }
    /// The section's own keys and values.
    pub(crate) fn table(&self) -> &'a Table {
        self.table
    }
    pub fn err(&self, k: &str, msg: impl Into<String>) -> Error {
        Error::config(self.file, self.key(k), msg)
    }
    pub(crate) fn missing(&self, k: &str) -> Error {
        self.err(k, "is required")
    }
    pub(crate) fn section(&self, name: &'a str) -> Result<Section<'a>> {
        let table = match self.table.get(name) {
            None => &*EMPTY,
            Some(Value::Table(t)) => t,
            Some(_) => return Err(self.err(name, "must be a table")),
        };
        Ok(Section::new(self.file, name, table))
    }
    pub(crate) fn only(&self, allowed: &[&str]) -> Result<()> {
        self.only_for(allowed, "")
    }
    fn only_for(&self, allowed: &[&str], context: &str) -> Result<()> {
        let allowed_set: BTreeSet<&str> = allowed.iter().copied().collect();
        for k in self.table.keys() {
            if !allowed_set.contains(k.as_str()) {
                let ctx = if context.is_empty() { String::new() } else { format!(" for {context}") };
                return Err(self.err(k, format!("unknown key{ctx} (allowed: {})", allowed.join(", "))));
            }
        }
        Ok(())
    }
    /// Reject every key no getter asked for.
    fn only_read(&self, context: &str) -> Result<()> {
        let read = self.read.borrow().clone();
        self.only_for(&read.iter().map(String::as_str).collect::<Vec<_>>(), context)
    }
    pub fn choice<C: Choice>(&self, k: &str, default: C) -> Result<C> {
        Ok(self.opt_choice(k, &C::names(), C::from_name)?.unwrap_or(default))
    }
    fn required_choice<T>(&self, k: &str, names: &[&str], lookup: impl Fn(&str) -> Option<T>) -> Result<T> {
        self.opt_choice(k, names, lookup)?.ok_or_else(|| self.missing(k))
    }
    fn opt_choice<T>(&self, k: &str, names: &[&str], lookup: impl Fn(&str) -> Option<T>) -> Result<Option<T>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_str().and_then(&lookup) {
                Some(c) => Ok(Some(c)),
                None => Err(self.err(k, format!("unknown value {v} (allowed: {})", names.join(", ")))),
            },
        }
    }
    pub fn float(&self, k: &str, default: f64, bound: Bound) -> Result<f64> {
        let v = match self.get(k) {
            None => return Ok(default),
            Some(Value::Float(f)) => *f,
            Some(Value::Integer(i)) => *i as f64,
            Some(v) => return Err(self.err(k, format!("expected a number, got {v}"))),
        };
        let ok = match bound {
            Bound::Positive => v > 0.0 && v.is_finite(),
            Bound::NonNegative => v >= 0.0 && v.is_finite(),
            Bound::UnitInterval => (0.0..=1.0).contains(&v),
        };
        if !ok {
            let want = match bound {
                Bound::Positive => "a finite number > 0",
                Bound::NonNegative => "a finite number >= 0",
                Bound::UnitInterval => "a number in [0, 1]",
            };
            return Err(self.err(k, format!("must be {want}, got {v}")));
        }
        Ok(v)
    }
    fn float_pair(&self, k: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.get(k) {
            None => Ok(default),
            Some(Value::Array(a)) if a.len() == 2 => {
                let f = |v: &Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                match (f(&a[0]), f(&a[1])) {
                    (Some(x), Some(y)) if (0.0..1.0).contains(&x) && (0.0..1.0).contains(&y) => Ok((x, y)),
                    _ => Err(self.err(k, "expected two numbers in [0, 1)")),
                }
            }
            Some(v) => Err(self.err(k, format!("expected [beta1, beta2], got {v}"))),
        }
    }
    pub fn int(&self, k: &str, default: u64, min: u64) -> Result<u64> {
        Ok(self.opt_int(k, min)?.unwrap_or(default))
    }
    fn opt_int(&self, k: &str, min: u64) -> Result<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= min as i64 => Ok(Some(*i as u64)),
            Some(Value::Integer(i)) => Err(self.err(k, format!("must be an integer >= {min}, got {i}"))),
            Some(v) => Err(self.err(k, format!("expected an integer, got {v}"))),
        }
    }
    pub fn boolean(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.err(k, format!("expected true or false, got {v}"))),
        }
    }
    pub fn path(&self, k: &str) -> Result<Option<PathBuf>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => expand(s).map(Some).map_err(|m| self.err(k, m)),
            Some(v) => Err(self.err(k, format!("expected a path string, got {v}"))),
        }
    }
    /// A model directory, or a hub id `org/name` resolved from the local Hugging Face cache.
    pub fn model_dir(&self, k: &str) -> Result<Option<PathBuf>> {
        self.path(k)?.map(|p| crate::model::hub::resolve_model(&p).map_err(|m| self.err(k, m))).transpose()
    }
    fn paths(&self, k: &str) -> Result<Vec<PathBuf>> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![expand(s).map_err(|m| self.err(k, m))?]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) => expand(s).map_err(|m| self.err(k, m)),
                    None => Err(self.err(k, "expected a list of path strings")),
                })
                .collect(),
            Some(v) => Err(self.err(k, format!("expected a path or a list of paths, got {v}"))),
        }
    }
}

/// `$VAR` and `${VAR}` expansion in paths, so shipped configs can say `${UNLEARN_CACHE}/models/...`
/// (`UNLEARN_CACHE` defaults to `~/.cache/unlearn`, as in launch/setup.sh). An unset variable is an
/// error: silently expanding it to nothing would only show up later as a puzzling missing file.
pub(crate) fn expand(s: &str) -> std::result::Result<PathBuf, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(inner) = after.strip_prefix('{') {
            match inner.find('}') {
                Some(j) => (&inner[..j], &inner[j + 1..]),
                None => (inner, ""),
            }
        } else {
            let j = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..j], &after[j..])
        };
        let default_cache = || std::env::var("HOME").map(|h| format!("{h}/.cache/unlearn")).unwrap_or_default();
        let value = match std::env::var(name) {
            Ok(v) => v,
            Err(_) if name == "UNLEARN_CACHE" => default_cache(),
            Err(_) => return Err(format!("environment variable `{name}` in `{s}` is not set")),
        };
        out.push_str(&value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(PathBuf::from(out))
}
