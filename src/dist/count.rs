//! Counting collectives: a wrapper around any backend that tallies, per operation, the calls and
//! the payload bytes this rank hands to it (all-reduce and broadcast: the buffer; reduce-scatter:
//! the full input; all-gather: the full output; scalars and bytes: their length). The trainer
//! reads and resets the tally every step, so that the bytes each method and ZeRO stage put on the
//! wire can be logged (`UNLEARN_COUNT_COLLECTIVES=1`) and asserted in tests.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Serialize;
use tch::Tensor;

use super::{tensor_bytes, Collective, Comm, Handle};
use crate::Result;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpCount {
    pub calls: u64,
    pub bytes: u64,
}

/// Calls and bytes per operation name since the last [`Tally::take`].
#[derive(Debug, Default)]
pub struct Tally(RefCell<BTreeMap<&'static str, OpCount>>);

impl Tally {
    fn add(&self, op: &'static str, bytes: u64) {
        let mut m = self.0.borrow_mut();
        let c = m.entry(op).or_default();
        c.calls += 1;
        c.bytes += bytes;
    }

    /// The counts so far, and start again from zero.
    pub fn take(&self) -> BTreeMap<&'static str, OpCount> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// `inner`, counted into `tally`.
pub struct Counted {
    inner: Comm,
    tally: Rc<Tally>,
}

impl Counted {
    pub fn wrap(inner: Comm) -> (Comm, Rc<Tally>) {
        let tally = Rc::new(Tally::default());
        (Rc::new(Counted { inner, tally: tally.clone() }), tally)
    }
}

impl Collective for Counted {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.tally.add("all_reduce", tensor_bytes(t));
        self.inner.all_reduce_sum(t)
    }
    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        self.tally.add("reduce_scatter", tensor_bytes(full));
        self.inner.reduce_scatter_sum(full, shard)
    }
    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        self.tally.add("all_gather", tensor_bytes(full));
        self.inner.all_gather(shard, full)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.tally.add("broadcast", tensor_bytes(t));
        self.inner.broadcast(t, root)
    }
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        self.tally.add("all_reduce_f64", 8 * v.len() as u64);
        self.inner.all_reduce_f64(v)
    }
    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        self.tally.add("all_reduce_max_f64", 8 * v.len() as u64);
        self.inner.all_reduce_max_f64(v)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.tally.add("broadcast_bytes", bytes.len() as u64);
        self.inner.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<()> {
        self.tally.add("barrier", 0);
        self.inner.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
    fn start_all_reduce(&self, t: Tensor) -> Result<Handle> {
        self.tally.add("all_reduce", tensor_bytes(&t));
        self.inner.start_all_reduce(t)
    }
    fn start_reduce_scatter(&self, full: Tensor, shard: Tensor) -> Result<Handle> {
        self.tally.add("reduce_scatter", tensor_bytes(&full));
        self.inner.start_reduce_scatter(full, shard)
    }
    fn start_all_gather(&self, shard: Tensor, full: Tensor) -> Result<Handle> {
        self.tally.add("all_gather", tensor_bytes(&full));
        self.inner.start_all_gather(shard, full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn calls_and_bytes_are_tallied_per_operation_and_reset() {
        let (comm, tally) = Counted::wrap(Rc::new(super::super::local::Local));
        let mut t = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        comm.all_reduce_sum(&mut t).unwrap();
        comm.start_all_reduce(t.shallow_clone()).unwrap().wait().unwrap();
        let full = Tensor::zeros([6], (Kind::BFloat16, Device::Cpu));
        comm.start_reduce_scatter(full, Tensor::zeros([6], (Kind::BFloat16, Device::Cpu))).unwrap().wait().unwrap();
        comm.all_reduce_f64(&mut [0.0; 3]).unwrap();
        let got = tally.take();
        assert_eq!(got["all_reduce"], OpCount { calls: 2, bytes: 80 });
        assert_eq!(got["reduce_scatter"], OpCount { calls: 1, bytes: 12 });
        assert_eq!(got["all_reduce_f64"], OpCount { calls: 1, bytes: 24 });
        assert!(tally.take().is_empty());
    }
}
