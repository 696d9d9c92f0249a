//! Gradient difference: minimise `w_R·NLL_R − w_F·NLL_F` (GDiff with weights; NGDiff is its
//! normalised version).


use super::{Direction, Grads, Method, Objective};
use crate::config::MethodCfg;
use crate::Result;

pub struct GradDiff {
    forget_weight: f64,
    retain_weight: f64,
}

impl GradDiff {
    pub fn new(cfg: &MethodCfg) -> Self {
        GradDiff { forget_weight: cfg.forget_weight, retain_weight: cfg.retain_weight }
    }
}

impl Method for GradDiff {
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Forget, Objective::Retain]
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r) = (g.forget.expect("forget gradient"), g.retain.expect("retain gradient"));
        Ok(Direction { d: r * self.retain_weight - f * self.forget_weight, clip: 1.0 })
    }
}
