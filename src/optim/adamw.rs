//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction, no amsgrad).

use tch::{Kind, Tensor};

use super::Optimizer;
use crate::Result;

pub struct AdamW {
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl AdamW {
    pub fn new(shard: &Tensor, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        AdamW {
            betas,
            eps,
            weight_decay,
            step: 0,
            exp_avg: shard.zeros_like().to_kind(Kind::Float),
            exp_avg_sq: shard.zeros_like().to_kind(Kind::Float),
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        let (b1, b2) = self.betas;
        self.step += 1;
        let _ = params.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
        let _ = self.exp_avg.f_lerp_(grad, 1.0 - b1)?;
        let _ = self.exp_avg_sq.f_mul_scalar_(b2)?;
        let _ = self.exp_avg_sq.f_add_(&(grad * grad * (1.0 - b2)))?;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let denom = (self.exp_avg_sq.sqrt() / bc2.sqrt()) + self.eps;
        let _ = params.f_sub_(&(&self.exp_avg / &denom * (lr / bc1)))?;
        Ok(())
    }
    fn state(&self) -> Vec<(&'static str, Tensor)> {
        vec![("exp_avg", self.exp_avg.shallow_clone()), ("exp_avg_sq", self.exp_avg_sq.shallow_clone())]
    }
    fn scalars(&self) -> serde_json::Value {
        serde_json::json!({ "step": self.step })
    }
    fn restore(&mut self, tensors: Vec<(String, Tensor)>, scalars: &serde_json::Value) -> Result<()> {
        for (name, t) in tensors {
            match name.as_str() {
                "exp_avg" => self.exp_avg.copy_(&t),
                "exp_avg_sq" => self.exp_avg_sq.copy_(&t),
                other => return Err(crate::other!("AdamW checkpoint: unexpected state `{other}`")),
            }
        }
        self.step = scalars.get("step").and_then(|v| v.as_u64()).ok_or_else(|| crate::other!("AdamW checkpoint: missing step"))?;
        Ok(())
    }
}
