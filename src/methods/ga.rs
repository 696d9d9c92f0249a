//! Gradient ascent on the forget set: minimise −NLL_F.

use serde::Serialize;
use tch::Tensor;

use super::{
    batch_nll, Aux, Direction, Gradients, Grads, LossKind, LossOut, Method, MethodCfg, MethodConfig, Objective, Registration, Spec,
    UpdateShape,
};
use crate::config::Trainable;
use crate::data::loader::LocalBatch;
use crate::Result;

pub const REGISTRATION: Registration = Registration { name: "ga", parse: |_| Ok(MethodCfg::new(GaCfg {})) };

/// No settings.
#[derive(Debug, Clone, Serialize)]
pub struct GaCfg {}

impl MethodConfig for GaCfg {
    fn name(&self) -> &'static str {
        REGISTRATION.name
    }
    fn spec(&self) -> Spec {
        // The forget buffer already holds ∇(−NLL_F).
        Spec::new(
            vec![(Objective::Forget, LossKind::Nll)],
            Gradients::WeightedSum { forget: 1.0, retain: 0.0 },
            UpdateShape::ALIAS,
            Trainable::All,
        )
    }
    fn build(&self, _params: &Tensor, _lr: f64) -> Result<Box<dyn Method>> {
        Ok(Box::new(GradientAscent))
    }
}

pub struct GradientAscent;

impl Method for GradientAscent {
    fn loss(&mut self, _obj: Objective, logits: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        let nll = batch_nll(logits, batch);
        Ok(LossOut { value: nll.double_value(&[]), loss: -nll })
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.sum().0.shallow_clone(), clip: 1.0 })
    }
}
