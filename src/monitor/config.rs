//! `[eval]`, `[stop]` and `[best]` of a run config: what the run evaluates every N steps, which
//! rules stop it, and which evaluated state is kept as `best/`.
//!
//! A benchmark's options are the options of `unlearn eval <benchmark>` written as TOML keys
//! (`max_samples = 40` is `--max-samples 40`, `no_rouge = true` is `--no-rouge`, a list is the
//! comma-separated value) and are parsed by the very same clap definitions, so that the in-run
//! evaluation and `unlearn eval` cannot drift apart. The model, output, dtype, device, rank group
//! and template are the run's own and cannot be set there.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Serialize;
use toml::{Table, Value};

use crate::config::{choice, expand, Bound, Choice, Section};
use crate::error::{Error, Result};

/// The three sections together (flattened into the run config).
#[derive(Debug, Clone, Default)]
pub struct MonitorCfg {
    pub eval: EvalCfg,
    pub stop: StopCfg,
    /// `None`: no `best/` is kept.
    pub best: Option<BestCfg>,
}

#[derive(Debug, Clone, Default)]
pub struct EvalCfg {
    /// Evaluate every this many optimizer steps (and at step 0 and the last step); 0 = never.
    pub every: u64,
    /// Write every evaluated state as an HF model directory `evals/step-N/`.
    pub save_models: bool,
    pub benchmarks: Vec<BenchCfg>,
}

/// One benchmark evaluated in the run.
#[derive(Debug, Clone)]
pub struct BenchCfg {
    /// The `unlearn eval` subcommand (`tofu`, `muse`).
    pub name: String,
    /// Its `[eval.<name>]` table as written back to config.toml (paths expanded).
    pub options: Table,
    /// The same options as `unlearn eval <name>` arguments.
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StopCfg {
    /// Stop at the first evaluation (after step 0) where a metric is below its value (any of them).
    pub below: Vec<(String, f64)>,
    /// ... or above its value.
    pub above: Vec<(String, f64)>,
    pub reach: Option<Reach>,
    pub utility: Option<Floor>,
}

/// "Reach the retain model": stop once the forget statistic has been closest to the retain
/// model's and then not come closer for `patience` evaluations in a row.
#[derive(Debug, Clone)]
pub struct Reach {
    /// `bench.metric`; `tofu.forget_quality` is itself a comparison with the retain model (higher
    /// is closer), any other metric is compared with the same metric of `reference`.
    pub metric: String,
    /// The retain model's `unlearn eval` report (report.json or its directory).
    pub reference: Option<PathBuf>,
    pub patience: u64,
}

/// A metric that must stay at or above `ratio` × its value at step 0.
#[derive(Debug, Clone)]
pub struct Floor {
    pub metric: String,
    pub ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BestMode {
    Max,
    Min,
    /// Closest to the retain model, as the reach rule measures it.
    Reach,
}
choice!(BestMode { "max" => BestMode::Max, "min" => BestMode::Min, "reach" => BestMode::Reach });

/// Which evaluated state (after step 0) `best/` holds: the best `metric` by `mode` among the
/// states that pass `guard`.
#[derive(Debug, Clone)]
pub struct BestCfg {
    pub metric: String,
    pub mode: BestMode,
    pub guard: Option<Floor>,
}

impl MonitorCfg {
    pub fn is_off(&self) -> bool {
        self.eval.every == 0
    }

    /// The reference report of the reach rule (and of `best.mode = "reach"`).
    pub fn reference(&self) -> Option<&Path> {
        self.stop.reach.as_ref().and_then(|r| r.reference.as_deref())
    }
}

/// `unlearn eval`'s subcommands, parsed from a config's options.
#[derive(Parser, Debug)]
#[command(name = "eval")]
pub struct InRunEval {
    #[command(subcommand)]
    pub bench: crate::eval::Benchmarks,
}

/// Options of `unlearn eval` that the run itself decides.
const RUN_OWNED: &[&str] = &["model", "out", "overwrite", "compare", "name", "dtype", "device", "dist", "template"];

impl BenchCfg {
    /// The options parsed by `unlearn eval`'s own definitions, for `model` (its `--out` is never
    /// written: the results go to metrics.jsonl).
    pub fn parse(&self, model: &Path, out: &Path) -> std::result::Result<InRunEval, clap::Error> {
        let mut args: Vec<String> = vec!["eval".into(), self.name.clone()];
        args.extend(["--model".into(), model.display().to_string(), "--out".into(), out.join("evals").display().to_string()]);
        args.extend(self.argv.iter().cloned());
        InRunEval::try_parse_from(args)
    }
}

/// Benchmark names (`unlearn eval`'s subcommands).
fn benchmark_names() -> Vec<String> {
    use clap::CommandFactory;
    InRunEval::command().get_subcommands().map(|c| c.get_name().to_string()).collect()
}

pub fn parse(root: &Section, model: &Path, out: &Path, check_paths: bool) -> Result<MonitorCfg> {
    let eval = root.section("eval")?;
    let stop = root.section("stop")?;
    let best = root.section("best")?;
    let file = root.file();
    let names = benchmark_names();
    let mut allowed: Vec<&str> = vec!["every", "save_models"];
    allowed.extend(names.iter().map(String::as_str));
    eval.only(&allowed)?;
    let mut cfg = EvalCfg { every: eval.int("every", 0, 0)?, save_models: eval.boolean("save_models", false)?, benchmarks: vec![] };
    for name in &names {
        let Some(v) = eval.get(name) else { continue };
        let key = format!("eval.{name}");
        let t = v.as_table().ok_or_else(|| Error::config(file, &key, "must be a table of `unlearn eval` options"))?;
        cfg.benchmarks.push(bench_cfg(file, name, t, model, out)?);
    }
    if cfg.every > 0 && cfg.benchmarks.is_empty() {
        return Err(
            eval.err("every", format!("is set but no benchmark is: add a table [eval.<benchmark>] (benchmarks: {})", names.join(", ")))
        );
    }
    let metric = |s: &Section, k: &str| -> Result<Option<String>> {
        match s.get(k) {
            None => Ok(None),
            Some(Value::String(m)) => check_metric(s, k, m, &cfg).map(|_| Some(m.clone())),
            Some(v) => Err(s.err(k, format!("expected a metric name `benchmark.metric`, got {v}"))),
        }
    };

    stop.only(&["below", "above", "reach", "reference", "patience", "utility", "utility_floor"])?;
    let thresholds = |k: &str| -> Result<Vec<(String, f64)>> {
        match stop.get(k) {
            None => Ok(vec![]),
            Some(Value::Table(t)) => t
                .iter()
                .map(|(m, v)| {
                    check_metric(&stop, k, m, &cfg)?;
                    match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                        Some(x) if x.is_finite() => Ok((m.clone(), x)),
                        _ => Err(stop.err(k, format!("`{m}`: expected a number, got {v}"))),
                    }
                })
                .collect(),
            Some(v) => Err(stop.err(k, format!("expected a table {{ \"benchmark.metric\" = value }}, got {v}"))),
        }
    };
    let mut stop_cfg = StopCfg { below: thresholds("below")?, above: thresholds("above")?, reach: None, utility: None };
    let reference = stop.path("reference")?;
    if let Some(r) = reference.as_ref().filter(|r| check_paths && !r.exists()) {
        return Err(
            stop.err("reference", format!("{} not found (the retain model's `unlearn eval` report.json or its directory)", r.display()))
        );
    }
    let patience = stop.int("patience", 2, 1)?;
    if let Some(m) = metric(&stop, "reach")? {
        if reference.is_none() && !has_own_reference(&m, &cfg) {
            return Err(stop.err(
                "reach",
                format!(
                    "`{m}` is compared with the retain model's value: set stop.reference to its `unlearn eval` report (or retain_model in [eval.nll])"
                ),
            ));
        }
        stop_cfg.reach = Some(Reach { metric: m, reference, patience });
    } else if stop.get("reference").is_some() || stop.get("patience").is_some() {
        return Err(stop
            .err(if stop.get("reference").is_some() { "reference" } else { "patience" }, "belongs to the reach rule: set stop.reach too"));
    }
    let floor = stop.float("utility_floor", 0.95, Bound::UnitInterval)?;
    match metric(&stop, "utility")? {
        Some(m) => stop_cfg.utility = Some(Floor { metric: m, ratio: floor }),
        None if stop.get("utility_floor").is_some() => {
            return Err(stop.err("utility_floor", "set stop.utility (the metric it applies to) too"))
        }
        None => {}
    }

    best.only(&["metric", "mode", "guard", "guard_ratio"])?;
    let best_cfg = match metric(&best, "metric")? {
        Some(m) => {
            let mode = best.choice("mode", BestMode::Max)?;
            if mode == BestMode::Reach && stop_cfg.reach.as_ref().is_none_or(|r| r.reference.is_none()) && !has_own_reference(&m, &cfg) {
                return Err(best.err("mode", "\"reach\" compares with the retain model's report: set stop.reach and stop.reference"));
            }
            let ratio = best.float("guard_ratio", 0.95, Bound::UnitInterval)?;
            Some(BestCfg { metric: m, mode, guard: metric(&best, "guard")?.map(|g| Floor { metric: g, ratio }) })
        }
        None if !best.table().is_empty() => return Err(best.missing("metric")),
        // By default `best/` is the state the reach rule found closest (within the utility floor).
        None => {
            stop_cfg.reach.as_ref().map(|r| BestCfg { metric: r.metric.clone(), mode: BestMode::Reach, guard: stop_cfg.utility.clone() })
        }
    };
    let rules = !stop_cfg.below.is_empty() || !stop_cfg.above.is_empty() || stop_cfg.reach.is_some() || stop_cfg.utility.is_some();
    if cfg.every == 0 && (rules || best_cfg.is_some() || !cfg.benchmarks.is_empty()) {
        return Err(eval.err("every", "must be set (> 0): stop rules, [best] and [eval.<benchmark>] act on the in-run evaluation"));
    }
    Ok(MonitorCfg { eval: cfg, stop: stop_cfg, best: best_cfg })
}

/// Whether the retain model's value of metric `m` is known without `stop.reference`: Forget
/// Quality is itself a comparison with the retain model, and a benchmark given `retain_model`
/// measures that model's values at the start (`Benchmark::reference_metrics`; the monitor checks
/// there that `m` is among them).
fn has_own_reference(m: &str, cfg: &EvalCfg) -> bool {
    m.ends_with(".forget_quality")
        || m.split_once('.').is_some_and(|(b, _)| cfg.benchmarks.iter().any(|x| x.name == b && x.options.contains_key("retain_model")))
}

/// A metric must name a benchmark the run evaluates (its own name is checked at the first evaluation).
fn check_metric(s: &Section, k: &str, m: &str, cfg: &EvalCfg) -> Result<()> {
    match m.split_once('.') {
        Some((b, rest)) if !rest.is_empty() && cfg.benchmarks.iter().any(|x| x.name == b) => Ok(()),
        _ => {
            let benches: Vec<&str> = cfg.benchmarks.iter().map(|b| b.name.as_str()).collect();
            Err(s.err(
                k,
                format!(
                    "`{m}`: expected `benchmark.metric` with a benchmark the run evaluates ([eval.<benchmark>]: {})",
                    if benches.is_empty() { "none".to_string() } else { benches.join(", ") }
                ),
            ))
        }
    }
}

fn bench_cfg(file: &str, name: &str, t: &Table, model: &Path, out: &Path) -> Result<BenchCfg> {
    let mut options = Table::new();
    let mut argv = vec![];
    for (k, v) in t {
        let key = format!("eval.{name}.{k}");
        if RUN_OWNED.contains(&k.as_str()) {
            return Err(Error::config(
                file,
                key,
                "is the run's own (model.path, train.out_dir, model.dtype, model.device, dist.backend, data.template)",
            ));
        }
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &Value| -> Result<String> {
            match v {
                Value::String(s) => expand(s).map(|p| p.display().to_string()).map_err(|m| Error::config(file, &key, m)),
                Value::Integer(i) => Ok(i.to_string()),
                Value::Float(f) => Ok(f.to_string()),
                v => Err(Error::config(file, &key, format!("expected a string, number, boolean or list, got {v}"))),
            }
        };
        let value = match v {
            Value::Boolean(true) => {
                argv.push(flag);
                options.insert(k.clone(), v.clone());
                continue;
            }
            Value::Boolean(false) => {
                options.insert(k.clone(), v.clone());
                continue;
            }
            Value::Array(a) => a.iter().map(scalar).collect::<Result<Vec<_>>>()?.join(","),
            v => scalar(v)?,
        };
        options.insert(
            k.clone(),
            match v {
                Value::String(_) => Value::String(value.clone()),
                v => v.clone(),
            },
        );
        argv.push(flag);
        argv.push(value);
    }
    let b = BenchCfg { name: name.into(), options, argv };
    if let Err(e) = b.parse(model, out) {
        let text = e.to_string();
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid options").trim_start_matches("error: ");
        return Err(Error::config(
            file,
            format!("eval.{name}"),
            format!("{first} (the keys are `unlearn eval {name}`'s options, `_` for `-`; see `unlearn eval {name} --help`)"),
        ));
    }
    Ok(b)
}

impl Serialize for MonitorCfg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut t = Table::new();
        if !self.is_off() {
            let mut e = Table::new();
            e.insert("every".into(), Value::Integer(self.eval.every as i64));
            e.insert("save_models".into(), Value::Boolean(self.eval.save_models));
            for b in &self.eval.benchmarks {
                e.insert(b.name.clone(), Value::Table(b.options.clone()));
            }
            t.insert("eval".into(), Value::Table(e));
            let mut st = Table::new();
            let thresholds = |v: &[(String, f64)]| Value::Table(v.iter().map(|(m, x)| (m.clone(), Value::Float(*x))).collect());
            if !self.stop.below.is_empty() {
                st.insert("below".into(), thresholds(&self.stop.below));
            }
            if !self.stop.above.is_empty() {
                st.insert("above".into(), thresholds(&self.stop.above));
            }
            if let Some(r) = &self.stop.reach {
                st.insert("reach".into(), Value::String(r.metric.clone()));
                st.insert("patience".into(), Value::Integer(r.patience as i64));
                if let Some(p) = &r.reference {
                    st.insert("reference".into(), Value::String(p.display().to_string()));
                }
            }
            if let Some(f) = &self.stop.utility {
                st.insert("utility".into(), Value::String(f.metric.clone()));
                st.insert("utility_floor".into(), Value::Float(f.ratio));
            }
            if !st.is_empty() {
                t.insert("stop".into(), Value::Table(st));
            }
            if let Some(b) = &self.best {
                let mut bt = Table::new();
                bt.insert("metric".into(), Value::String(b.metric.clone()));
                bt.insert("mode".into(), Value::String(b.mode.name().into()));
                if let Some(g) = &b.guard {
                    bt.insert("guard".into(), Value::String(g.metric.clone()));
                    bt.insert("guard_ratio".into(), Value::Float(g.ratio));
                }
                t.insert("best".into(), Value::Table(bt));
            }
        }
        t.serialize(s)
    }
}
