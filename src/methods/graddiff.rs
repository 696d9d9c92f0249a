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
        // r·w_R − f·w_F is the one accumulated gradient itself.
        Spec::new(
            losses,
            Gradients::WeightedSum { forget: -self.forget_weight, retain: self.retain_weight },
            UpdateShape::ALIAS,
            Trainable::All,
        )
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(GradDiff))
    }
}

pub struct GradDiff;

impl Method for GradDiff {
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        // The trainer scaled each loss by its declared weight: the sum is r·w_R − f·w_F.
        Ok(Direction { d: g.sum().0.shallow_clone(), clip: 1.0 })
    }
}
