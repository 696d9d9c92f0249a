//! NGDiff (Bu et al. 2025): `d = g_R/‖g_R‖ − g_F/‖g_F‖`, both gradients of the token-mean NLL,
//! with global norms of the *reduced* gradients (identical on every rank), and the GeN-based
//! AutoLR controlling the step size.
//!
//! `d` descends on the retain loss and ascends on the forget loss to first order whatever the
//! two gradients' scales: `d·g_R = ‖g_R‖(1 − cos) ≥ 0` and `d·g_F = ‖g_F‖(cos − 1) ≤ 0`.

use serde::Serialize;
use tch::Tensor;

use super::autolr::AutoLr;
use super::{Direction, Gradients, Grads, LossKind, Method, MethodCfg, MethodConfig, Objective, Registration, Spec, UpdateShape};
use crate::config::{Bound, Section, Trainable};
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "ngdiff", parse: NgDiffCfg::parse };

#[derive(Debug, Clone, Serialize)]
pub struct NgDiffCfg {
    pub eps: f64,
    pub autolr: bool,
    pub autolr_period: u64,
    pub autolr_smoothing: f64,
}

impl NgDiffCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        Ok(MethodCfg::new(NgDiffCfg {
            eps: s.float("eps", 1e-8, Bound::Positive)?,
            autolr: s.boolean("autolr", true)?,
            autolr_period: s.int("autolr_period", 4, 1)?,
            autolr_smoothing: s.float("autolr_smoothing", 0.9, Bound::UnitInterval)?,
        }))
    }
}

impl MethodConfig for NgDiffCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let losses = vec![(Objective::Forget, LossKind::Nll), (Objective::Retain, LossKind::Nll)];
        // r/‖r‖ and f/‖f‖, then their difference; the norms need each reduced gradient on its own.
        Spec {
            autolr: self.autolr.then_some(self.autolr_period),
            ..Spec::new(losses, Gradients::Separate, UpdateShape::built(2.0), Trainable::All)
        }
    }
    fn build(&self, _params: &Tensor, lr: f64) -> Result<Box<dyn Method>> {
        let autolr = self.autolr.then(|| AutoLr::new(lr, self.autolr_period, self.autolr_smoothing));
        Ok(Box::new(NgDiff { eps: self.eps, autolr }))
    }
}

pub struct NgDiff {
    eps: f64,
    autolr: Option<AutoLr>,
}

impl Method for NgDiff {
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r, stats) = g.separate();
        let (f, r) = (f.expect("forget gradient"), r.expect("retain gradient"));
        let n_f = stats.sq_forget.sqrt();
        let n_r = stats.sq_retain.sqrt();
        // d = r/(‖r‖+ε) − f/(‖f‖+ε) with one new buffer: written as one expression it held three
        // (two scaled copies and their difference) at once, on top of both accumulators.
        let mut d = r / (n_r + self.eps);
        let minus_n_f = Tensor::from(-(n_f + self.eps)).to_kind(d.kind()).to_device(d.device());
        let _ = d.f_addcdiv_(f, &minus_n_f)?;
        Ok(Direction { d, clip: 1.0 })
    }
    fn autolr(&mut self) -> Option<&mut AutoLr> {
        self.autolr.as_mut()
    }
}
