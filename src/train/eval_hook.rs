//! What the in-run evaluation (`crate::monitor`) needs from the trainer: the live student as a
//! plain model, a copy of the weights to go back to, and the model's facts.

use tch::{Device, Kind, Tensor};

use super::{net, params, Trainer};
use crate::dist::Collective;
use crate::model::{Config, Llama};
use crate::Result;

impl Trainer {
    /// Run `f` on the current student as a whole model (collective: under ZeRO 3 every rank
    /// all-gathers the weights into a temporary replica first, released when `f` returns).
    pub fn with_eval_model<R>(&mut self, f: impl FnOnce(&Llama, &dyn Collective) -> Result<R>) -> Result<R> {
        if !self.student.is_gathered() {
            return f(self.student.ready()?, &*self.comm);
        }
        let full = net::gathered_replica(&self.layout, &*self.comm, &self.master, self.kind, self.device)?;
        let mut model = self.student.ready()?.shallow_copy();
        params::bind(&mut model, &self.layout, &full, 0, None, false);
        f(&model, &*self.comm)
    }

    pub fn model_config(&self) -> &Config {
        self.student.config()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// A copy of this rank's fp32 master shard (the state [`Trainer::restore_snapshot`] goes back to).
    pub fn snapshot(&self) -> Tensor {
        self.master.copy()
    }

    /// Put a [`Trainer::snapshot`] back into the master and the replicas (collective). Only the
    /// weights: the run stops after it, so optimizer and method state are left as they are.
    pub fn restore_snapshot(&mut self, shard: &Tensor) -> Result<()> {
        self.settle_replicas()?;
        tch::no_grad(|| self.master.copy_(shard));
        self.student.sync(&self.layout, &*self.comm, &self.master, self.cfg.dist.overlap)
    }
}
