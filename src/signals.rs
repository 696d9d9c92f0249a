//! Stop requests for `unlearn run`: SIGTERM (Slurm at preemption or the time limit, `scancel`),
//! SIGUSR1 (`sbatch --signal=B:USR1@...`, forwarded to the ranks by launch/slurm.sbatch) and
//! SIGINT (Ctrl-C) only set a flag here. The trainer folds the flag into a scalar all-reduce it
//! already makes each step, so every rank learns of a request on any rank in the same step; the
//! run then finishes that step, writes a checkpoint and exits with the "preempted" code. A second
//! SIGINT ends the process at once (exit 130), as a user pressing Ctrl-C twice expects.

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: atomics, write(2), _exit(2).
    if sig == libc::SIGINT {
        if SIGNAL.load(Ordering::SeqCst) == libc::SIGINT {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) }
        }
        let msg = b"\nunlearn: interrupted: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)\n";
        // SAFETY: write(2) on stderr with a static buffer is async-signal-safe.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catch SIGTERM, SIGUSR1 and SIGINT from now on (system calls in progress are restarted).
pub fn install() {
    for sig in [libc::SIGTERM, libc::SIGUSR1, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a handler that only touches an atomic and async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The last stop signal this process received, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGTERM`, `SIGUSR1`, `SIGINT`, or the number.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGINT => "SIGINT".into(),
        n => format!("signal {n}"),
    }
}
