//! Benchmark hook: with `UNLEARN_COMM_TIMING=1`, [`super::init`] wraps the backend so that the wall
//! time spent inside collectives is summed, and the trainer logs it per step (`comm_s` in
//! metrics.jsonl); benches/bench.py divides it by the step time for the exposed-communication
//! share. MPI collectives block, so on CPU the sum is exactly the time the step waited on them
//! (load imbalance between ranks included); NCCL calls return once enqueued, so there it only
//! counts the host side. Off, and absent from the logs, in normal use.

use std::cell::Cell;
use std::time::Instant;

use tch::Tensor;

use super::{Collective, Comm};
use crate::Result;

pub struct Timed {
    inner: Comm,
    spent: Cell<f64>,
}

impl Timed {
    pub fn wrap(inner: Comm) -> Self {
        Timed { inner, spent: Cell::new(0.0) }
    }

    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.spent.set(self.spent.get() + t0.elapsed().as_secs_f64());
        out
    }
}

/// Whether the environment asks for collective timing.
pub fn requested() -> bool {
    std::env::var_os("UNLEARN_COMM_TIMING").is_some_and(|v| v == "1")
}

impl Collective for Timed {
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
        self.time(|| self.inner.all_reduce_sum(t))
    }
    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        self.time(|| self.inner.reduce_scatter_sum(full, shard))
    }
    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        self.time(|| self.inner.all_gather(shard, full))
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.time(|| self.inner.broadcast(t, root))
    }
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        self.time(|| self.inner.all_reduce_f64(v))
    }
    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        self.time(|| self.inner.all_reduce_max_f64(v))
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.time(|| self.inner.broadcast_bytes(bytes, root))
    }
    fn barrier(&self) -> Result<()> {
        self.time(|| self.inner.barrier())
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
    fn take_collective_seconds(&self) -> Option<f64> {
        Some(self.spent.replace(0.0))
    }
}
