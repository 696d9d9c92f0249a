//! SGD with momentum exactly as `torch.optim.SGD` (no dampening, no Nesterov): the first step's
//! buffer is the gradient itself, weight decay is added to the gradient (coupled).

use tch::Tensor;

use super::Optimizer;
use crate::Result;

pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
    buf: Option<Tensor>,
}

impl Sgd {
    pub fn new(_shard: &Tensor, momentum: f64, weight_decay: f64) -> Self {
        Sgd { momentum, weight_decay, buf: None }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
        let mut d = if self.weight_decay != 0.0 { grad + &*params * self.weight_decay } else { grad.shallow_clone() };
        if self.momentum != 0.0 {
            let buf = match self.buf.take() {
                None => d.copy(),
                Some(mut b) => {
                    let _ = b.f_mul_scalar_(self.momentum)?;
                    let _ = b.f_add_(&d)?;
                    b
                }
            };
            d = buf.shallow_clone();
            self.buf = Some(buf);
        }
        let _ = params.f_sub_(&(d * lr))?;
        Ok(())
    }
    fn state(&self) -> Vec<(&'static str, Tensor)> {
        match &self.buf {
            Some(b) => vec![("momentum_buffer", b.shallow_clone())],
            None => vec![],
        }
    }
    fn scalars(&self) -> serde_json::Value {
        serde_json::json!({ "has_momentum_buffer": self.buf.is_some() })
    }
    fn restore(&mut self, tensors: Vec<(String, Tensor)>, _scalars: &serde_json::Value) -> Result<()> {
        self.buf = None;
        for (name, t) in tensors {
            match name.as_str() {
                "momentum_buffer" => self.buf = Some(t),
                other => return Err(crate::other!("SGD checkpoint: unexpected state `{other}`")),
            }
        }
        Ok(())
    }
}
