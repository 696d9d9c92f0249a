//! NGDiff (Bu et al. 2025): `d = g_R/‖g_R‖ − g_F/‖g_F‖`, both gradients of the token-mean NLL,
//! with global norms of the *reduced* gradients (identical on every rank), and the GeN-based
//! AutoLR controlling the step size.
//!
//! `d` descends on the retain loss and ascends on the forget loss to first order whatever the
//! two gradients' scales: `d·g_R = ‖g_R‖(1 − cos) ≥ 0` and `d·g_F = ‖g_F‖(cos − 1) ≤ 0`.


use super::autolr::AutoLr;
use super::{Direction, Grads, Method, Objective};
use crate::config::MethodCfg;
use crate::Result;

pub struct NgDiff {
    eps: f64,
    autolr: Option<AutoLr>,
}

impl NgDiff {
    pub fn new(cfg: &MethodCfg, lr: f64) -> Self {
        NgDiff { eps: cfg.eps, autolr: cfg.autolr.then(|| AutoLr::new(lr, cfg.autolr_period, cfg.autolr_smoothing)) }
    }
}

impl Method for NgDiff {
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Forget, Objective::Retain]
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r) = (g.forget.expect("forget gradient"), g.retain.expect("retain gradient"));
        let n_f = g.stats.sq_forget.sqrt();
        let n_r = g.stats.sq_retain.sqrt();
        Ok(Direction { d: r / (n_r + self.eps) - f / (n_f + self.eps), clip: 1.0 })
    }
    fn autolr(&mut self) -> Option<&mut AutoLr> {
        self.autolr.as_mut()
    }
}
