//! `unlearn run` configuration: TOML files in configs/, overridable with `--set key=value`.
//!
//! Parsing is done by hand over the TOML tree rather than by serde so that every error can name
//! the file, the dotted key and the allowed values ("configs/x.toml: `optim.name`: unknown value
//! \"adam\" (allowed: adamw, sgd)"). Keys that do not apply to the chosen method are rejected too:
//! a typo must never silently fall back to a default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::{Table, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub model: ModelCfg,
    pub data: DataCfg,
    pub method: MethodCfg,
    pub optim: OptimCfg,
    pub train: TrainCfg,
    pub dist: DistCfg,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCfg {
    pub path: PathBuf,
    /// Compute dtype of the student: fp32 or bf16 (master weights, optimizer state and teacher are fp32).
    pub dtype: String,
    pub device: String,
    /// `matrices`: attention and MLP matrices only (embeddings, head and norms frozen, as the
    /// mean-teacher recipe does for every method); `all`: every parameter.
    pub trainable: String,
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
    pub forget_overflow: String,
    pub retain_overflow: String,
    /// `shuffle` (epoch permutations) or `replacement` (i.i.d. draws, as mt-unlearn's RandomSampler).
    pub sampling: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodCfg {
    pub name: String,
    // graddiff
    pub forget_weight: f64,
    pub retain_weight: f64,
    // npo (and mean-teacher with forget_loss = npo)
    pub npo_beta: f64,
    pub npo_variant: String,
    pub reference_model: Option<PathBuf>,
    // ngdiff
    pub eps: f64,
    pub autolr: bool,
    pub autolr_period: u64,
    pub autolr_smoothing: f64,
    // mean teacher
    pub forget_loss: String,
    pub penalty: String,
    pub alpha: f64,
    pub beta: f64,
    pub delta: f64,
    pub damp: f64,
    pub clip: f64,
    pub tol: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OptimCfg {
    pub name: String,
    pub lr: f64,
    pub betas: (f64, f64),
    #[serde(rename = "eps")]
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub schedule: String,
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
    pub keep_checkpoints: usize,
    /// Recompute each layer in backward instead of keeping activations (tch has no checkpointing).
    pub recompute: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DistCfg {
    pub backend: String,
    pub zero: u8,
    pub bucket_mb: f64,
    /// `replica`: the teacher is all-gathered after every EMA update into a full copy in the
    /// compute dtype; `gather`: it is gathered layer by layer for each teacher forward.
    pub teacher: String,
    pub verify_every: u64,
}

pub const METHODS: &[&str] = &["finetune", "ga", "graddiff", "npo", "ngdiff", "mean-teacher"];

/// Which `method.*` keys each method accepts (besides `name`).
fn method_keys(name: &str) -> &'static [&'static str] {
    match name {
        "finetune" | "ga" => &[],
        "graddiff" => &["forget_weight", "retain_weight"],
        "npo" => &["npo_beta", "npo_variant", "reference_model", "retain_weight"],
        "ngdiff" => &["eps", "autolr", "autolr_period", "autolr_smoothing"],
        "mean-teacher" => &[
            "forget_loss", "penalty", "alpha", "beta", "delta", "damp", "clip", "tol", "npo_beta", "npo_variant",
            "reference_model",
        ],
        _ => &[],
    }
}

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
        let root = Section { file, prefix: "", table: t };
        root.only(&["model", "data", "method", "optim", "train", "dist"])?;
        let model = root.section("model")?;
        let data = root.section("data")?;
        let method = root.section("method")?;
        let optim = root.section("optim")?;
        let train = root.section("train")?;
        let dist = root.section("dist")?;

        model.only(&["path", "dtype", "device", "trainable"])?;
        let model_cfg = ModelCfg {
            path: model.path("path")?.ok_or_else(|| model.missing("path"))?,
            dtype: model.choice("dtype", &["fp32", "bf16"], "fp32")?,
            device: model.choice("device", &["auto", "cpu", "cuda"], "auto")?,
            trainable: model.choice("trainable", &["matrices", "all"], "matrices")?,
        };

        let name = method.choice("name", METHODS, "")?;
        if name.is_empty() {
            return Err(method.missing("name"));
        }
        let mut allowed: Vec<&str> = vec!["name"];
        allowed.extend(method_keys(&name));
        method.only_for(&allowed, &format!("method `{name}`"))?;
        let is_mt = name == "mean-teacher";
        let forget_loss = method.choice("forget_loss", &["nlul", "ga", "npo"], "nlul")?;
        let method_cfg = MethodCfg {
            forget_weight: method.float("forget_weight", 1.0, Bound::NonNegative)?,
            retain_weight: method.float("retain_weight", if name == "npo" { 0.0 } else { 1.0 }, Bound::NonNegative)?,
            npo_beta: method.float("npo_beta", 0.1, Bound::Positive)?,
            npo_variant: method.choice("npo_variant", &["standard", "mt-unlearn"], if is_mt { "mt-unlearn" } else { "standard" })?,
            reference_model: method.path("reference_model")?,
            eps: method.float("eps", 1e-8, Bound::Positive)?,
            autolr: method.boolean("autolr", true)?,
            autolr_period: method.int("autolr_period", 4, 1)?,
            autolr_smoothing: method.float("autolr_smoothing", 0.9, Bound::UnitInterval)?,
            forget_loss,
            penalty: method.choice("penalty", &["kl", "qkl"], "kl")?,
            alpha: method.float("alpha", 0.05, Bound::NonNegative)?,
            beta: method.float("beta", 1.0, Bound::NonNegative)?,
            delta: method.float("delta", 0.005, Bound::UnitInterval)?,
            damp: method.float("damp", 5.0, Bound::NonNegative)?,
            clip: method.float("clip", 1.0, Bound::Positive)?,
            tol: method.float("tol", 0.02, Bound::NonNegative)?,
            name,
        };

        data.only(&["forget", "retain", "forget_limit", "retain_limit", "retain_max_len", "forget_overflow", "retain_overflow", "sampling"])?;
        let data_cfg = DataCfg {
            forget: data.paths("forget")?,
            retain: data.paths("retain")?,
            forget_limit: data.opt_int("forget_limit", 1)?.map(|v| v as usize),
            retain_limit: data.opt_int("retain_limit", 1)?.map(|v| v as usize),
            retain_max_len: data.opt_int("retain_max_len", 2)?.map(|v| v as usize),
            forget_overflow: data.choice("forget_overflow", &crate::data::Overflow::NAMES, "truncate")?,
            retain_overflow: data.choice("retain_overflow", &crate::data::Overflow::NAMES, "chunk")?,
            sampling: data.choice("sampling", &["shuffle", "replacement"], "shuffle")?,
        };
        let needs_forget = method_cfg.name != "finetune";
        let needs_retain = matches!(method_cfg.name.as_str(), "finetune" | "graddiff" | "ngdiff" | "mean-teacher")
            || (method_cfg.name == "npo" && method_cfg.retain_weight > 0.0);
        if needs_forget && data_cfg.forget.is_empty() {
            return Err(Error::config(file, "data.forget", format!("method `{}` needs forget data", method_cfg.name)));
        }
        if needs_retain && data_cfg.retain.is_empty() {
            let what = if is_mt { "retain or pretraining text for the KL penalty" } else { "retain data" };
            return Err(Error::config(file, "data.retain", format!("method `{}` needs {what}", method_cfg.name)));
        }
        for (key, paths) in [("data.forget", &data_cfg.forget), ("data.retain", &data_cfg.retain)] {
            for p in paths.iter().filter(|_| check_paths) {
                if !p.exists() {
                    let hint = if p.is_relative() {
                        format!(" (relative paths are taken from the current directory, {})", std::env::current_dir().unwrap_or_default().display())
                    } else {
                        String::new()
                    };
                    return Err(Error::config(file, key, format!("file not found: {}{hint}", p.display())));
                }
            }
        }
        if let Some(r) = method_cfg.reference_model.as_ref().filter(|r| check_paths && !r.join("config.json").exists()) {
            return Err(Error::config(file, "method.reference_model", format!("{} is not an HF model directory (no config.json)", r.display())));
        }
        if check_paths && !model_cfg.path.join("config.json").exists() {
            return Err(Error::config(
                file,
                "model.path",
                format!("{} is not an HF model directory (no config.json)", model_cfg.path.display()),
            ));
        }

        optim.only(&["name", "lr", "betas", "eps", "weight_decay", "momentum", "schedule", "warmup_steps", "clip_norm"])?;
        let optim_name = optim.choice("name", &["adamw", "sgd"], "")?;
        if optim_name.is_empty() {
            return Err(optim.missing("name"));
        }
        let betas = optim.float_pair("betas", (0.9, 0.999))?;
        let optim_cfg = OptimCfg {
            lr: optim.float("lr", f64::NAN, Bound::Positive)?,
            betas,
            adam_eps: optim.float("eps", 1e-8, Bound::Positive)?,
            weight_decay: optim.float("weight_decay", if optim_name == "adamw" { 0.01 } else { 0.0 }, Bound::NonNegative)?,
            momentum: optim.float("momentum", 0.0, Bound::UnitInterval)?,
            schedule: optim.choice("schedule", &["constant", "linear-warmup", "mt-warmup", "cosine"], "constant")?,
            warmup_steps: optim.int("warmup_steps", 0, 0)?,
            clip_norm: optim.float("clip_norm", 0.0, Bound::NonNegative)?,
            name: optim_name,
        };
        if optim_cfg.lr.is_nan() {
            return Err(optim.missing("lr"));
        }

        train.only(&[
            "steps", "batch_size", "grad_accum", "max_len", "seed", "out_dir", "log_every", "checkpoint_every",
            "keep_checkpoints", "recompute",
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
            recompute: train.boolean("recompute", false)?,
        };
        for key in ["steps", "batch_size"] {
            if train.table.get(key).is_none() {
                return Err(train.missing(key));
            }
        }

        dist.only(&["backend", "zero", "bucket_mb", "teacher", "verify_every"])?;
        let zero = dist.int("zero", 0, 0)?;
        if zero > 3 {
            return Err(dist.err("zero", format!("must be 0, 1, 2 or 3, got {zero}")));
        }
        let dist_cfg = DistCfg {
            backend: dist.choice("backend", &["auto", "none", "mpi", "nccl"], "auto")?,
            zero: zero as u8,
            bucket_mb: dist.float("bucket_mb", 25.0, Bound::Positive)?,
            teacher: dist.choice("teacher", &["replica", "gather"], "replica")?,
            verify_every: dist.int("verify_every", 0, 0)?,
        };
        Ok(RunConfig { model: model_cfg, data: data_cfg, method: method_cfg, optim: optim_cfg, train: train_cfg, dist: dist_cfg })
    }

    /// The resolved config as TOML, written next to the run's outputs (and read back by
    /// `--resume`): every default made explicit, only the method keys the method accepts.
    pub fn to_toml(&self) -> String {
        let mut table = Table::try_from(self).expect("config serializes to TOML");
        if let Some(Value::Table(m)) = table.get_mut("method") {
            let keep = method_keys(&self.method.name);
            m.retain(|k, _| k == "name" || keep.contains(&k));
        }
        toml::to_string_pretty(&table).expect("config serializes to TOML")
    }
}

/// Parse a TOML file; a syntax error keeps its line, column and the offending text.
pub fn read_table(path: &Path) -> Result<Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.parse().map_err(|e: toml::de::Error| Error::format(path, e.to_string().trim_end().to_string()))
}

/// Apply `key=value` overrides; the value is parsed as TOML (`1e-5`, `true`, `"x"`, `[1, 2]`),
/// and taken as a bare string if that fails (`--set data.forget=a.json`).
pub fn apply_overrides(table: &mut Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, raw) = o
            .split_once('=')
            .ok_or_else(|| Error::config("--set", o.clone(), "expected key=value"))?;
        let key = key.trim();
        let value: Value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_string()));
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

#[derive(Clone, Copy)]
enum Bound {
    Positive,
    NonNegative,
    UnitInterval,
}

/// A view of one `[section]` of the config with typed, error-naming getters.
struct Section<'a> {
    file: &'a str,
    prefix: &'a str,
    table: &'a Table,
}

static EMPTY: std::sync::LazyLock<Table> = std::sync::LazyLock::new(Table::new);

impl<'a> Section<'a> {
    fn key(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }
    fn err(&self, k: &str, msg: impl Into<String>) -> Error {
        Error::config(self.file, self.key(k), msg)
    }
    fn missing(&self, k: &str) -> Error {
        self.err(k, "is required")
    }
    fn section(&self, name: &'a str) -> Result<Section<'a>> {
        let table = match self.table.get(name) {
            None => &*EMPTY,
            Some(Value::Table(t)) => t,
            Some(_) => return Err(self.err(name, "must be a table")),
        };
        Ok(Section { file: self.file, prefix: name, table })
    }
    fn only(&self, allowed: &[&str]) -> Result<()> {
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
    fn choice(&self, k: &str, allowed: &[&str], default: &str) -> Result<String> {
        match self.table.get(k) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(s.clone()),
            Some(v) => Err(self.err(k, format!("unknown value {v} (allowed: {})", allowed.join(", ")))),
        }
    }
    fn float(&self, k: &str, default: f64, bound: Bound) -> Result<f64> {
        let v = match self.table.get(k) {
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
        match self.table.get(k) {
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
    fn int(&self, k: &str, default: u64, min: u64) -> Result<u64> {
        Ok(self.opt_int(k, min)?.unwrap_or(default))
    }
    fn opt_int(&self, k: &str, min: u64) -> Result<Option<u64>> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= min as i64 => Ok(Some(*i as u64)),
            Some(Value::Integer(i)) => Err(self.err(k, format!("must be an integer >= {min}, got {i}"))),
            Some(v) => Err(self.err(k, format!("expected an integer, got {v}"))),
        }
    }
    fn boolean(&self, k: &str, default: bool) -> Result<bool> {
        match self.table.get(k) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.err(k, format!("expected true or false, got {v}"))),
        }
    }
    fn path(&self, k: &str) -> Result<Option<PathBuf>> {
        match self.table.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => expand(s).map(Some).map_err(|m| self.err(k, m)),
            Some(v) => Err(self.err(k, format!("expected a path string, got {v}"))),
        }
    }
    fn paths(&self, k: &str) -> Result<Vec<PathBuf>> {
        match self.table.get(k) {
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
fn expand(s: &str) -> std::result::Result<PathBuf, String> {
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
