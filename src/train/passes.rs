//! The passes a method runs before training ([`methods::Passes`]): NPO's reference
//! log-likelihoods, one number per forget example.
//!
//! Examples are dealt round-robin over the ranks, each rank runs its share in batches of its
//! per-rank micro-batch (the memory of one training micro-batch, no more), and one all-reduce
//! brings every number to every rank. Every rank runs the same number of batches even when the
//! examples do not divide evenly: a student forward under ZeRO-3 gathers every layer from all
//! ranks, so a rank with no examples left runs its share of those gathers on a stand-in batch
//! whose result it drops (otherwise the ranks with one more batch wait forever in a gather).

use tch::{Device, Kind, Tensor};

use super::backward::{forward_logits, Weights};
use super::{Net, ObjectiveState};
use crate::data::{collate, Batch, Example};
use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::methods::{Objective, PassModel, Passes};
use crate::model::load_model;
use crate::progress::Progress;
use crate::Result;

pub(super) struct Runner<'a> {
    pub student: &'a mut Net,
    pub layout: &'a FlatLayout,
    pub comm: &'a dyn Collective,
    pub master: &'a Tensor,
    pub kind: Kind,
    pub device: Device,
    pub pad_id: i64,
    pub objectives: &'a [ObjectiveState],
    pub rows_per_rank: usize,
}

impl Passes for Runner<'_> {
    fn per_example(
        &mut self,
        obj: Objective,
        model: PassModel,
        label: &str,
        value: &mut dyn FnMut(&Tensor, &Batch) -> Result<Vec<f64>>,
    ) -> Result<Vec<f64>> {
        let examples: &[Example] = self
            .objectives
            .iter()
            .find(|s| s.obj == obj)
            .ok_or_else(|| crate::other!("a pass over the {} set, which this method does not load", obj.name()))?
            .loader
            .examples();
        crate::dist::watchdog::set_phase(format!("the {label} pass before training"));
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mine: Vec<usize> = (rank..examples.len()).step_by(world).collect();
        let rows = self.rows_per_rank.max(1);
        let batches = examples.len().div_ceil(world).div_ceil(rows);
        let mut separate = match model {
            PassModel::Load(dir) => Some(load_model(dir, self.kind, self.device)?.model),
            PassModel::Student => None,
        };
        let student_gathers = separate.is_none() && self.student.is_gathered();
        let mut out = vec![0f64; examples.len()];
        let bar = Progress::new(mine.len() as u64, label);
        for k in 0..batches {
            let chunk = &mine[(k * rows).min(mine.len())..((k + 1) * rows).min(mine.len())];
            if chunk.is_empty() && !student_gathers {
                continue;
            }
            let rows: Vec<&Example> = if chunk.is_empty() { vec![&examples[0]] } else { chunk.iter().map(|&i| &examples[i]).collect() };
            let batch = collate(&rows, self.pad_id, self.device);
            let logits = match separate.as_mut() {
                Some(m) => forward_logits(m, self.layout, &mut Weights::Resident, &batch)?,
                None => {
                    let (model, mut w) = self.student.pass(self.comm, self.master, self.kind);
                    forward_logits(model, self.layout, &mut w, &batch)?
                }
            };
            if chunk.is_empty() {
                continue; // the stand-in batch: its gathers were the point
            }
            let values = value(&logits, &batch)?;
            if values.len() != chunk.len() {
                return Err(crate::other!("{label} pass: {} values for a batch of {} examples", values.len(), chunk.len()));
            }
            for (&i, v) in chunk.iter().zip(values) {
                out[i] = v;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish();
        self.comm.all_reduce_f64(&mut out)?;
        Ok(out)
    }
}
