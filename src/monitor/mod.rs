//! Evaluation inside a run (`[eval]`), the stop rules (`[stop]`) and the best state (`[best]`).
//!
//! Every `eval.every` steps (and at step 0 and the last step) the live student is evaluated by
//! the same `Benchmark::evaluate` that `unlearn eval` calls, on the trainer's rank group and with
//! `unlearn eval`'s sharding, so the numbers equal `unlearn eval` on the saved model. Every rank
//! gets the whole outcome and takes the same decisions ([`rules`]); rank 0 appends them to
//! metrics.jsonl. The trainer calls [`Monitor::evaluate`] from one place in its step loop.

pub mod config;
pub mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};
use tch::Tensor;

use crate::cli::eval::{check_same_tokenizer, config_and_tokenizer};
use crate::config::RunConfig;
use crate::data::{Template, Tokenizer};
use crate::eval::benchmark::{Benchmark, ModelFacts};
use crate::eval::context::EvalCtx;
use crate::eval::report::{fmt_value, Report};
use crate::eval::shard::Batching;
use crate::model::load_model;
use crate::record::{write_model_card, Record};
use crate::train::Trainer;
use crate::Result;
use config::MonitorCfg;
use rules::{Evaluation, Rules, StopEvent};

/// A benchmark with its data read, and `unlearn eval`'s batching for it.
struct Prepared {
    name: String,
    bench: Box<dyn Benchmark>,
    score: Batching,
    gen: Batching,
}

pub struct Monitor {
    cfg: MonitorCfg,
    benches: Vec<Prepared>,
    tok: Tokenizer,
    template: Template,
    rules: Rules,
    out: PathBuf,
    /// The last state above the utility floor (only with that rule).
    last_good: Option<(u64, Tensor)>,
    stop: Option<StopEvent>,
    last: Option<Evaluation>,
}

/// What the in-run evaluation decided, for record.json and the log.
pub struct Outcome {
    pub stop: StopEvent,
    pub best_step: Option<u64>,
    /// The step whose weights `final/` holds.
    pub final_step: u64,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        json!({"stop": self.stop, "best_step": self.best_step, "final_step": self.final_step})
    }
}

impl Monitor {
    /// Read every benchmark's data and measure the reference models they name (every rank);
    /// `None` when the run evaluates nothing.
    pub fn new(cfg: &RunConfig, trainer: &mut Trainer) -> Result<Option<Monitor>> {
        if cfg.monitor.is_off() {
            return Ok(None);
        }
        let model_cfg = trainer.model_config().clone();
        let tok = Tokenizer::from_model_dir(&cfg.model.path, &model_cfg)?;
        let template = Template::load(cfg.data.template, &cfg.model.path, &tok)?;
        let mut benches = vec![];
        for b in &cfg.monitor.eval.benchmarks {
            let parsed = b.parse(&cfg.model.path, &cfg.train.out_dir).map_err(|e| crate::other!("[eval.{}]: {e}", b.name))?;
            let (common, args) = parsed.bench.parts();
            let mut bench = args.prepare(&ModelFacts { config: &model_cfg, tok: &tok, template: &template })?;
            if let Some(dir) = bench.reference_model().map(Path::to_path_buf) {
                let (_, rtok) = config_and_tokenizer(&dir)?;
                check_same_tokenizer(&tok, &cfg.model.path, &rtok, &dir)?;
                let rtemplate = Template::load(cfg.data.template, &dir, &rtok)?;
                let m = load_model(&dir, trainer.kind(), trainer.device())?;
                let comm = trainer.comm().clone();
                let ctx = EvalCtx::new(
                    &m.model,
                    &rtok,
                    &rtemplate,
                    &*comm,
                    &m.config.eos_token_ids,
                    common.score_batching(),
                    common.gen_batching(),
                );
                bench.measure_reference(&ctx)?;
            }
            benches.push(Prepared { name: b.name.clone(), bench, score: common.score_batching(), gen: common.gen_batching() });
        }
        let mut reference = BTreeMap::new();
        for b in &benches {
            reference.extend(b.bench.reference_metrics().into_iter().map(|(k, v)| (format!("{}.{k}", b.name), v)));
        }
        // An explicit stop.reference report wins over values measured on a benchmark's retain model.
        if let Some(p) = cfg.monitor.reference() {
            reference.extend(reference_values(p)?);
        }
        check_reference(&cfg.monitor, &reference)?;
        Ok(Some(Monitor {
            rules: Rules::new(&cfg.monitor, reference),
            cfg: cfg.monitor.clone(),
            benches,
            tok,
            template,
            out: cfg.train.out_dir.clone(),
            last_good: None,
            stop: None,
            last: None,
        }))
    }

    /// Whether the state after `step` is evaluated (`total` = train.steps).
    pub fn due(&self, step: u64, total: u64) -> bool {
        step.is_multiple_of(self.cfg.eval.every) || step == total
    }

    /// Evaluate the current student (collective), apply the rules, write `best/` (and
    /// `evals/step-N/` when asked). Returns the metrics.jsonl lines and whether to stop.
    /// `record`: rank 0's record of the run, for the model directories written.
    pub fn evaluate(&mut self, trainer: &mut Trainer, record: Option<&Record>) -> Result<(Vec<Value>, bool)> {
        let step = trainer.step();
        let rank0 = trainer.comm().rank() == 0;
        let t = Instant::now();
        let eos = trainer.model_config().eos_token_ids.clone();
        let (tok, template, benches) = (&self.tok, &self.template, &self.benches);
        let outcomes = trainer.with_eval_model(|model, comm| {
            benches
                .iter()
                .map(|b| b.bench.evaluate(&EvalCtx::new(model, tok, template, comm, &eos, b.score, b.gen)).map(|o| (b.name.as_str(), o)))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut shown = serde_json::Map::new();
        let mut values = BTreeMap::new();
        for (name, o) in outcomes {
            for (k, m) in o.metrics {
                let key = format!("{name}.{k}");
                shown.insert(key.clone(), json!(m.value));
                values.extend(m.value.map(|v| (key, v)));
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if rank0 {
            let list: Vec<String> = shown.iter().map(|(k, v)| format!("{k} {}", fmt_value(v.as_f64()))).collect();
            tracing::info!("eval step {step} ({secs:.1} s): {}", list.join(" | "));
        }
        let mut lines = vec![json!({"step": step, "eval": shown, "eval_s": secs})];
        let e = Evaluation { step, values };
        let d = self.rules.observe(&e)?;
        if self.cfg.eval.save_models {
            let dir = self.out.join("evals").join(format!("step-{step}"));
            trainer.save_model(&dir, &|tmp| write_record(tmp, record, Some(&json!({"evaluated_step": step, "eval": lines[0]["eval"]}))))?;
        }
        if d.good && self.cfg.stop.utility.is_some() {
            self.last_good = Some((step, trainer.snapshot()));
        }
        if d.new_best {
            let rule = self.cfg.best.as_ref().expect("a best rule");
            let about = json!({"best_step": step, "rule": {"metric": rule.metric, "mode": crate::config::Choice::name(rule.mode),
                "guard": rule.guard.as_ref().map(|g| json!({"metric": g.metric, "ratio": g.ratio}))}, "eval": lines[0]["eval"]});
            trainer.save_model(&self.out.join("best"), &|tmp| write_record(tmp, record, Some(&about)))?;
            if rank0 {
                tracing::info!(
                    "best: step {step} ({} {} = {}) written to {}",
                    rule.mode_word(),
                    rule.metric,
                    fmt_value(e.values.get(&rule.metric).copied()),
                    self.out.join("best").display()
                );
            }
        }
        self.last = Some(e);
        if let Some(s) = d.stop {
            lines.push(self.fired(s, rank0));
            return Ok((lines, true));
        }
        Ok((lines, false))
    }

    fn fired(&mut self, s: StopEvent, rank0: bool) -> Value {
        if rank0 {
            tracing::info!("stop rule `{}` fired at step {}: {}", s.rule, s.step, s.detail);
        }
        let line = json!({"step": s.step, "stop": s});
        self.stop = Some(s);
        line
    }

    /// After the last step: the rule that ended the run (`max_steps` when none fired), and the
    /// last good state put back when the utility floor fired (collective). Returns the stop line.
    pub fn finish(&mut self, trainer: &mut Trainer, total: u64) -> Result<(Option<Value>, Outcome)> {
        let rank0 = trainer.comm().rank() == 0;
        let line = match self.stop {
            Some(_) => None,
            None => {
                let s = StopEvent {
                    rule: "max_steps",
                    step: trainer.step(),
                    detail: format!("train.steps = {total} reached"),
                    restored_step: None,
                };
                Some(self.fired(s, rank0))
            }
        };
        let stop = self.stop.clone().expect("set above");
        let mut final_step = trainer.step();
        if let Some(k) = stop.restored_step {
            let (step, shard) = self.last_good.take().expect("the last good state is kept while the utility floor rule is on");
            debug_assert_eq!(step, k);
            trainer.restore_snapshot(&shard)?;
            final_step = step;
            if rank0 {
                tracing::info!("final/ holds the last good state, step {step}");
            }
        }
        Ok((line, Outcome { stop, best_step: self.rules.best_step(), final_step }))
    }
}

impl config::BestCfg {
    fn mode_word(&self) -> &'static str {
        match self.mode {
            config::BestMode::Max => "highest",
            config::BestMode::Min => "lowest",
            config::BestMode::Reach => "closest to the retain model:",
        }
    }
}

/// The reach rule (and `best.mode = "reach"`) needs the retain model's value of its metric, known
/// before the first step: an error now rather than at the first evaluation.
fn check_reference(cfg: &MonitorCfg, reference: &BTreeMap<String, f64>) -> Result<()> {
    let reach = cfg.stop.reach.as_ref().map(|r| ("stop.reach", &r.metric));
    let best = cfg.best.as_ref().filter(|b| b.mode == config::BestMode::Reach).map(|b| ("best.metric", &b.metric));
    for (key, m) in reach.into_iter().chain(best) {
        if !m.ends_with(".forget_quality") && !reference.contains_key(m) {
            let known: Vec<&str> = reference.keys().map(String::as_str).collect();
            return Err(crate::other!(
                "{key} = `{m}`: the retain model's value is not known (stop.reference and the benchmarks' retain_model give: {}); the report must come from the same benchmark and options",
                if known.is_empty() { "nothing".to_string() } else { known.join(", ") }
            ));
        }
    }
    Ok(())
}

/// The retain model's metrics from its `unlearn eval` report, as `benchmark.metric`.
fn reference_values(path: &Path) -> Result<BTreeMap<String, f64>> {
    let r = Report::load(path)?;
    Ok(r.metrics.iter().filter_map(|(k, m)| m.value.map(|v| (format!("{}.{k}", r.benchmark), v))).collect())
}

/// record.json (with what the run's evaluation said about this state, if it evaluated) and the
/// model card, into a model directory being written (rank 0, which alone has the record).
pub fn write_record(dir: &Path, record: Option<&Record>, about: Option<&Value>) -> Result<()> {
    let Some(r) = record else { return Ok(()) };
    let mut r = r.clone();
    r.outcome = about.cloned();
    r.write(dir)?;
    write_model_card(dir, &r, None)
}
