//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias correction, no amsgrad),
//! written with the same in-place operations as torch's single-tensor implementation, so that the
//! same inputs give the same bits.
//!
//! The shard is updated piece by piece with two small scratch buffers: no temporary the size of
//! the shard is ever allocated (at 7B one would be gigabytes; on CPU each fresh one is also
//! page-faulted in and zeroed by the kernel, which cost ~5% of a SmolLM2 step).

use tch::{Kind, Tensor};

/// Elements per piece of the update (4 MiB of fp32 per scratch buffer).
const PIECE: i64 = 1 << 20;

use super::Optimizer;
use crate::Result;

pub struct AdamW {
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Scratch for one piece: the denominator and the scaled first moment.
    scratch: (Tensor, Tensor),
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
            scratch: (Tensor::empty([0], (Kind::Float, shard.device())), Tensor::empty([0], (Kind::Float, shard.device()))),
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        let (b1, b2) = self.betas;
        self.step += 1;
        let step_size = lr / (1.0 - b1.powi(self.step as i32));
        let bc2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        let n = params.numel() as i64;
        if self.scratch.0.numel() as i64 != PIECE.min(n) {
            let opts = (Kind::Float, params.device());
            self.scratch = (Tensor::empty([PIECE.min(n)], opts), Tensor::empty([PIECE.min(n)], opts));
        }
        let mut off = 0;
        while off < n {
            let len = PIECE.min(n - off);
            let (mut p, g) = (params.narrow(0, off, len), grad.narrow(0, off, len));
            let (mut m, mut v) = (self.exp_avg.narrow(0, off, len), self.exp_avg_sq.narrow(0, off, len));
            let (mut denom, scaled) = (self.scratch.0.narrow(0, 0, len), self.scratch.1.narrow(0, 0, len));
            // torch: param.mul_(1 - lr·wd); exp_avg.lerp_(grad, 1 - β1);
            // exp_avg_sq.mul_(β2).addcmul_(grad, grad, value=1 - β2);
            // denom = (exp_avg_sq.sqrt() / √bc2).add_(eps); param.addcdiv_(exp_avg, denom, value=-lr/bc1).
            // tch's addcmul_/addcdiv_ take no `value`: it is folded into one factor, (1-β2)·g and
            // -step_size·m, which multiplies in the order torch's kernel does.
            let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
            let _ = m.f_lerp_(&g, 1.0 - b1)?;
            let _ = g.f_mul_scalar_out(&scaled, 1.0 - b2)?;
            let _ = v.f_mul_scalar_(b2)?;
            let _ = v.f_addcmul_(&scaled, &g)?;
            let _ = v.f_sqrt_out(&denom)?;
            let _ = denom.f_div_scalar_(bc2_sqrt)?;
            let _ = denom.f_add_scalar_(self.eps)?;
            let _ = m.f_mul_scalar_out(&scaled, -step_size)?;
            let _ = p.f_addcdiv_(&scaled, &denom)?;
            off += len;
        }
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
