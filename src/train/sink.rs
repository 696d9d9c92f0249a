//! Gradient accumulators: where backward's per-parameter gradients go, and when they are reduced.
//!
//! A method whose direction reads only a weighted sum of its objectives' gradients
//! (`Gradients::WeightedSum`) has one accumulator: each objective's loss is scaled by its weight
//! before backward, so every pass adds into the same buffer and the step reduces it once. NGDiff
//! (`Gradients::Separate`) has one per objective.
//!
//! When (`dist.reduce`, resolved by [`ReduceAt`]):
//! * `Step`: micro-batch gradients are summed locally in a full-length fp32 buffer and reduced once
//!   per optimizer step, bucket by bucket, during the backward of the last pass that reaches the
//!   accumulator (the last micro-batch's last objective): a bucket's collective starts as soon as
//!   its gradients are final and runs while backward computes the layers below. ZeRO-0 all-reduces
//!   each bucket in place; ZeRO ≥ 1 reduce-scatters it straight into this rank's shard.
//! * `MicroBatch` (ZeRO-2/3 when a full fp32 buffer does not fit): only the shard is kept; each
//!   bucket of every pass is assembled in a transient buffer and reduce-scattered as soon as it is
//!   complete, and the received piece is added into the shard when the collective finishes (the
//!   reduction is linear, so the sum of reduced pieces is the reduction of the sum).
//!
//! Collectives run on the backend's communication thread or stream while backward goes on; the
//! accumulator keeps each one's buffers until [`Accumulator::finish`] waits for them, the step's
//! only synchronisation with the communication. With `dist.reduce_dtype = "bf16"` a bucket is
//! rounded to bf16 for the wire (half the bytes) and the reduced values are widened back into the
//! fp32 shard; with one rank nothing travels and nothing is rounded.

use std::collections::{BTreeMap, VecDeque};

use tch::{Device, Kind, Tensor};

use super::backward::GradSink;
use crate::dist::zero::FlatLayout;
use crate::dist::{Collective, Handle};
use crate::Result;

/// When an accumulator is reduced (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceAt {
    Step,
    MicroBatch,
}

/// Transient bucket buffers of `MicroBatch` reductions allowed in flight before the oldest is
/// waited for: bounds the memory when the network is slower than backward.
pub const MAX_IN_FLIGHT: usize = 4;

/// What to do with a collective's output once it has finished.
enum Finish {
    /// Nothing: it wrote its result where it belongs.
    InPlace,
    /// Add the received piece into the shard at `offset` (micro-batch reductions).
    Add { piece: Tensor, offset: i64 },
    /// Copy (widen) the received bf16 piece into the shard at `offset`.
    Widen { piece: Tensor, offset: i64 },
}

struct Reduction {
    handle: Handle,
    finish: Finish,
}

pub struct Accumulator {
    at: ReduceAt,
    /// Full-length fp32 sum of this rank's gradients over the step (`Step`).
    local: Option<Tensor>,
    /// This rank's reduced gradient shard; the same tensor as `local` under one shard.
    shard: Tensor,
    /// `MicroBatch`: the buckets of the pass being assembled.
    pending: BTreeMap<usize, Tensor>,
    /// `Step`: which buckets' reductions were issued this step.
    issued: Vec<bool>,
    in_flight: VecDeque<Reduction>,
}

impl Accumulator {
    pub fn new(layout: &FlatLayout, at: ReduceAt, device: Device) -> Self {
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, device));
        let (at, local, shard) = if layout.shards == 1 {
            let full = zeros(layout.total);
            (ReduceAt::Step, Some(full.shallow_clone()), full)
        } else if at == ReduceAt::Step {
            (at, Some(zeros(layout.total)), zeros(layout.shard_len()))
        } else {
            (at, None, zeros(layout.shard_len()))
        };
        Accumulator { at, local, shard, pending: BTreeMap::new(), issued: vec![false; layout.buckets.len()], in_flight: VecDeque::new() }
    }

    pub fn zero_(&mut self) {
        debug_assert!(self.in_flight.is_empty(), "zeroing an accumulator with collectives in flight");
        if let Some(l) = &mut self.local {
            let _ = l.zero_();
        }
        let _ = self.shard.zero_();
        self.pending.clear();
        self.issued.iter_mut().for_each(|i| *i = false);
    }

    /// Finish the step: reduce what was not reduced yet, wait for every collective, and return
    /// this rank's reduced gradient shard.
    pub fn finish(&mut self, layout: &FlatLayout, comm: &dyn Collective, dtype: Kind) -> Result<Tensor> {
        if self.at == ReduceAt::Step {
            for b in 0..layout.buckets.len() {
                if !self.issued[b] {
                    self.reduce_bucket(layout, comm, b, dtype)?;
                }
            }
        }
        while self.retire_oldest()? {}
        Ok(self.shard.shallow_clone())
    }

    /// Start the step's reduction of bucket `b` of the local sum.
    fn reduce_bucket(&mut self, layout: &FlatLayout, comm: &dyn Collective, b: usize, dtype: Kind) -> Result<()> {
        self.issued[b] = true;
        if comm.world() == 1 {
            return Ok(());
        }
        let bk = &layout.buckets[b];
        let local = self.local.as_ref().expect("a local sum under reduce = step").narrow(0, bk.offset, bk.padded);
        let wide = dtype == Kind::Float;
        let reduction = if layout.shards == 1 {
            if wide {
                Reduction { handle: comm.start_all_reduce(local)?, finish: Finish::InPlace }
            } else {
                let piece = local.to_kind(dtype);
                Reduction { handle: comm.start_all_reduce(piece.shallow_clone())?, finish: Finish::Widen { piece, offset: bk.offset } }
            }
        } else {
            let (offset, per) = (layout.shard_offset(b), bk.padded / layout.shards as i64);
            if wide {
                Reduction { handle: comm.start_reduce_scatter(local, self.shard.narrow(0, offset, per))?, finish: Finish::InPlace }
            } else {
                let piece = Tensor::empty([per], (dtype, local.device()));
                Reduction {
                    handle: comm.start_reduce_scatter(local.to_kind(dtype), piece.shallow_clone())?,
                    finish: Finish::Widen { piece, offset },
                }
            }
        };
        self.in_flight.push_back(reduction);
        Ok(())
    }

    /// Start the micro-batch reduce-scatter of an assembled bucket buffer.
    fn reduce_pass_bucket(&mut self, layout: &FlatLayout, comm: &dyn Collective, b: usize, buf: Tensor, dtype: Kind) -> Result<()> {
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.retire_oldest()?;
        }
        let bk = &layout.buckets[b];
        let (offset, per) = (layout.shard_offset(b), bk.padded / layout.shards as i64);
        let piece = Tensor::empty([per], (dtype, buf.device()));
        let send = if dtype == Kind::Float { buf } else { buf.to_kind(dtype) };
        let handle = comm.start_reduce_scatter(send, piece.shallow_clone())?;
        self.in_flight.push_back(Reduction { handle, finish: Finish::Add { piece, offset } });
        Ok(())
    }

    /// Fold in the collectives that have already finished (never blocks).
    fn retire_finished(&mut self) -> Result<()> {
        while self.in_flight.front_mut().is_some_and(|r| r.handle.is_done()) {
            self.retire_oldest()?;
        }
        Ok(())
    }

    /// Wait for the oldest collective in flight and fold its result in; false when none is left.
    fn retire_oldest(&mut self) -> Result<bool> {
        let Some(r) = self.in_flight.pop_front() else { return Ok(false) };
        r.handle.wait()?;
        tch::no_grad(|| -> Result<()> {
            match r.finish {
                Finish::InPlace => {}
                Finish::Add { piece, offset } => {
                    let _ = self.shard.narrow(0, offset, piece.numel() as i64).f_add_(&piece)?;
                }
                Finish::Widen { piece, offset } => {
                    self.shard.narrow(0, offset, piece.numel() as i64).f_copy_(&piece)?;
                }
            }
            Ok(())
        })?;
        Ok(true)
    }
}

/// One pass's view of an accumulator: where its gradients go and what it reduces.
pub struct Sink<'a> {
    pub acc: &'a mut Accumulator,
    pub layout: &'a FlatLayout,
    pub comm: &'a dyn Collective,
    /// No later pass of this step adds to the accumulator: reduce each bucket as it completes.
    pub last: bool,
    /// The wire dtype of reductions (`dist.reduce_dtype`).
    pub dtype: Kind,
    /// Wait for each collective as soon as it is issued (`dist.overlap = false`).
    pub blocking: bool,
    /// ‖g‖² of this pass's gradients, summed in f64 on the device (a local norm estimate).
    pub sq_norm: Option<&'a mut Tensor>,
}

impl Sink<'_> {
    fn issued(&mut self) -> Result<()> {
        if self.blocking {
            while self.acc.retire_oldest()? {}
        } else {
            self.acc.retire_finished()?;
        }
        Ok(())
    }
}

impl GradSink for Sink<'_> {
    fn add(&mut self, param: usize, grad: &Tensor) -> Result<()> {
        let p = &self.layout.params[param];
        // Added straight into fp32 buffers: a bf16 gradient is widened exactly by add_, no copy.
        let g = grad.reshape([-1]);
        if let Some(sq) = self.sq_norm.as_deref_mut() {
            *sq += g.square().sum(Kind::Double);
        }
        match &self.acc.local {
            Some(local) => {
                let _ = local.narrow(0, p.offset, p.numel).f_add_(&g)?;
            }
            None => {
                let bk = &self.layout.buckets[p.bucket];
                let dev = self.acc.shard.device();
                let buf = self.acc.pending.entry(p.bucket).or_insert_with(|| Tensor::zeros([bk.padded], (Kind::Float, dev)));
                let _ = buf.narrow(0, p.offset - bk.offset, p.numel).f_add_(&g)?;
            }
        }
        Ok(())
    }

    fn bucket_done(&mut self, b: usize) -> Result<()> {
        match self.acc.at {
            ReduceAt::Step if self.last => self.acc.reduce_bucket(self.layout, self.comm, b, self.dtype)?,
            ReduceAt::Step => return Ok(()),
            ReduceAt::MicroBatch => {
                let buf = self.acc.pending.remove(&b).ok_or_else(|| crate::other!("no gradient reached bucket {b}"))?;
                self.acc.reduce_pass_bucket(self.layout, self.comm, b, buf, self.dtype)?;
            }
        }
        self.issued()
    }

    fn layer_done(&mut self, layer: Option<usize>) -> Result<()> {
        for b in self.layout.layer_buckets(layer) {
            self.bucket_done(b)?;
        }
        Ok(())
    }
}
