//! Plain language-model fine-tuning on the retain data (builds target and retain models).

use serde::Serialize;
use tch::Tensor;

use super::{Direction, Gradients, Grads, LossKind, Method, MethodCfg, MethodConfig, Objective, Registration, Spec, UpdateShape};
use crate::config::Trainable;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "finetune", parse: |_| Ok(MethodCfg::new(FinetuneCfg {})) };

/// No settings.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneCfg {}

impl MethodConfig for FinetuneCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        Spec::new(
            vec![(Objective::Retain, LossKind::Nll)],
            Gradients::WeightedSum { forget: 0.0, retain: 1.0 },
            UpdateShape::ALIAS,
            Trainable::All,
        )
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(Finetune))
    }
}

pub struct Finetune;

impl Method for Finetune {
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.sum().0.shallow_clone(), clip: 1.0 })
    }
}
