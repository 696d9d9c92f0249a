//! This process's membership in the job, and how it ends: torn down in order on success
//! ([`finalize`]), aborted everywhere on failure ([`abort_world`]).
//!
//! The communication libraries' teardown is not tied to the lifetime of the `Collective` objects:
//! an error leaves `run` through `?`, dropping the trainer and its communicator on the way, while
//! peers may sit in a collective waiting for this rank. Had the drop finalized MPI (rsmpi's
//! `Universe` does) or destroyed the NCCL communicator, this rank would wait at finalize's fence
//! for those peers, and they for it, and the error would never be printed. So the MPI universe
//! and the NCCL communicators are kept here, outside any scope, and only `main` ends them: with
//! [`finalize`] after success, or with [`abort_world`] after printing the error (NCCL abort, then
//! `MPI_Abort`, which takes down every rank). The watchdog thread ends a job with
//! [`abort_from_thread`], which makes no MPI call (MPI may be initialised for one thread only) and
//! exits at once: the launcher (mpirun, srun --kill-on-bad-exit) then stops the other ranks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[cfg(feature = "mpi")]
use crate::Result;

/// What must be ended when the process ends.
#[derive(Default)]
struct Held {
    #[cfg(feature = "mpi")]
    universe: Option<::mpi::environment::Universe>,
    /// NCCL communicators (`ncclComm_t` as an address), destroyed on success, aborted on failure.
    nccl: Vec<usize>,
}

static HELD: Mutex<Option<Held>> = Mutex::new(None);
static FINALIZED: AtomicBool = AtomicBool::new(false);

#[cfg(any(feature = "mpi", feature = "nccl"))]
fn with_held<T>(f: impl FnOnce(&mut Held) -> T) -> T {
    let mut guard = HELD.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Held::default))
}

/// The MPI world communicator, initialising MPI on first use (once per process; later callers
/// share it). MPI is asked for `MPI_THREAD_FUNNELED`: other threads exist (libtorch's pool, the
/// watchdog) but only the main thread calls MPI.
#[cfg(feature = "mpi")]
pub(crate) fn mpi_world() -> Result<::mpi::topology::SimpleCommunicator> {
    with_held(|h| {
        if h.universe.is_none() {
            if FINALIZED.load(Ordering::SeqCst) {
                return Err(crate::Error::Dist("MPI was already finalized in this process".into()));
            }
            let (universe, _) = ::mpi::initialize_with_threading(::mpi::Threading::Funneled)
                .ok_or_else(|| crate::Error::Dist("MPI was initialised outside unlearn".into()))?;
            h.universe = Some(universe);
        }
        Ok(h.universe.as_ref().expect("set above").world())
    })
}

/// Keep an NCCL communicator until the process ends (see the module comment).
#[cfg(feature = "nccl")]
pub(crate) fn hold_nccl(comm: cudarc::nccl::sys::ncclComm_t) {
    with_held(|h| h.nccl.push(comm as usize));
}

/// End the job's communication in order after success: destroy the NCCL communicators, then
/// finalize MPI (which waits for every rank to get there; the watchdog bounds that wait).
pub fn finalize() {
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(held) = held else { return };
    let _g = super::watchdog::enter("finalize (every rank leaving the job)");
    #[cfg(feature = "nccl")]
    for comm in &held.nccl {
        // SAFETY: a communicator made by Nccl::init, no longer used by anything (the run is over).
        unsafe {
            let _ = cudarc::nccl::result::comm_destroy(*comm as cudarc::nccl::sys::ncclComm_t);
        }
    }
    #[cfg(not(feature = "nccl"))]
    let _ = &held.nccl;
    FINALIZED.store(true, Ordering::SeqCst);
    drop(held); // the universe's drop calls MPI_Finalize
}

/// Abort the NCCL communicators so that no kernel of this process waits on a peer any more (and
/// peers blocked on this rank's kernels are released with an error).
fn abort_nccl() {
    // try_lock: a failure may happen while the lock is held (a panic inside `with_held`).
    let comms = match HELD.try_lock() {
        Ok(g) => g.as_ref().map(|h| h.nccl.clone()).unwrap_or_default(),
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().as_ref().map(|h| h.nccl.clone()).unwrap_or_default(),
        Err(std::sync::TryLockError::WouldBlock) => vec![],
    };
    #[cfg(feature = "nccl")]
    for comm in comms {
        // SAFETY: ncclCommAbort may be called at any time, from any thread, on a live communicator.
        unsafe {
            let _ = cudarc::nccl::result::comm_abort(comm as cudarc::nccl::sys::ncclComm_t);
        }
    }
    #[cfg(not(feature = "nccl"))]
    let _ = comms;
}

/// Abort every rank of the job (main thread, after the error was printed): NCCL abort, then
/// `MPI_Abort` (Open MPI kills every rank and mpirun exits with `code`), then exit.
pub fn abort_world(code: i32) -> ! {
    abort_nccl();
    #[cfg(feature = "mpi")]
    {
        let (mut init, mut fin) = (0, 0);
        // SAFETY: plain MPI queries and abort on the world communicator.
        unsafe {
            ::mpi::ffi::MPI_Initialized(&mut init);
            ::mpi::ffi::MPI_Finalized(&mut fin);
            if init != 0 && fin == 0 {
                ::mpi::ffi::MPI_Abort(::mpi::ffi::RSMPI_COMM_WORLD, code);
            }
        }
    }
    std::process::exit(code)
}

/// End the process from a thread other than main (the watchdog): NCCL abort, then `_exit`
/// without running anything else. No MPI call: under MPI_THREAD_FUNNELED only main may make one,
/// and main may be blocked inside MPI. A rank that exits non-zero makes mpirun (and srun with
/// `--kill-on-bad-exit`) stop the whole job, with this rank's code as the job's.
pub fn abort_from_thread(code: i32) -> ! {
    abort_nccl();
    // SAFETY: _exit ends the process immediately; nothing is shared with a destructor.
    unsafe { libc::_exit(code) }
}
