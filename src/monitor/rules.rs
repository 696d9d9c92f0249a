//! The stop rules and the best-state rule, as pure functions of the evaluations seen so far, so
//! that every rank (which sees the same numbers) takes the same decision.
//!
//! - `below` / `above`: stop at the first evaluation after step 0 where a metric crosses its value.
//! - reach the retain model: closeness to the retain model is the metric itself for Forget Quality
//!   (a KS p-value against the retain model's statistics: higher is closer) and −|value − the
//!   retain model's value| for any other metric. Patience rule: the run stops once `patience`
//!   evaluations in a row were not strictly closer than the closest so far (step 0 included);
//!   the closest state is the one `best/` keeps by default.
//! - utility floor: stop as soon as the metric falls below `ratio` × its step-0 value; the run
//!   keeps the last evaluated state that was above the floor (restored into `final/`).
//! - max steps: `train.steps`, when no other rule fired.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::{BestCfg, BestMode, Floor, MonitorCfg};
use crate::error::Result;

/// The metrics of one evaluation, `benchmark.metric` → value (non-finite values left out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub step: u64,
    #[serde(with = "exact::map")]
    pub values: BTreeMap<String, f64>,
}

impl Evaluation {
    fn get(&self, metric: &str) -> Result<f64> {
        self.values.get(metric).copied().ok_or_else(|| {
            crate::other!(
                "stop/best rule: the evaluation at step {} has no finite `{metric}` (it has: {})",
                self.step,
                self.values.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Which rule ended the run (as metrics.jsonl and record.json name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRule {
    Threshold,
    ReachRetain,
    UtilityFloor,
    MaxSteps,
}

impl std::fmt::Display for StopRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).expect("a unit variant serializes");
        f.write_str(v.as_str().expect("as a string"))
    }
}

/// The rule that ended the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopEvent {
    pub rule: StopRule,
    pub step: u64,
    pub detail: String,
    /// The evaluated step whose weights `final/` holds when it is not `step` (utility floor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_step: Option<u64>,
}

/// What one evaluation decided.
#[derive(Debug, Default)]
pub struct Decision {
    pub stop: Option<StopEvent>,
    /// This state is the new best: write `best/`.
    pub new_best: bool,
    /// This state passes the utility floor: keep it as the last good state.
    pub good: bool,
}

pub struct Rules {
    cfg: MonitorCfg,
    h: History,
}

/// What the rules have seen: all they need to decide as if every evaluation so far had been
/// made in this process (a resumed run restores it from its checkpoint).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    /// The retain model's metrics (`benchmark.metric` → value), from `stop.reference`.
    #[serde(with = "exact::map")]
    reference: BTreeMap<String, f64>,
    /// The step-0 evaluation: the utility floor's and the best guard's baseline.
    start: Option<Evaluation>,
    /// (closeness, step) of the closest evaluation so far, and the evaluations since.
    #[serde(with = "exact::pair")]
    closest: Option<(f64, u64)>,
    since_closest: u64,
    last_good: u64,
    /// (score, step) of the state `best/` holds.
    #[serde(with = "exact::pair")]
    best: Option<(f64, u64)>,
}

impl Rules {
    pub fn new(cfg: &MonitorCfg, reference: BTreeMap<String, f64>) -> Rules {
        Rules { cfg: cfg.clone(), h: History { reference, ..History::default() } }
    }

    pub fn history(&self) -> &History {
        &self.h
    }

    /// Continue from a checkpoint's history, its retain-model values included: the run goes on
    /// deciding against the values it started with (a retain model measured in the run may give
    /// other last bits at another world size). Returns a note for each value that differs now.
    pub fn resume(&mut self, h: History) -> Vec<String> {
        let (now, then) = (&self.h.reference, &h.reference);
        let notes = now
            .keys()
            .chain(then.keys().filter(|k| !now.contains_key(*k)))
            .filter(|k| now.get(*k).map(|v| v.to_bits()) != then.get(*k).map(|v| v.to_bits()))
            .map(|k| {
                let show = |v: Option<&f64>| v.map_or("absent".to_string(), |v| format!("{v:?}"));
                format!(
                    "the retain model's `{k}` is {} now, {} in the checkpoint: the checkpoint's value is kept",
                    show(now.get(k)),
                    show(then.get(k))
                )
            })
            .collect();
        self.h = h;
        notes
    }

    /// Closeness of `metric`'s value to the retain model's (higher is closer).
    fn closeness(&self, metric: &str, value: f64) -> Result<f64> {
        if metric.ends_with(".forget_quality") {
            return Ok(value);
        }
        let r = self.h.reference.get(metric).ok_or_else(|| {
            crate::other!(
                "stop.reference has no finite `{metric}` (the retain model's report must come from the same benchmark and options)"
            )
        })?;
        Ok(-(value - r).abs())
    }

    fn passes(&self, floor: &Floor, e: &Evaluation) -> Result<bool> {
        let start = self.h.start.as_ref().expect("step 0 is evaluated first").get(&floor.metric)?;
        Ok(e.get(&floor.metric)? >= floor.ratio * start)
    }

    /// The step of the state `best/` holds, if any.
    pub fn best_step(&self) -> Option<u64> {
        self.h.best.map(|(_, s)| s)
    }

    pub fn observe(&mut self, e: &Evaluation) -> Result<Decision> {
        let mut d = Decision::default();
        if let Some(r) = &self.cfg.stop.reach {
            let c = self.closeness(&r.metric, e.get(&r.metric)?)?;
            match self.h.closest {
                Some((best, _)) if c <= best => self.h.since_closest += 1,
                _ => {
                    self.h.closest = Some((c, e.step));
                    self.h.since_closest = 0;
                }
            }
        }
        if self.h.start.is_none() {
            for (m, _) in self.cfg.stop.below.iter().chain(&self.cfg.stop.above) {
                e.get(m)?;
            }
            if let Some(f) = self.cfg.stop.utility.as_ref().or(self.cfg.best.as_ref().and_then(|b| b.guard.as_ref())) {
                e.get(&f.metric)?;
            }
            self.h.start = Some(e.clone());
            d.good = true;
            return Ok(d);
        }
        if let Some(f) = &self.cfg.stop.utility {
            if !self.passes(f, e)? {
                let s0 = self.h.start.as_ref().unwrap().get(&f.metric)?;
                d.stop = Some(StopEvent {
                    rule: StopRule::UtilityFloor,
                    step: e.step,
                    detail: format!(
                        "{} = {:.4} fell below {} x its step-0 value {s0:.4}; keeping the last good state, step {}",
                        f.metric,
                        e.get(&f.metric)?,
                        f.ratio,
                        self.h.last_good
                    ),
                    restored_step: Some(self.h.last_good),
                });
                return Ok(d);
            }
            self.h.last_good = e.step;
            d.good = true;
        }
        if let Some(b) = self.cfg.best.clone() {
            d.new_best = self.consider_best(&b, e)?;
        }
        for (m, limit) in &self.cfg.stop.below {
            let v = e.get(m)?;
            if v < *limit && d.stop.is_none() {
                d.stop = Some(StopEvent {
                    rule: StopRule::Threshold,
                    step: e.step,
                    detail: format!("{m} = {v:.4} < {limit}"),
                    restored_step: None,
                });
            }
        }
        for (m, limit) in &self.cfg.stop.above {
            let v = e.get(m)?;
            if v > *limit && d.stop.is_none() {
                d.stop = Some(StopEvent {
                    rule: StopRule::Threshold,
                    step: e.step,
                    detail: format!("{m} = {v:.4} > {limit}"),
                    restored_step: None,
                });
            }
        }
        if let (Some(r), None) = (&self.cfg.stop.reach, &d.stop) {
            if self.h.since_closest >= r.patience {
                let (c, step) = self.h.closest.expect("set at step 0");
                let what = if r.metric.ends_with(".forget_quality") {
                    format!("{} = {c:.4}", r.metric)
                } else {
                    format!("|{} - retain| = {:.4}", r.metric, -c)
                };
                d.stop = Some(StopEvent {
                    rule: StopRule::ReachRetain,
                    step: e.step,
                    detail: format!(
                        "closest to the retain model at step {step} ({what}); {} evaluation(s) since without coming closer",
                        self.h.since_closest
                    ),
                    restored_step: None,
                });
            }
        }
        Ok(d)
    }

    fn consider_best(&mut self, b: &BestCfg, e: &Evaluation) -> Result<bool> {
        if let Some(g) = &b.guard {
            if !self.passes(g, e)? {
                return Ok(false);
            }
        }
        let v = e.get(&b.metric)?;
        let score = match b.mode {
            BestMode::Max => v,
            BestMode::Min => -v,
            BestMode::Reach => self.closeness(&b.metric, v)?,
        };
        if self.h.best.is_none_or(|(s, _)| score > s) {
            self.h.best = Some((score, e.step));
            return Ok(true);
        }
        Ok(false)
    }
}

/// f64s written as their shortest exact text ("0.1", "-3.5e-7"): serde_json's default number
/// parser may round the last bit, and restored rules must compare exactly as the first run did.
mod exact {
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};

    fn text(v: f64) -> String {
        format!("{v:?}")
    }

    fn parse<E: Error>(s: &str) -> Result<f64, E> {
        s.parse().map_err(|_| E::custom(format!("`{s}` is not a number")))
    }

    pub mod map {
        use std::collections::BTreeMap;

        use super::*;

        pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
            m.iter().map(|(k, v)| (k, text(*v))).collect::<BTreeMap<_, _>>().serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
            BTreeMap::<String, String>::deserialize(d)?.into_iter().map(|(k, v)| Ok((k, parse(&v)?))).collect()
        }
    }

    pub mod pair {
        use super::*;

        pub fn serialize<S: Serializer>(p: &Option<(f64, u64)>, s: S) -> Result<S::Ok, S::Error> {
            p.map(|(v, step)| (text(v), step)).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, u64)>, D::Error> {
            Option::<(String, u64)>::deserialize(d)?.map(|(v, step)| Ok((parse(&v)?, step))).transpose()
        }
    }
}
