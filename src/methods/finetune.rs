//! Plain language-model fine-tuning on the retain data (builds target and retain models).


use super::{Direction, Grads, Method, Objective};
use crate::Result;

pub struct Finetune;

impl Method for Finetune {
    fn objectives(&self) -> &'static [Objective] {
        &[Objective::Retain]
    }
    fn direction(&mut self, g: &Grads) -> Result<Direction> {
        Ok(Direction { d: g.retain.expect("retain gradient").shallow_clone(), clip: 1.0 })
    }
}
