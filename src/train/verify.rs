//! The cross-rank check of the replicated weights (`dist.verify_every`).

use super::net::Net;
use super::Trainer;
use crate::Result;

impl Trainer {
    /// Fault injection for the divergence-check test: `UNLEARN_FAULT_PERTURB=RANK:STEP` nudges
    /// that rank's student replica before the check of that step. Never set in normal use.
    pub(super) fn fault_injection_perturb(&mut self, step: u64) {
        let Ok(v) = std::env::var("UNLEARN_FAULT_PERTURB") else { return };
        let Some((r, s)) = v.split_once(':') else { return };
        if r.parse() == Ok(self.comm.rank()) && s.parse() == Ok(step) {
            if let Some(full) = self.student.replica() {
                tch::no_grad(|| {
                    let _ = full.narrow(0, 0, 1).f_add_scalar_(1e-3);
                });
            }
        }
    }

    /// Fail loudly if the replicated buffers differ across ranks.
    pub(super) fn verify_replicas(&self) -> Result<()> {
        let replicas = [("student", self.student.replica()), ("teacher", self.teacher.as_ref().and_then(Net::replica))];
        for (name, t) in replicas {
            let Some(t) = t else { continue };
            let (sum, sq) = crate::dist::zero::checksum(t);
            let mut v = [sum, sq, -sum, -sq];
            self.comm.all_reduce_max_f64(&mut v)?;
            if v[0] != -v[2] || v[1] != -v[3] {
                return Err(crate::Error::Mismatch(format!(
                    "step {}: {name} weights differ across ranks (checksum range {:.9e}..{:.9e})",
                    self.step, -v[2], v[0]
                )));
            }
        }
        Ok(())
    }
}
