//! The cross-rank check of the replicated weights (`dist.verify_every`).

use super::Trainer;
use crate::Result;

impl Trainer {
    /// Fault injection for the divergence-check test: `UNLEARN_FAULT_PERTURB=RANK:STEP` nudges
    /// that rank's student replica before the check of that step. Never set in normal use.
    pub(super) fn fault_injection_perturb(&mut self, step: u64) {
        let Ok(v) = std::env::var("UNLEARN_FAULT_PERTURB") else { return };
        let Some((r, s)) = v.split_once(':') else { return };
        if r.parse() == Ok(self.comm.rank()) && s.parse() == Ok(step) {
            if let Ok(Some(full)) = self.student.replica() {
                tch::no_grad(|| {
                    let _ = full.narrow(0, 0, 1).f_add_scalar_(1e-3);
                });
            }
        }
    }

    /// Fail loudly if the replicated buffers differ across ranks.
    pub(super) fn verify_replicas(&mut self) -> Result<()> {
        let student = self.student.replica()?.map(|t| t.shallow_clone());
        let teacher = match self.teacher.as_mut() {
            Some(t) => t.replica()?.map(|t| t.shallow_clone()),
            None => None,
        };
        for (name, t) in [("student", student), ("teacher", teacher)] {
            let Some(t) = t else { continue };
            let t = &t;
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
