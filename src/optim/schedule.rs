//! Learning-rate schedules, as a pure function of the 1-based optimizer step.

use crate::config::OptimCfg;

#[derive(Debug, Clone)]
pub struct Schedule {
    kind: String,
    lr: f64,
    warmup: u64,
    total: u64,
}

impl Schedule {
    pub fn new(cfg: &OptimCfg, total_steps: u64) -> Self {
        Schedule { kind: cfg.schedule.clone(), lr: cfg.lr, warmup: cfg.warmup_steps, total: total_steps }
    }

    /// Learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (lr, w) = (self.lr, self.warmup as f64);
        let s = step as f64;
        match self.kind.as_str() {
            "linear-warmup" if s <= w => lr * s / w,
            // mt-unlearn's `get_warmup_lr`: 1% of the rate for W steps, then a linear ramp from 0
            // to the full rate over the next W steps (the logged News NPO baseline ran entirely
            // inside this warm-up).
            "mt-warmup" if s <= w => 0.01 * lr,
            "mt-warmup" if s <= 2.0 * w => (s - w) / w * lr,
            "cosine" if s <= w => lr * s / w,
            "cosine" => {
                let span = (self.total as f64 - w).max(1.0);
                let t = ((s - w) / span).min(1.0);
                0.5 * lr * (1.0 + (std::f64::consts::PI * t).cos())
            }
            _ => lr,
        }
    }
}
