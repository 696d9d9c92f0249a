//! MPI backend (rsmpi) on CPU tensors: the backend the multi-rank tests use, and the bootstrap
//! channel of the NCCL backend.
//!
//! MPI itself belongs to `dist::world`: it is initialised there, on the main thread, with
//! `MPI_THREAD_MULTIPLE` requested, finalized there after success only, and aborted there after a
//! failure (see that module for why no drop may end it). This backend adds one communication
//! thread per `Mpi`, which makes every collective call: it runs them in the order the trainer
//! issues them. Blocking collectives send it a job and wait for the answer; the `start_*`
//! collectives return at once with a handle, so a bucket's gradient reduction runs while backward
//! computes the next layer (Open MPI's non-blocking collectives would only progress inside MPI
//! calls, which a rank busy in libtorch never makes). `MPI_THREAD_MULTIPLE` is what lets this
//! thread call MPI while main initialised it, main call `MPI_Abort` while this thread is blocked
//! in a collective, and benches/reduce.rs make its direct calls.
//!
//! The watchdog sees the caller's side: every wait for a job's answer (a blocking collective, or
//! the `wait` of a started one's handle) is registered with the operation's name and size while it
//! lasts, on the caller's thread, under whatever the trainer registered around it.
//!
//! Dropping an `Mpi` closes its queue and hands the thread to `dist::world`, which joins it before
//! `MPI_Finalize` (the thread frees its user operation on the way out); it never waits for the
//! thread itself, which on an error path may sit in a collective that a peer will never join.
//!
//! Dtypes: fp32 moves as MPI_FLOAT; bf16 moves as 16-bit words (half the bytes), reduced by a
//! user-defined operation that adds in fp32 and rounds to bf16 at every step, as NCCL's bf16 sum
//! does; other kinds are widened to fp32 on the host.

use std::ffi::{c_int, c_void};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use half::bf16;
use mpi::collective::{SystemOperation, UnsafeUserOperation};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use super::watchdog;
use super::{f32_slice, f32_slice_mut, Collective, Handle, InFlight};
use crate::Result;

/// MPI counts are C ints: move large buffers in pieces.
const CHUNK: usize = 1 << 28;

/// What the communication thread owns.
struct Ctx {
    world: SimpleCommunicator,
    /// Send copy for all-reduces (rsmpi has no MPI_IN_PLACE), grown to the largest bucket once.
    scratch_f32: Vec<f32>,
    scratch_u16: Vec<u16>,
    bf16_sum: UnsafeUserOperation,
    delay: Delay,
    gather_delay: Delay,
}

/// Test hooks (`UNLEARN_COMM_DELAY_MS=MS[:N]`, `UNLEARN_GATHER_DELAY_MS=MS[:N]`): sleep MS
/// milliseconds before each gradient reduction (tensor all-reduce or reduce-scatter), resp. each
/// tensor all-gather, or, with N, before N of them in a row and then not before the next N,
/// alternately (so that delayed and undelayed steps of one run can be compared under the same
/// machine load).
#[derive(Default)]
struct Delay {
    each: Option<Duration>,
    run: Option<u64>,
    count: u64,
}

impl Delay {
    fn from_env(var: &str) -> Delay {
        let Ok(v) = std::env::var(var) else { return Delay::default() };
        let (ms, run) = v.split_once(':').map_or((v.as_str(), None), |(a, b)| (a, b.parse().ok()));
        Delay { each: ms.parse::<u64>().ok().filter(|&m| m > 0).map(Duration::from_millis), run, count: 0 }
    }

    fn before(&mut self) {
        let Some(d) = self.each else { return };
        let on = self.run.is_none_or(|n| (self.count / n.max(1)).is_multiple_of(2));
        self.count += 1;
        if on {
            std::thread::sleep(d);
        }
    }
}

type Job = Box<dyn FnOnce(&mut Ctx) + Send>;

pub struct Mpi {
    rank: usize,
    world: usize,
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// `inout[i] = bf16(in[i] + inout[i])`, both read as bf16 bit patterns.
unsafe extern "C" fn bf16_sum(invec: *mut c_void, inoutvec: *mut c_void, len: *mut c_int, _dtype: *mut mpi::ffi::MPI_Datatype) {
    let n = *len as usize;
    let a = std::slice::from_raw_parts(invec as *const u16, n);
    let b = std::slice::from_raw_parts_mut(inoutvec as *mut u16, n);
    for (x, y) in a.iter().zip(b) {
        *y = bf16::from_f32(bf16::from_bits(*x).to_f32() + bf16::from_bits(*y).to_f32()).to_bits();
    }
}

/// A job's answer, once it has run on the communication thread, and what the job is (for the
/// watchdog's report: "mpi all_reduce_f64 of 7 elements").
struct Reply<T> {
    rx: Receiver<std::thread::Result<T>>,
    what: String,
}

impl<T> Reply<T> {
    /// Wait for the answer: the time a caller waits for a collective, watched and counted.
    fn get(self) -> Result<T> {
        let _g = watchdog::enter(self.what);
        match super::blocked(|| self.rx.recv()) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(crate::Error::Dist(format!("MPI communication thread: {}", panic_text(&panic)))),
            Err(_) => Err(crate::Error::Dist("the MPI communication thread has stopped".into())),
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panicked".into())
}

/// A collective issued with `start_*`, running on the communication thread.
struct Pending {
    reply: Option<Reply<()>>,
    done: Option<Result<()>>,
}

impl InFlight for Pending {
    fn is_done(&mut self) -> bool {
        if self.done.is_some() {
            return true;
        }
        let Some(r) = &self.reply else { return true };
        match r.rx.try_recv() {
            Ok(v) => {
                self.done = Some(v.map_err(|p| crate::Error::Dist(format!("MPI communication thread: {}", panic_text(&p)))));
                true
            }
            Err(TryRecvError::Empty) => false,
            Err(TryRecvError::Disconnected) => {
                self.done = Some(Err(crate::Error::Dist("the MPI communication thread has stopped".into())));
                true
            }
        }
    }
    fn wait(mut self: Box<Self>) -> Result<()> {
        match self.done.take() {
            Some(r) => r,
            None => self.reply.take().map_or(Ok(()), Reply::get),
        }
    }
}

impl Mpi {
    /// Join the job's MPI world (initialising MPI on this thread, the main one, on first use) and
    /// start the communication thread.
    pub fn init() -> Result<Self> {
        let world = super::world::mpi_world()?;
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let (delay, gather_delay) = (Delay::from_env("UNLEARN_COMM_DELAY_MS"), Delay::from_env("UNLEARN_GATHER_DELAY_MS"));
        let (jobs, queue) = channel::<Job>();
        let (ready_tx, ready) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mpi-comm".into())
            .spawn(move || {
                // A handle on MPI_COMM_WORLD (no MPI call); MPI is initialised by now.
                let world = SimpleCommunicator::world();
                // SAFETY: bf16_sum reads and writes exactly `len` 16-bit words of each buffer.
                let bf16_sum = unsafe { UnsafeUserOperation::commutative(bf16_sum) };
                let _ = ready_tx.send(());
                let mut ctx = Ctx { world, scratch_f32: vec![], scratch_u16: vec![], bf16_sum, delay, gather_delay };
                while let Ok(job) = queue.recv() {
                    job(&mut ctx);
                }
                // The operation is freed here, before `dist::world` finalizes (it joins this thread first).
            })
            .map_err(|e| crate::Error::Dist(format!("cannot start the MPI communication thread: {e}")))?;
        ready.recv().map_err(|_| crate::Error::Dist("the MPI communication thread stopped while starting".into()))?;
        Ok(Mpi { rank, world: size, jobs: Some(jobs), thread: Some(thread) })
    }

    /// Queue `f`, the collective `op` on `elems` elements, on the communication thread; its answer
    /// arrives on the returned reply.
    fn submit<T: Send + 'static>(&self, op: &str, elems: usize, f: impl FnOnce(&mut Ctx) -> T + Send + 'static) -> Result<Reply<T>> {
        let (tx, rx) = channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ctx))));
        });
        self.jobs
            .as_ref()
            .expect("jobs channel open until drop")
            .send(job)
            .map_err(|_| crate::Error::Dist("the MPI communication thread has stopped".into()))?;
        let what = if elems == 0 { format!("mpi {op}") } else { format!("mpi {op} of {elems} elements") };
        Ok(Reply { rx, what })
    }

    fn run<T: Send + 'static>(&self, op: &str, elems: usize, f: impl FnOnce(&mut Ctx) -> T + Send + 'static) -> Result<T> {
        self.submit(op, elems, f)?.get()
    }

    fn start(&self, op: &str, elems: usize, f: impl FnOnce(&mut Ctx) + Send + 'static) -> Result<Handle> {
        Ok(Box::new(Pending { reply: Some(self.submit(op, elems, f)?), done: None }))
    }
}

/// How a tensor travels: fp32 and bf16 as they are, anything else widened to fp32 on the host.
enum Wire {
    F32(Tensor),
    Bf16(Tensor),
}

impl Wire {
    /// A contiguous CPU view (or copy) of `t` for the wire.
    fn of(t: &Tensor) -> Wire {
        let ready = |k| t.kind() == k && t.device() == Device::Cpu && t.is_contiguous();
        if ready(Kind::Float) {
            Wire::F32(t.shallow_clone())
        } else if ready(Kind::BFloat16) {
            Wire::Bf16(t.shallow_clone())
        } else if t.kind() == Kind::BFloat16 {
            Wire::Bf16(t.to_device(Device::Cpu).contiguous())
        } else {
            Wire::F32(t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous())
        }
    }

    /// A receive buffer for `t` in the wire dtype of `like`: `t` itself when it already is one,
    /// else a fresh host buffer (fully overwritten by the collective, then copied into `t`).
    fn out(like: &Wire, t: &Tensor) -> Wire {
        let (kind, wrap): (Kind, fn(Tensor) -> Wire) = match like {
            Wire::F32(_) => (Kind::Float, Wire::F32),
            Wire::Bf16(_) => (Kind::BFloat16, Wire::Bf16),
        };
        if t.kind() == kind && t.device() == Device::Cpu && t.is_contiguous() {
            wrap(t.shallow_clone())
        } else {
            wrap(Tensor::empty([t.numel() as i64], (kind, Device::Cpu)))
        }
    }

    /// Whether results written into this buffer must be copied back into `t`.
    fn is_copy_of(&self, t: &Tensor) -> bool {
        let w = match self {
            Wire::F32(w) | Wire::Bf16(w) => w,
        };
        w.data_ptr() != t.data_ptr() || w.kind() != t.kind()
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Wire::F32(w) | Wire::Bf16(w) => w,
        }
    }
}

/// # Safety
/// `t` must be a contiguous CPU tensor of 2-byte elements, not aliased mutably elsewhere.
unsafe fn u16_slice_mut(t: &mut Tensor) -> &mut [u16] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut u16, t.numel())
}

/// # Safety
/// As [`u16_slice_mut`], read-only.
unsafe fn u16_slice(t: &Tensor) -> &[u16] {
    std::slice::from_raw_parts(t.data_ptr() as *const u16, t.numel())
}

fn all_reduce_on(ctx: &mut Ctx, t: &mut Tensor) {
    ctx.delay.before();
    let mut wire = Wire::of(t);
    match &mut wire {
        Wire::F32(w) => {
            // SAFETY: contiguous CPU f32, exclusively ours until the handle is waited on.
            let data = unsafe { f32_slice_mut(w) };
            for piece in data.chunks_mut(CHUNK) {
                ctx.scratch_f32.clear();
                ctx.scratch_f32.extend_from_slice(piece);
                ctx.world.all_reduce_into(&ctx.scratch_f32[..], piece, SystemOperation::sum());
            }
        }
        Wire::Bf16(w) => {
            // SAFETY: contiguous CPU bf16.
            let data = unsafe { u16_slice_mut(w) };
            for piece in data.chunks_mut(CHUNK) {
                ctx.scratch_u16.clear();
                ctx.scratch_u16.extend_from_slice(piece);
                ctx.world.all_reduce_into(&ctx.scratch_u16[..], piece, &ctx.bf16_sum);
            }
        }
    }
    if wire.is_copy_of(t) {
        t.copy_(wire.tensor());
    }
}

/// Block r of every `CHUNK`-sized piece of `send` (world blocks of `n`) goes to rank r.
fn scatter_pieces<T: Equivalence + Copy>(world: &SimpleCommunicator, send: &[T], recv: &mut [T], op: impl Operation + Copy) {
    let (n, w) = (recv.len(), world.size() as usize);
    if n <= CHUNK {
        world.reduce_scatter_block_into(send, recv, op);
        return;
    }
    let mut off = 0;
    while off < n {
        let len = CHUNK.min(n - off);
        let mut piece = Vec::with_capacity(len * w);
        for r in 0..w {
            piece.extend_from_slice(&send[r * n + off..r * n + off + len]);
        }
        world.reduce_scatter_block_into(&piece[..], &mut recv[off..off + len], op);
        off += len;
    }
}

fn gather_pieces<T: Equivalence + Copy + Default>(world: &SimpleCommunicator, send: &[T], recv: &mut [T]) {
    let (n, w) = (send.len(), world.size() as usize);
    if n <= CHUNK {
        world.all_gather_into(send, recv);
        return;
    }
    let mut off = 0;
    while off < n {
        let len = CHUNK.min(n - off);
        let mut piece = vec![T::default(); len * w];
        world.all_gather_into(&send[off..off + len], &mut piece[..]);
        for r in 0..w {
            recv[r * n + off..r * n + off + len].copy_from_slice(&piece[r * len..(r + 1) * len]);
        }
        off += len;
    }
}

fn reduce_scatter_on(ctx: &mut Ctx, full: &Tensor, shard: &mut Tensor) {
    ctx.delay.before();
    let send = Wire::of(full);
    let mut recv = Wire::out(&send, shard);
    let copy_back = recv.is_copy_of(shard);
    match (&send, &mut recv) {
        (Wire::F32(s), Wire::F32(r)) => {
            // SAFETY: contiguous CPU f32 buffers, ours until the handle is waited on.
            let (s, r) = unsafe { (f32_slice(s), f32_slice_mut(r)) };
            scatter_pieces(&ctx.world, s, r, SystemOperation::sum());
        }
        (Wire::Bf16(s), Wire::Bf16(r)) => {
            // SAFETY: contiguous CPU bf16 buffers.
            let (s, r) = unsafe { (u16_slice(s), u16_slice_mut(r)) };
            scatter_pieces(&ctx.world, s, r, &ctx.bf16_sum);
        }
        _ => unreachable!("send and receive buffers share the wire dtype"),
    }
    if copy_back {
        shard.copy_(recv.tensor());
    }
}

fn all_gather_on(ctx: &mut Ctx, shard: &Tensor, full: &mut Tensor) {
    ctx.gather_delay.before();
    // Gathering moves values without arithmetic: bf16 travels as its bits whatever the target.
    let send = Wire::of(shard);
    let mut recv = Wire::out(&send, full);
    let copy_back = recv.is_copy_of(full);
    match (&send, &mut recv) {
        (Wire::F32(s), Wire::F32(r)) => {
            // SAFETY: contiguous CPU f32 buffers.
            let (s, r) = unsafe { (f32_slice(s), f32_slice_mut(r)) };
            gather_pieces(&ctx.world, s, r);
        }
        (Wire::Bf16(s), Wire::Bf16(r)) => {
            // SAFETY: contiguous CPU bf16 buffers.
            let (s, r) = unsafe { (u16_slice(s), u16_slice_mut(r)) };
            gather_pieces(&ctx.world, s, r);
        }
        _ => unreachable!("gathers keep the shard's wire dtype"),
    }
    if copy_back {
        full.copy_(recv.tensor());
    }
}

fn check_sizes(what: &str, full: &Tensor, shard: &Tensor, world: usize) -> Result<()> {
    if full.numel() != shard.numel() * world {
        return Err(crate::other!("{what}: full has {} elements, expected {world} x {}", full.numel(), shard.numel()));
    }
    Ok(())
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.start_all_reduce(t.shallow_clone())?.wait()
    }

    fn reduce_scatter_sum(&self, full: &Tensor, shard: &mut Tensor) -> Result<()> {
        self.start_reduce_scatter(full.shallow_clone(), shard.shallow_clone())?.wait()
    }

    fn all_gather(&self, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        self.start_all_gather(shard.shallow_clone(), full.shallow_clone())?.wait()
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let t = t.shallow_clone();
        self.run(&format!("broadcast from rank {root}"), t.numel(), move |ctx| {
            let mut t = t;
            let mut wire = Wire::of(&t);
            let root = ctx.world.process_at_rank(root as i32);
            match &mut wire {
                // SAFETY: contiguous CPU buffers, exclusively ours for the call.
                Wire::F32(w) => unsafe { f32_slice_mut(w) }.chunks_mut(CHUNK).for_each(|p| root.broadcast_into(p)),
                Wire::Bf16(w) => unsafe { u16_slice_mut(w) }.chunks_mut(CHUNK).for_each(|p| root.broadcast_into(p)),
            }
            if wire.is_copy_of(&t) {
                t.copy_(wire.tensor());
            }
        })
    }

    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        let send = v.to_vec();
        let out = self.run("all_reduce_f64", v.len(), move |ctx| {
            let mut recv = vec![0f64; send.len()];
            ctx.world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
            recv
        })?;
        v.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        let send = v.to_vec();
        let out = self.run("all_reduce_max_f64", v.len(), move |ctx| {
            let mut recv = vec![0f64; send.len()];
            ctx.world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::max());
            recv
        })?;
        v.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let mine = std::mem::take(bytes);
        *bytes = self.run(&format!("broadcast_bytes from rank {root}"), mine.len(), move |ctx| {
            let mut buf = mine;
            let root_proc = ctx.world.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            root_proc.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            // An empty payload (a rank with no evaluation batch) has nothing to send, and Open MPI
            // rejects the dangling pointer of an empty slice (MPI_ERR_ARG); every rank knows `len`.
            if len > 0 {
                root_proc.broadcast_into(&mut buf[..]);
            }
            buf
        })?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", 0, |ctx| ctx.world.barrier())
    }

    fn abort(&self, code: i32) -> ! {
        super::world::abort_world(code)
    }

    fn start_all_reduce(&self, t: Tensor) -> Result<Handle> {
        self.start("all_reduce_sum", t.numel(), move |ctx| {
            let mut t = t;
            all_reduce_on(ctx, &mut t);
        })
    }

    fn start_reduce_scatter(&self, full: Tensor, shard: Tensor) -> Result<Handle> {
        check_sizes("reduce_scatter", &full, &shard, self.world)?;
        self.start("reduce_scatter_sum", full.numel(), move |ctx| {
            let mut shard = shard;
            reduce_scatter_on(ctx, &full, &mut shard);
        })
    }

    fn start_all_gather(&self, shard: Tensor, full: Tensor) -> Result<Handle> {
        check_sizes("all_gather", &full, &shard, self.world)?;
        self.start("all_gather", full.numel(), move |ctx| {
            let mut full = full;
            all_gather_on(ctx, &shard, &mut full);
        })
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // Closing the queue lets the thread finish its jobs and end; `dist::world` joins it
        // before finalizing (after success), or never (the world is aborted after a failure).
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            super::world::hold_thread(t);
        }
    }
}
