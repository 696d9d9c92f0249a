//! Gradient difference: minimise `w_R·NLL_R − w_F·NLL_F` (GDiff with weights; NGDiff is its
//! normalised version).

use serde::Serialize;
use tch::Tensor;

use super::{Direction, Gradients, Grads, LossKind, Method, MethodCfg, MethodConfig, Objective, Registration, Spec, UpdateShape};
use crate::config::{Bound, Section, Trainable};
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "graddiff", parse: GradDiffCfg::parse };

#[derive(Debug, Clone, Serialize)]
pub struct GradDiffCfg {
    pub forget_weight: f64,
    pub retain_weight: f64,
}

impl GradDiffCfg {
    fn parse(s: &Section) -> Result<MethodCfg> {
        Ok(MethodCfg::new(GradDiffCfg {
            forget_weight: s.float("forget_weight", 1.0, Bound::NonNegative)?,
            retain_weight: s.float("retain_weight", 1.0, Bound::NonNegative)?,
        }))
    }
}

impl MethodConfig for GradDiffCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        let losses = vec![(Objective::Forget, LossKind::Nll), (Objective::Retain, LossKind::Nll)];
        // r·w_R − f·w_F: two scaled copies, then their difference.
        Spec::new(losses, Gradients::WeightedSum { forget: -self.forget_weight, retain: self.retain_weight }, UpdateShape::built(2.0), Trainable::All)
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(GradDiff { forget_weight: self.forget_weight, retain_weight: self.retain_weight }))
    }
}

pub struct GradDiff {
    forget_weight: f64,
    retain_weight: f64,
}

impl Method for GradDiff {
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        let (f, r) = (g.forget.expect("forget gradient"), g.retain.expect("retain gradient"));
        Ok(Direction { d: r * self.retain_weight - f * self.forget_weight, clip: 1.0 })
    }
}
