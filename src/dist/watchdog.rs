//! The watchdog: a thread that ends the job when a collective does not complete within
//! `dist.timeout_s`, or when the communication library reports a failure, with a message naming
//! the rank, the step and the operation.
//!
//! Anything that can wait on another rank registers itself while it is in flight:
//!
//! ```ignore
//! let _g = watchdog::enter(format!("reduce_scatter bucket {b}"));  // blocking: until `_g` drops
//! comm.reduce_scatter_sum(&local, &mut piece)?;
//!
//! watchdog::until("nccl all_reduce", move || event_poll()); // asynchronous: until the probe says Done
//! ```
//!
//! Registrations nest (the trainer names the bucket, the backend the operation and its size) and
//! may come from any thread (a communication thread's operations included); a report shows the
//! stack of the thread whose operation is overdue, outermost first. `health_check` adds a poll of
//! the library's own error state (NCCL's `ncclCommGetAsyncError`).
//!
//! When the watchdog has not been started (a single process without a launcher) `enter` costs an
//! atomic load. The thread never calls MPI (see `world::abort_from_thread`).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::error::Exit;

/// `dist.timeout_s` when nothing sets it: long enough for a slow rank to load a 70B model or write
/// a checkpoint while its peers wait in the next collective.
pub const DEFAULT_TIMEOUT_S: f64 = 600.0;

/// An asynchronous operation's state, as its probe reports it.
pub enum Poll {
    Pending,
    Done,
    /// The operation failed; the message says how.
    Failed(String),
}

type Probe = Box<dyn FnMut() -> Poll + Send>;
type HealthCheck = Box<dyn FnMut() -> Option<String> + Send>;

struct Entry {
    id: u64,
    thread: ThreadId,
    what: Cow<'static, str>,
    since: Instant,
    /// For asynchronous operations: in flight until this says otherwise.
    probe: Option<Probe>,
}

struct State {
    entries: Vec<Entry>,
    checks: Vec<HealthCheck>,
    phase: Cow<'static, str>,
    rank: usize,
    timeout: Duration,
    started: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    entries: vec![],
    checks: vec![],
    phase: Cow::Borrowed(""),
    rank: 0,
    timeout: Duration::from_secs(600),
    started: false,
});
static ACTIVE: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// The optimizer step being taken (0: before the first).
static STEP: AtomicU64 = AtomicU64::new(0);

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start watching (idempotent; a later call changes the timeout).
pub fn start(rank: usize, timeout: Duration) {
    let mut s = state();
    s.rank = rank;
    s.timeout = timeout;
    if !s.started {
        s.started = true;
        std::thread::Builder::new().name("watchdog".into()).spawn(watch).expect("spawn the watchdog thread");
    }
    ACTIVE.store(true, Ordering::SeqCst);
}

/// The step the trainer is taking, for reports.
pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// What the job is doing outside the training steps ("loading", "final model", "eval"), for
/// reports; empty during the steps.
pub fn set_phase(phase: impl Into<Cow<'static, str>>) {
    state().phase = phase.into();
}

/// An operation in flight until the guard is dropped.
#[must_use = "the operation is in flight only while the guard lives"]
pub struct Guard {
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.id != 0 {
            state().entries.retain(|e| e.id != self.id);
        }
    }
}

fn register(what: Cow<'static, str>, probe: Option<Probe>) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let entry = Entry { id, thread: std::thread::current().id(), what, since: Instant::now(), probe };
    state().entries.push(entry);
    id
}

/// Mark a blocking operation in flight on this thread until the returned guard drops.
pub fn enter(what: impl Into<Cow<'static, str>>) -> Guard {
    if !ACTIVE.load(Ordering::Relaxed) {
        return Guard { id: 0 };
    }
    Guard { id: register(what.into(), None) }
}

/// Mark an asynchronous operation (a kernel on a stream, a non-blocking request) in flight until
/// `probe` returns `Done` (the watchdog polls it) or fails. Without a started watchdog the probe
/// is dropped at once.
pub fn until(what: impl Into<Cow<'static, str>>, probe: impl FnMut() -> Poll + Send + 'static) {
    if ACTIVE.load(Ordering::Relaxed) {
        register(what.into(), Some(Box::new(probe)));
    }
}

/// Poll `check` with every round; `Some(message)` ends the job as a peer failure.
pub fn health_check(check: impl FnMut() -> Option<String> + Send + 'static) {
    state().checks.push(Box::new(check));
}

/// The report's "where": rank, step or phase.
fn place(s: &State) -> String {
    let step = STEP.load(Ordering::Relaxed);
    let when = if step == 0 { "before the first step".to_string() } else { format!("step {step}") };
    if s.phase.is_empty() {
        format!("rank {}: {when}", s.rank)
    } else {
        format!("rank {}: {when} ({})", s.rank, s.phase)
    }
}

/// The operations in flight on `thread`, outermost first.
fn stack(s: &State, thread: ThreadId) -> String {
    let mut mine: Vec<&Entry> = s.entries.iter().filter(|e| e.thread == thread).collect();
    mine.sort_by_key(|e| e.id);
    mine.iter().map(|e| format!("`{}`", e.what)).collect::<Vec<_>>().join(" > ")
}

/// One round: poll the probes and health checks, find the oldest overdue operation.
fn inspect(s: &mut State, now: Instant) -> Option<(Exit, String)> {
    let mut i = 0;
    while i < s.entries.len() {
        let poll = s.entries[i].probe.as_mut().map(|p| p());
        match poll {
            Some(Poll::Done) => {
                s.entries.swap_remove(i);
                continue;
            }
            Some(Poll::Failed(msg)) => {
                let what = s.entries[i].what.clone();
                return Some((Exit::PeerFailed, format!("{}: `{what}` failed: {msg}; ending the job", place(s))));
            }
            _ => i += 1,
        }
    }
    let failure = s.checks.iter_mut().find_map(|c| c());
    if let Some(msg) = failure {
        return Some((Exit::PeerFailed, format!("{}: {msg}; ending the job", place(s))));
    }
    let overdue = s.entries.iter().filter(|e| now.duration_since(e.since) >= s.timeout).min_by_key(|e| e.since)?;
    Some((
        Exit::Timeout,
        format!(
            "{}: {} did not complete within {} s (dist.timeout_s): another rank stopped answering or failed; ending the job",
            place(s),
            stack(s, overdue.thread),
            s.timeout.as_secs_f64()
        ),
    ))
}

fn watch() {
    loop {
        let poll = (state().timeout / 20).clamp(Duration::from_millis(20), Duration::from_secs(1));
        std::thread::sleep(poll);
        let verdict = inspect(&mut state(), Instant::now());
        if let Some((exit, msg)) = verdict {
            crate::error::print_line(&msg);
            super::world::abort_from_thread(exit.code());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(timeout: Duration) -> State {
        State { entries: vec![], checks: vec![], phase: Cow::Borrowed(""), rank: 3, timeout, started: false }
    }

    fn entry(s: &mut State, id: u64, what: &'static str, age: Duration, probe: Option<Probe>) {
        s.entries.push(Entry { id, thread: std::thread::current().id(), what: what.into(), since: Instant::now() - age, probe });
    }

    #[test]
    fn an_overdue_operation_is_reported_with_its_stack_and_a_finished_probe_is_dropped() {
        let mut s = fresh(Duration::from_secs(5));
        entry(&mut s, 1, "reduce_scatter bucket 3", Duration::from_secs(1), None);
        assert!(inspect(&mut s, Instant::now()).is_none(), "nothing is overdue yet");
        let mut polls = 0;
        entry(
            &mut s,
            2,
            "nccl all_gather",
            Duration::from_secs(60),
            Some(Box::new(move || {
                polls += 1;
                if polls < 2 {
                    Poll::Pending
                } else {
                    Poll::Done
                }
            })),
        );
        let (exit, msg) = inspect(&mut s, Instant::now()).expect("the pending probe is overdue");
        assert_eq!(exit, Exit::Timeout);
        assert!(msg.contains("nccl all_gather") && msg.starts_with("rank 3: "), "{msg}");
        assert!(inspect(&mut s, Instant::now()).is_none(), "the probe said Done: no longer in flight");
        assert_eq!(s.entries.len(), 1);
        entry(&mut s, 3, "mpi reduce_scatter_sum", Duration::from_secs(10), None);
        s.phase = "final model".into();
        let (_, msg) = inspect(&mut s, Instant::now()).unwrap();
        assert!(msg.contains("`reduce_scatter bucket 3` > `mpi reduce_scatter_sum` did not complete within 5 s"), "{msg}");
        assert!(msg.contains("(final model)"), "{msg}");
    }

    #[test]
    fn failures_reported_by_probes_and_health_checks_are_peer_failures() {
        let mut s = fresh(Duration::from_secs(5));
        entry(&mut s, 1, "nccl all_reduce", Duration::ZERO, Some(Box::new(|| Poll::Failed("ncclRemoteError".into()))));
        let (exit, msg) = inspect(&mut s, Instant::now()).unwrap();
        assert_eq!(exit, Exit::PeerFailed);
        assert!(msg.contains("`nccl all_reduce` failed: ncclRemoteError"), "{msg}");
        let mut s = fresh(Duration::from_secs(5));
        s.checks.push(Box::new(|| Some("NCCL reports ncclSystemError".into())));
        assert_eq!(inspect(&mut s, Instant::now()).unwrap().0, Exit::PeerFailed);
    }
}
