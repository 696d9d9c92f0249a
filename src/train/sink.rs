//! Gradient accumulators: where backward's per-parameter gradients go.
//!
//! ZeRO 0/1 accumulate into one full-length fp32 buffer per objective and all-reduce it once per
//! step. ZeRO 2/3 keep only this rank's shard: each bucket's gradient is assembled in a transient
//! fp32 buffer and reduce-scattered into the shard as soon as its layer is done, micro-batch by
//! micro-batch (the reduction is linear, so summing reduced micro-batch gradients is the same as
//! reducing their sum).

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::backward::GradSink;
use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::Result;

pub enum Accumulator {
    /// Full flat buffer (ZeRO 0/1).
    Full(Tensor),
    /// This rank's shard plus the buckets of the layer being reduced (ZeRO 2/3).
    Sharded { shard: Tensor, pending: BTreeMap<usize, Tensor> },
}

impl Accumulator {
    pub fn new(layout: &FlatLayout, sharded: bool, device: Device) -> Self {
        if sharded {
            Accumulator::Sharded { shard: Tensor::zeros([layout.shard_len()], (Kind::Float, device)), pending: BTreeMap::new() }
        } else {
            Accumulator::Full(Tensor::zeros([layout.total], (Kind::Float, device)))
        }
    }

    pub fn zero_(&mut self) {
        match self {
            Accumulator::Full(t) => {
                let _ = t.zero_();
            }
            Accumulator::Sharded { shard, pending } => {
                let _ = shard.zero_();
                pending.clear();
            }
        }
    }

    /// Finish the step: reduce (ZeRO 0/1) and return this rank's gradient shard.
    pub fn reduced_shard(&mut self, layout: &FlatLayout, comm: &dyn Collective, rank: usize) -> Result<Tensor> {
        match self {
            Accumulator::Full(full) => {
                layout.all_reduce_full(comm, full)?;
                Ok(if layout.shards == 1 { full.shallow_clone() } else { layout.extract_shard(full, rank) })
            }
            Accumulator::Sharded { shard, .. } => Ok(shard.shallow_clone()),
        }
    }
}

/// Binds an accumulator to the layout and communicator for one backward pass.
pub struct Sink<'a> {
    pub acc: &'a mut Accumulator,
    pub layout: &'a FlatLayout,
    pub comm: &'a dyn Collective,
}

impl GradSink for Sink<'_> {
    fn add(&mut self, param: usize, grad: &Tensor) -> Result<()> {
        let p = &self.layout.params[param];
        // Added straight into fp32 buffers: a bf16 gradient is widened exactly by add_, no copy.
        let g = grad.reshape([-1]);
        match &mut *self.acc {
            Accumulator::Full(full) => {
                let _ = full.narrow(0, p.offset, p.numel).f_add_(&g)?;
            }
            Accumulator::Sharded { pending, shard } => {
                let bk = &self.layout.buckets[p.bucket];
                let buf = pending.entry(p.bucket).or_insert_with(|| Tensor::zeros([bk.padded], (Kind::Float, shard.device())));
                let _ = buf.narrow(0, p.offset - bk.offset, p.numel).f_add_(&g)?;
            }
        }
        Ok(())
    }

    fn bucket_done(&mut self, b: usize) -> Result<()> {
        if let Accumulator::Sharded { shard, pending } = &mut *self.acc {
            let buf = pending.remove(&b).ok_or_else(|| crate::other!("no gradient reached bucket {b}"))?;
            self.layout.reduce_scatter_add(self.comm, b, &buf, shard)?;
        }
        Ok(())
    }

    fn layer_done(&mut self, layer: Option<usize>) -> Result<()> {
        for b in self.layout.layer_buckets(layer) {
            self.bucket_done(b)?;
        }
        Ok(())
    }
}
