//! The in-run evaluation across a preemption: what a checkpoint keeps of it, and what a resumed
//! run checks before it continues.
//!
//! A resumed run must stop where the uninterrupted run stops, keep the same `best/` and put the
//! same state into `final/`. So a checkpoint carries the rules' history ([`History`]: the step-0
//! baseline, the closest state and the evaluations since, the best score and its step, the last
//! good step, the retain model's values), the last evaluated step, the rule that fired if one
//! did, and the utility floor's last good weights as a flat shard, `monitor.last_good`: no
//! re-evaluation can give back the weights of an earlier step, and that step's own checkpoint
//! may have been pruned (or never written). The run evaluates a step after checkpointing it, so
//! a resumed run evaluates its checkpoint's step again when it is due (same weights, same
//! numbers) and metrics.jsonl keeps only the evaluations the history holds.
//!
//! The history is valid only for the evaluation and rules it was made under: a resumed config
//! whose `[eval]`, `[stop]` or `[best]` differs from the checkpoint's is refused, naming the first
//! key that differs (`eval.save_models` aside: it decides only what is written).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Tensor;

use super::config::MonitorCfg;
use super::rules::{History, StopEvent};
use crate::checkpoint::Attached;
use crate::error::{Error, Result};

/// Format of [`Saved`]; a checkpoint of a newer format is refused.
const VERSION: u32 = 1;
/// The attached tensor holding the utility floor's last good weights.
pub const LAST_GOOD: &str = "monitor.last_good";

/// meta.json's `monitor`.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// The `[eval]`/`[stop]`/`[best]` keys the history was made under, each as its TOML value.
    pub config: BTreeMap<String, String>,
    pub history: History,
    /// The last evaluated step.
    pub evaluated: Option<u64>,
    /// The rule that fired, if one did before the checkpoint.
    pub stop: Option<StopEvent>,
    /// The step of the weights in `monitor.last_good`.
    pub last_good: Option<u64>,
}

/// A checkpoint's evaluation state, checked against this run's config.
pub struct Resumed {
    pub saved: Saved,
    /// This rank's shard of the last good weights.
    pub last_good: Option<Tensor>,
}

/// The keys of `[eval]`, `[stop]` and `[best]` that the rules' history depends on, flattened
/// (`eval.tofu.max_samples` → `4`).
pub fn config_keys(cfg: &MonitorCfg) -> BTreeMap<String, String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            v => {
                out.insert(prefix.to_string(), v.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::try_from(cfg).expect("the monitor config serializes to TOML"), &mut out);
    out.remove("eval.save_models");
    out
}

impl Saved {
    pub fn new(cfg: &MonitorCfg, history: &History, evaluated: Option<u64>, stop: Option<&StopEvent>, last_good: Option<u64>) -> Saved {
        Saved { version: VERSION, config: config_keys(cfg), history: history.clone(), evaluated, stop: stop.cloned(), last_good }
    }

    /// Whether a metrics.jsonl line written before the checkpoint stays on resume: an
    /// evaluation's line only if the history holds that evaluation, a stop line only if the rule
    /// fired before the checkpoint (otherwise the resumed run writes them again).
    pub fn keeps_line(resumed: Option<&Saved>, line: &Value) -> bool {
        let step = line["step"].as_u64();
        if line.get("eval").is_some() {
            return step.is_some_and(|s| resumed.and_then(|r| r.evaluated).is_some_and(|e| s <= e));
        }
        if line.get("stop").is_some() {
            return resumed.is_some_and(|r| r.stop.is_some());
        }
        true
    }
}

/// The evaluation state attached to the checkpoint in `dir`, checked against this run's
/// `[eval]`/`[stop]`/`[best]` (`config_file` names them in errors). `None` when neither the
/// checkpoint's run nor this one evaluates.
pub fn check(cfg: &MonitorCfg, attached: Attached, dir: &Path, config_file: &str) -> Result<Option<Resumed>> {
    let meta = dir.join("meta.json");
    let Some(v) = attached.meta else {
        if cfg.is_off() {
            return Ok(None);
        }
        return Err(Error::config(
            config_file,
            "eval.every",
            format!(
                "the checkpoint {} holds no in-run evaluation history (its run had no [eval], or an unlearn that did not keep \
                 it wrote the checkpoint), so the stop rules and best/ could not decide as an uninterrupted run would; resume \
                 with the config the run started with, or start over with --overwrite",
                dir.display()
            ),
        ));
    };
    let saved: Saved = serde_json::from_value(v).map_err(|e| Error::format(&meta, format!("`monitor`: {e}")))?;
    if saved.version > VERSION {
        return Err(Error::format(
            &meta,
            format!("`monitor.version` is {}: written by a newer unlearn (this one reads {VERSION})", saved.version),
        ));
    }
    let now = config_keys(cfg);
    if let Some(k) = now.keys().chain(saved.config.keys()).find(|k| now.get(*k) != saved.config.get(*k)) {
        let show = |v: Option<&String>| v.map_or_else(|| "not set".to_string(), |v| format!("`{v}`"));
        return Err(Error::config(
            config_file,
            k.as_str(),
            format!(
                "is {} here but {} in the run that wrote the checkpoint {}: the stop rules' and best/'s history is only valid \
                 for the same [eval], [stop] and [best]; resume with the run's own settings, or start over with --overwrite",
                show(now.get(k)),
                show(saved.config.get(k)),
                dir.display()
            ),
        ));
    }
    let mut tensors = attached.tensors;
    let last_good = tensors.iter().position(|(n, _)| n == LAST_GOOD).map(|i| tensors.swap_remove(i).1);
    if saved.last_good.is_some() != last_good.is_some() {
        return Err(Error::format(
            &meta,
            format!(
                "`monitor.last_good` is {:?} but the shards {} the `{LAST_GOOD}` state",
                saved.last_good,
                if last_good.is_some() { "hold" } else { "lack" }
            ),
        ));
    }
    if let Some((n, _)) = tensors.first() {
        return Err(Error::format(&meta, format!("`tensors` lists `{n}`, which this unlearn does not know")));
    }
    Ok(Some(Resumed { saved, last_good }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::config::{EvalCfg, Reach, StopCfg};
    use crate::monitor::rules::{Evaluation, Rules};

    fn cfg(patience: u64) -> MonitorCfg {
        let reach = Reach { metric: "tofu.forget_prob".into(), reference: None, patience };
        MonitorCfg {
            eval: EvalCfg { every: 1, ..EvalCfg::default() },
            stop: StopCfg { reach: Some(reach), ..StopCfg::default() },
            best: None,
        }
    }

    fn attached(saved: &Saved) -> Attached {
        Attached { meta: Some(serde_json::to_value(saved).unwrap()), tensors: vec![] }
    }

    /// The history goes through meta.json's text bit for bit, and the restored rules decide as
    /// the ones that made it.
    #[test]
    fn the_history_round_trips_exactly_and_decides_alike() {
        let c = cfg(2);
        let reference: BTreeMap<String, f64> = [("tofu.forget_prob".to_string(), 0.1 + 0.2)].into();
        let (mut a, mut b) = (Rules::new(&c, reference.clone()), Rules::new(&c, reference));
        let values = [0.9, 0.3 + 1e-17 * 3.0, 0.7 / 3.0, 1.0 / 3.0, 0.5, 2.0f64.sqrt() / 7.0];
        let eval = |step: usize| Evaluation { step: step as u64, values: [("tofu.forget_prob".to_string(), values[step])].into() };
        for step in 0..3 {
            a.observe(&eval(step)).unwrap();
        }
        let saved = Saved::new(&c, a.history(), Some(2), None, None);
        let text = serde_json::to_string_pretty(&serde_json::to_value(&saved).unwrap()).unwrap();
        let back = check(&c, Attached { meta: Some(serde_json::from_str(&text).unwrap()), tensors: vec![] }, Path::new("ck"), "c.toml")
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::to_string(&back.saved.history).unwrap(), serde_json::to_string(a.history()).unwrap());
        // A retain-model value measured otherwise now: the checkpoint's is kept, with a note.
        let mut other = Rules::new(&c, [("tofu.forget_prob".to_string(), 0.3)].into());
        let notes = other.resume(back.saved.history.clone());
        assert!(notes.len() == 1 && notes[0].contains("tofu.forget_prob"), "{notes:?}");
        assert_eq!(serde_json::to_string(other.history()).unwrap(), serde_json::to_string(a.history()).unwrap());
        assert!(b.resume(back.saved.history).is_empty());
        for step in 3..values.len() {
            let (da, db) = (a.observe(&eval(step)).unwrap(), b.observe(&eval(step)).unwrap());
            assert_eq!(format!("{:?}", (da.stop, da.new_best)), format!("{:?}", (db.stop, db.new_best)), "step {step}");
        }
    }

    #[test]
    fn a_checkpoint_of_other_rules_or_without_history_is_refused_by_name() {
        let saved = Saved::new(&cfg(2), &History::default(), Some(0), None, None);
        let e = check(&cfg(3), attached(&saved), Path::new("ck"), "c.toml").err().unwrap().to_string();
        assert!(e.contains("c.toml") && e.contains("stop.patience") && e.contains("`3`") && e.contains("`2`"), "{e}");
        let e = check(&MonitorCfg::default(), attached(&saved), Path::new("ck"), "c.toml").err().unwrap().to_string();
        assert!(e.contains("eval.every") && e.contains("not set"), "{e}");
        let e = check(&cfg(2), Attached::default(), Path::new("ck"), "c.toml").err().unwrap().to_string();
        assert!(e.contains("eval.every") && e.contains("no in-run evaluation history"), "{e}");
        assert!(check(&MonitorCfg::default(), Attached::default(), Path::new("ck"), "c.toml").unwrap().is_none());
        // eval.save_models decides only what is written.
        let mut c = cfg(2);
        c.eval.save_models = true;
        assert!(check(&c, attached(&saved), Path::new("ck"), "c.toml").is_ok());
        let newer = Saved { version: VERSION + 1, ..Saved::new(&cfg(2), &History::default(), None, None, None) };
        assert!(check(&cfg(2), attached(&newer), Path::new("ck"), "c.toml").err().unwrap().to_string().contains("newer unlearn"));
        let no_weights = Saved::new(&cfg(2), &History::default(), Some(0), None, Some(0));
        let e = check(&cfg(2), attached(&no_weights), Path::new("ck"), "c.toml").err().unwrap().to_string();
        assert!(e.contains("monitor.last_good") && e.contains("lack"), "{e}");
    }
}
