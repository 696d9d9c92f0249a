//! The trained student written as an HF model directory.

use std::path::Path;

use tch::{Kind, Tensor};

use super::{params, Trainer};
use crate::dist::watchdog;
use crate::fault::{self, Fault};
use crate::model::param_specs;
use crate::Result;

impl Trainer {
    /// Write the current student as an HF model directory (rank 0 writes; every rank takes part
    /// in the per-bucket gathers, so no rank ever holds the fp32 model twice).
    pub fn save_final(&mut self, out: &Path) -> Result<()> {
        self.save_model(out, &|_| Ok(()))
    }

    /// [`Trainer::save_final`], with `extra` adding files (record.json, README.md) to the
    /// directory before it is published: the directory appears complete or not at all.
    pub fn save_model(&mut self, out: &Path, extra: &dyn Fn(&Path) -> Result<()>) -> Result<()> {
        watchdog::set_phase(format!("writing the model directory {}", out.display()));
        self.settle_replicas()?;
        let cfg = self.student.config().clone();
        let specs = param_specs(&cfg);
        let index = params::param_index(&self.layout);
        let mut writer = if self.is_main() {
            Some(crate::model::weights::HfWriter::create(
                out,
                &self.raw_config,
                &specs,
                self.kind,
                crate::model::weights::DEFAULT_MAX_SHARD_BYTES,
            )?)
        } else {
            None
        };
        let frozen: std::collections::HashMap<String, Tensor> =
            self.student.ready()?.named_params().into_iter().filter(|(n, _)| !index.contains_key(n)).collect();
        let mut cached: Option<(usize, Tensor)> = None;
        for (i, s) in specs.iter().enumerate() {
            if i == specs.len() / 2 {
                fault::check(Fault::FinalModel, self.step, "writing the final model")?;
            }
            let t = match index.get(&s.name) {
                None => frozen[&s.name].shallow_clone(),
                Some(&i) => {
                    let p = &self.layout.params[i];
                    if cached.as_ref().map(|c| c.0) != Some(p.bucket) {
                        let bk = &self.layout.buckets[p.bucket];
                        let mut buf = Tensor::zeros([bk.padded], (Kind::Float, self.device));
                        let _g = watchdog::enter(format!("all_gather bucket {} of the final model", p.bucket));
                        self.layout.gather_buckets(&*self.comm, &self.master, &mut buf, &[p.bucket], bk.offset)?;
                        cached = Some((p.bucket, buf));
                    }
                    let (_, buf) = cached.as_ref().unwrap();
                    let bk = &self.layout.buckets[p.bucket];
                    buf.narrow(0, p.offset - bk.offset, p.numel).view(p.shape.as_slice())
                }
            };
            if let Some(w) = writer.as_mut() {
                w.write(&s.name, &t)?;
            }
        }
        if let Some(w) = writer {
            w.finish_with(Some(&self.cfg.model.path), extra)?;
        }
        let _g = watchdog::enter("barrier after rank 0 wrote a model directory");
        self.comm.barrier()
    }
}
