//! NCCL backend on CUDA tensors, through cudarc's dynamically loaded bindings (the library is
//! found at run time: `libnccl.so`, which launch/setup.sh links to the torch wheel's
//! `libnccl.so.2`, so the process holds a single NCCL).
//!
//! Every tch kernel runs on the legacy default stream (tch exposes no stream API), the *compute
//! stream*. Every NCCL collective runs on one communication stream of this backend, created
//! non-blocking so that it never synchronises implicitly with the compute stream, which lets a
//! bucket's reduction run while backward computes the next layer. Ordering is explicit:
//! * before a collective, an event recorded on the compute stream is waited for by the
//!   communication stream, so NCCL reads its inputs only after the kernels that wrote them;
//! * after it, an event recorded on the communication stream is what the handle's `wait` makes
//!   the compute stream wait for (on the device: the host does not block), so later kernels read
//!   the results only once NCCL has written them.
//!
//! The handle owns (shallow clones of) the collective's tensors until then: tch has no
//! `record_stream`, so a tensor dropped earlier could have its memory handed by the caching
//! allocator to a kernel on the compute stream while NCCL still uses it. Once the compute stream
//! waits for the collective's event, any reuse of that memory is ordered after it. All
//! collectives, the blocking ones too (`start_*` then `wait`), go through the one stream, so
//! every rank runs them in the order they were issued, as NCCL requires.
//!
//! The communicator id is made by rank 0 and broadcast over MPI; host-side scalars (norms, loss
//! sums) and barriers also go through MPI, or nowhere at world size 1.
//!
//! A collective returns once enqueued; it is in flight for the watchdog until a CUDA event
//! recorded after it completes, and the watchdog also polls `ncclCommGetAsyncError`. The
//! communicator lives until the process ends (`dist::world`): destroyed after success, aborted
//! after a failure, never destroyed by a drop while a peer may still wait on it.

use std::ffi::c_void;

use cudarc::driver::{result as dr, sys as ds};
use cudarc::nccl::{result as nr, sys as ns};
use tch::{Kind, Tensor};

use super::cuda::Completion;
use super::local::Local;
use super::{watchdog, Collective, Handle, InFlight};
use crate::Result;

pub struct Nccl {
    comm: ns::ncclComm_t,
    rank: usize,
    world: usize,
    /// The communication stream (non-blocking with respect to the legacy default stream).
    stream: ds::CUstream,
    /// Host channel: MPI when launched by mpirun, else the trivial world-size-1 group.
    host: Box<dyn Collective>,
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> crate::Error {
    crate::Error::Dist(format!("CUDA {what}: {e:?}"))
}

/// The compute stream: the legacy default stream tch runs every kernel on.
fn compute_stream() -> ds::CUstream {
    dr::stream::null()
}

/// A collective enqueued on the communication stream, with the tensors it reads and writes.
struct OnStream {
    done: ds::CUevent,
    keep: Vec<Tensor>,
}

impl OnStream {
    /// Order the compute stream after the collective (on the device: the host does not wait),
    /// then release the tensors: any reuse of their memory is ordered after the collective.
    fn order_after(&mut self) -> Result<()> {
        // SAFETY: the event is alive until drop.
        let r = unsafe { dr::stream::wait_event(compute_stream(), self.done, ds::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) };
        self.keep.clear();
        r.map_err(|e| cuda_err("stream wait", e))
    }
}

impl InFlight for OnStream {
    fn is_done(&mut self) -> bool {
        // SAFETY: the event is ours and alive until drop.
        unsafe { dr::event::query(self.done) }.is_ok()
    }
    fn wait(mut self: Box<Self>) -> Result<()> {
        self.order_after()
    }
}

impl Drop for OnStream {
    fn drop(&mut self) {
        if !self.keep.is_empty() {
            // Dropped without `wait` (an error path): order the compute stream after it as `wait`
            // does rather than block the host on it, since a failing rank must reach its abort
            // even when the collective waits for a peer that never joins (the watchdog still
            // tracks it).
            let _ = self.order_after();
        }
        // SAFETY: destroying a possibly pending event is allowed; resources go when it completes.
        let _ = unsafe { dr::event::destroy(self.done) };
    }
}

/// A failed NCCL call; a remote error (a peer's failure reaching this rank) is a peer failure.
fn nccl_err(what: &str, e: nr::NcclError) -> crate::Error {
    match e.0 {
        ns::ncclResult_t::ncclRemoteError => crate::Error::Peer(format!("NCCL {what}: {e:?}")),
        _ => crate::Error::Dist(format!("NCCL {what}: {e:?}")),
    }
}

fn dtype(kind: Kind) -> Result<ns::ncclDataType_t> {
    Ok(match kind {
        Kind::Float => ns::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => ns::ncclDataType_t::ncclBfloat16,
        Kind::Half => ns::ncclDataType_t::ncclFloat16,
        Kind::Double => ns::ncclDataType_t::ncclFloat64,
        other => return Err(crate::Error::Dist(format!("NCCL: unsupported tensor kind {other:?}"))),
    })
}

fn check(t: &Tensor, what: &str) -> Result<()> {
    if !t.device().is_cuda() || !t.is_contiguous() {
        return Err(crate::Error::Dist(format!("NCCL {what}: tensor must be contiguous and on the GPU")));
    }
    Ok(())
}

impl Nccl {
    pub fn init(device: tch::Device) -> Result<Self> {
        // SAFETY: only probes for the shared library.
        if !unsafe { ns::is_culib_present() } {
            return Err(crate::Error::Dist(
                "libnccl.so not found on LD_LIBRARY_PATH (source launch/env.sh, which links the torch wheel's libnccl.so.2)".into(),
            ));
        }
        let host = host_channel()?;
        let (rank, world) = (host.rank(), host.world());
        let mut id_bytes = vec![0u8; 128];
        if rank == 0 {
            let id = nr::get_uniqueid().map_err(|e| nccl_err("get_uniqueid", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal.iter()) {
                *b = *c as u8;
            }
        }
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let mut id = ns::ncclUniqueId { internal: [0; 128] };
        for (c, b) in id.internal.iter_mut().zip(id_bytes) {
            *c = b as std::os::raw::c_char;
        }
        // The rank's device was made current when it was resolved (`dist::rank_device`); a tch
        // allocation there creates the runtime's state before NCCL looks for it.
        let _warm = Tensor::zeros([1], (Kind::Float, device));
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is identical on every rank.
        unsafe { nr::comm_init_rank(&mut comm, world as i32, id, rank as i32) }.map_err(|e| nccl_err("comm_init_rank", e))?;
        super::world::hold_nccl(comm);
        // SAFETY: a live communicator.
        let on = unsafe { nr::comm_cu_device(comm) }.map_err(|e| nccl_err("comm_cu_device", e))?;
        if let tch::Device::Cuda(want) = device {
            if on as usize != want {
                return Err(crate::Error::Dist(format!(
                    "rank {rank}: the NCCL communicator is on cuda:{on} but this rank computes on cuda:{want}; \
                     give each rank its own GPU (launch/mpirun.sh sets CUDA_VISIBLE_DEVICES from the local rank)"
                )));
            }
        }
        watch_async_errors(comm);
        let version = nr::get_nccl_version().unwrap_or(0);
        tracing::info!("NCCL {version}: rank {rank} of {world} on {device:?}");
        let stream = dr::stream::create(dr::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("stream create", e))?;
        Ok(Nccl { comm, rank, world, stream, host })
    }

    /// Both buffers on the GPU, `full` holding world × `shard`'s elements, of one kind.
    fn check_sharded(&self, what: &str, full: &Tensor, shard: &Tensor) -> Result<()> {
        check(full, what)?;
        check(shard, what)?;
        if full.numel() != shard.numel() * self.world || full.kind() != shard.kind() {
            return Err(crate::Error::Dist(format!("NCCL {what}: buffer sizes or kinds disagree")));
        }
        Ok(())
    }

    /// Enqueue `launch`, the collective `what` on `elems` elements, on the communication stream
    /// after everything the compute stream has been given so far; the handle keeps `keep` alive
    /// until the compute stream waits for it. The collective is in flight for the watchdog from
    /// here until the GPU has run it (the host never waits for it: the compute stream does).
    fn enqueue(&self, what: &str, elems: usize, keep: Vec<Tensor>, launch: impl FnOnce(ns::cudaStream_t) -> Result<()>) -> Result<Handle> {
        let _g = watchdog::enter(format!("nccl {what} of {elems} elements (enqueue)"));
        let flags = ds::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ready = dr::event::create(flags).map_err(|e| cuda_err("event create", e))?;
        // SAFETY: fresh event and our own stream; the event is destroyed once the wait is queued
        // (destroying a pending event is allowed: it is released when it completes).
        unsafe {
            let queued = dr::event::record(ready, compute_stream())
                .and_then(|_| dr::stream::wait_event(self.stream, ready, ds::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT));
            let _ = dr::event::destroy(ready);
            queued.map_err(|e| cuda_err("event record/wait", e))?;
        }
        launch(self.stream as ns::cudaStream_t)?;
        let done = dr::event::create(flags).map_err(|e| cuda_err("event create", e))?;
        // SAFETY: fresh event recorded on our stream after the collective.
        unsafe { dr::event::record(done, self.stream) }.map_err(|e| cuda_err("event record", e))?;
        let completion = Completion::record(self.stream)?;
        watchdog::until(format!("nccl {what} of {elems} elements"), move || completion.poll());
        Ok(Box::new(OnStream { done, keep }))
    }
}

/// Let the watchdog poll the communicator's asynchronous error (a peer's failure, a network
/// error): NCCL reports them there, not through the calls, which return once enqueued.
fn watch_async_errors(comm: ns::ncclComm_t) {
    let addr = comm as usize;
    watchdog::health_check(move || {
        let mut state = ns::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is held until the process ends (dist::world); the query is
        // thread-safe.
        let rc = unsafe { ns::ncclCommGetAsyncError(addr as ns::ncclComm_t, &mut state) };
        match (rc, state) {
            (ns::ncclResult_t::ncclSuccess, ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress) => None,
            (ns::ncclResult_t::ncclSuccess, e) => Some(format!("NCCL reports {e:?} on the communicator")),
            (e, _) => Some(format!("ncclCommGetAsyncError failed: {e:?}")),
        }
    });
}

#[cfg(feature = "mpi")]
fn host_channel() -> Result<Box<dyn Collective>> {
    if super::launcher_world_size() > 1 || std::env::var("OMPI_COMM_WORLD_SIZE").is_ok() {
        return Ok(Box::new(super::mpi::Mpi::init()?));
    }
    Ok(Box::new(Local))
}
#[cfg(not(feature = "mpi"))]
fn host_channel() -> Result<Box<dyn Collective>> {
    if super::launcher_world_size() > 1 {
        return Err(crate::Error::Dist("several ranks need the `mpi` feature to bootstrap NCCL".into()));
    }
    Ok(Box::new(Local))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
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
        check(t, "broadcast")?;
        let (ptr, n, dt, comm) = (t.data_ptr(), t.numel(), dtype(t.kind())?, self.comm);
        self.enqueue("broadcast", n, vec![t.shallow_clone()], |stream| {
            // SAFETY: in-place broadcast on a contiguous device buffer kept alive by the handle.
            unsafe { nr::broadcast(ptr as *const c_void, ptr, n, dt, root as i32, comm, stream) }.map_err(|e| nccl_err("broadcast", e))?;
            Ok(())
        })?
        .wait()
    }
    fn all_reduce_f64(&self, v: &mut [f64]) -> Result<()> {
        self.host.all_reduce_f64(v)
    }
    fn all_reduce_max_f64(&self, v: &mut [f64]) -> Result<()> {
        self.host.all_reduce_max_f64(v)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        // dist::world aborts every held communicator (this one included), then MPI.
        super::world::abort_world(code)
    }

    fn start_all_reduce(&self, t: Tensor) -> Result<Handle> {
        check(&t, "all_reduce")?;
        let (ptr, n, dt, comm) = (t.data_ptr(), t.numel(), dtype(t.kind())?, self.comm);
        self.enqueue("all_reduce", n, vec![t], |stream| {
            // SAFETY: in-place all-reduce on a contiguous device buffer kept alive by the handle.
            unsafe { nr::all_reduce(ptr as *const c_void, ptr, n, dt, ns::ncclRedOp_t::ncclSum, comm, stream) }
                .map_err(|e| nccl_err("all_reduce", e))?;
            Ok(())
        })
    }

    fn start_reduce_scatter(&self, full: Tensor, shard: Tensor) -> Result<Handle> {
        self.check_sharded("reduce_scatter", &full, &shard)?;
        let (send, recv, n, dt, comm) = (full.data_ptr(), shard.data_ptr(), shard.numel(), dtype(full.kind())?, self.comm);
        self.enqueue("reduce_scatter", n * self.world, vec![full, shard], |stream| {
            // SAFETY: sizes checked above; both buffers kept alive by the handle.
            unsafe { nr::reduce_scatter(send as *const c_void, recv, n, dt, ns::ncclRedOp_t::ncclSum, comm, stream) }
                .map_err(|e| nccl_err("reduce_scatter", e))?;
            Ok(())
        })
    }

    fn start_all_gather(&self, shard: Tensor, full: Tensor) -> Result<Handle> {
        self.check_sharded("all_gather", &full, &shard)?;
        let (send, recv, n, dt, comm) = (shard.data_ptr(), full.data_ptr(), shard.numel(), dtype(full.kind())?, self.comm);
        self.enqueue("all_gather", n * self.world, vec![shard, full], |stream| {
            // SAFETY: sizes checked above; both buffers kept alive by the handle.
            unsafe { nr::all_gather(send as *const c_void, recv, n, dt, comm, stream) }.map_err(|e| nccl_err("all_gather", e))?;
            Ok(())
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Not the communicator: `dist::world` destroys it after success and aborts it after a
        // failure. Nor a wait for the stream: on an error path it may hold a collective a peer
        // never joins. A stream destroyed with work pending is released once that work is done.
        // SAFETY: our stream, used by nothing after this.
        unsafe {
            let _ = dr::stream::destroy(self.stream);
        }
    }
}
