//! Optimizers over flat fp32 shards. They see one contiguous tensor of parameters and one of
//! update directions, never parameter names, so ZeRO can hand each rank its 1/N shard and the
//! same code runs sharded or not.

pub mod adamw;
pub mod schedule;
pub mod sgd;

use tch::Tensor;

use crate::config::{OptimCfg, OptimName};
use crate::Result;

pub use adamw::AdamW;
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::Sgd;

pub trait Optimizer {
    /// One update of `params` (a flat fp32 shard) along the direction `grad` at rate `lr`.
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()>;
    /// State shards to checkpoint, by name.
    fn state(&self) -> Vec<(&'static str, Tensor)>;
    /// Scalars to checkpoint (e.g. Adam's step count).
    fn scalars(&self) -> serde_json::Value;
    /// Restore from a checkpoint; shards come in the order and names of `state()`.
    fn restore(&mut self, tensors: Vec<(String, Tensor)>, scalars: &serde_json::Value) -> Result<()>;
}

pub fn build(cfg: &OptimCfg, shard: &Tensor) -> Box<dyn Optimizer> {
    match cfg.name {
        OptimName::AdamW => Box::new(AdamW::new(shard, cfg.betas, cfg.adam_eps, cfg.weight_decay)),
        OptimName::Sgd => Box::new(Sgd::new(shard, cfg.momentum, cfg.weight_decay)),
    }
}

/// Scale for `torch.nn.utils.clip_grad_norm_`: `max / (norm + 1e-6)`, at most 1.
pub fn clip_coef(max_norm: f64, norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}
