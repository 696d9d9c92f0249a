//! Learning-rate schedules, as a pure function of the 1-based optimizer step.

use crate::config::OptimCfg;

/// The shape of the learning rate over steps (`optim.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    /// Linear from 0 over the warm-up, then constant.
    LinearWarmup,
    /// mt-unlearn's `get_warmup_lr`.
    MtWarmup,
    /// Linear warm-up, then a half cosine to 0 at the last step.
    Cosine,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    kind: ScheduleKind,
    lr: f64,
    warmup: u64,
    total: u64,
}

impl Schedule {
    pub fn new(cfg: &OptimCfg, total_steps: u64) -> Self {
        Schedule { kind: cfg.schedule, lr: cfg.lr, warmup: cfg.warmup_steps, total: total_steps }
    }

    /// Learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (lr, w) = (self.lr, self.warmup as f64);
        let s = step as f64;
        match self.kind {
            ScheduleKind::LinearWarmup if s <= w => lr * s / w,
            // mt-unlearn's `get_warmup_lr`: 1% of the rate for W steps, then a linear ramp from 0
            // to the full rate over the next W steps (the logged News NPO baseline ran entirely
            // inside this warm-up).
            ScheduleKind::MtWarmup if s <= w => 0.01 * lr,
            ScheduleKind::MtWarmup if s <= 2.0 * w => (s - w) / w * lr,
            ScheduleKind::Cosine if s <= w => lr * s / w,
            ScheduleKind::Cosine => {
                let span = (self.total as f64 - w).max(1.0);
                let t = ((s - w) / span).min(1.0);
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
            }
            ScheduleKind::Constant | ScheduleKind::LinearWarmup | ScheduleKind::MtWarmup => lr,
        }
    }
}
