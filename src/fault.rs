//! Fault injection for the failure-handling tests (tests/cluster.rs): the environment variable
//! `UNLEARN_FAULT=KIND:RANK:STEP[,KIND:RANK:STEP...]` makes rank RANK fail at step STEP (`N`, or
//! `N+` for every step from N on) in one of these places:
//!
//! | kind         | where                                                              |
//! |--------------|--------------------------------------------------------------------|
//! | `backward`   | an error in the forward/backward of the step (as an out-of-memory) |
//! | `metrics`    | an I/O error appending the step to metrics.jsonl (rank 0 writes)   |
//! | `checkpoint` | an I/O error writing the rank's checkpoint shard of that step      |
//! | `final`      | an error while the final model is written (STEP: the last step)    |
//! | `eval`       | an error in the STEP-th sharded evaluation pass, before its gather |
//! | `hang`       | the rank stops answering: it never enters the step's loss all-reduce |
//! | `nan`        | the rank's loss (and so its gradient) is NaN in that step          |
//!
//! Never set in normal use; read once.

use std::sync::OnceLock;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Backward,
    Metrics,
    Checkpoint,
    FinalModel,
    Eval,
    Hang,
    NonFinite,
}

const KINDS: &[(&str, Fault)] = &[
    ("backward", Fault::Backward),
    ("metrics", Fault::Metrics),
    ("checkpoint", Fault::Checkpoint),
    ("final", Fault::FinalModel),
    ("eval", Fault::Eval),
    ("hang", Fault::Hang),
    ("nan", Fault::NonFinite),
];

#[derive(Debug, PartialEq)]
struct Rule {
    fault: Fault,
    rank: usize,
    from: u64,
    /// `None`: every step from `from` on.
    to: Option<u64>,
}

fn parse(spec: &str) -> std::result::Result<Vec<Rule>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let parts: Vec<&str> = item.trim().split(':').collect();
            let [kind, rank, step] = parts[..] else { return Err(format!("`{item}`: expected KIND:RANK:STEP")) };
            let fault = KINDS.iter().find(|(n, _)| *n == kind).map(|(_, f)| *f).ok_or_else(|| {
                format!("`{kind}`: unknown kind (allowed: {})", KINDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
            })?;
            let rank = rank.parse().map_err(|_| format!("`{item}`: rank `{rank}` is not a number"))?;
            let (num, open) = match step.strip_suffix('+') {
                Some(n) => (n, true),
                None => (step, false),
            };
            let from: u64 = num.parse().map_err(|_| format!("`{item}`: step `{step}` is not N or N+"))?;
            Ok(Rule { fault, rank, from, to: if open { None } else { Some(from) } })
        })
        .collect()
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| match std::env::var("UNLEARN_FAULT") {
        Err(_) => vec![],
        Ok(spec) => parse(&spec).unwrap_or_else(|e| panic!("UNLEARN_FAULT={spec}: {e}")),
    })
}

/// Whether `fault` is injected on this rank at `step`.
pub fn active(fault: Fault, step: u64) -> bool {
    let rank = crate::dist::env_rank();
    rules().iter().any(|r| r.fault == fault && r.rank == rank && step >= r.from && r.to.is_none_or(|t| step <= t))
}

/// An error (of the kind the place would really produce) when `fault` is injected at `step`.
pub fn check(fault: Fault, step: u64, what: &str) -> Result<()> {
    if active(fault, step) {
        return Err(crate::other!("{what} failed (fault injection {fault:?} at step {step})"));
    }
    Ok(())
}

/// An I/O error on `path` when `fault` is injected at `step`.
pub fn check_io(fault: Fault, step: u64, path: &std::path::Path) -> Result<()> {
    if active(fault, step) {
        return Err(Error::io(path, std::io::Error::other(format!("write failed (fault injection {fault:?} at step {step})"))));
    }
    Ok(())
}

/// Stop answering for good (the peers' watchdogs must end the job).
pub fn hang_if(fault: Fault, step: u64) {
    if active(fault, step) {
        crate::error::print_line(&format!("rank {}: fault injection: hanging at step {step}", crate::dist::env_rank()));
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let r = parse("backward:1:3, nan:0:5+").unwrap();
        assert_eq!(r[0], Rule { fault: Fault::Backward, rank: 1, from: 3, to: Some(3) });
        assert_eq!(r[1], Rule { fault: Fault::NonFinite, rank: 0, from: 5, to: None });
        assert!(parse("oom:1:3").unwrap_err().contains("unknown kind"));
        assert!(parse("hang:1").unwrap_err().contains("KIND:RANK:STEP"));
        assert!(parse("hang:x:1").unwrap_err().contains("rank"));
    }
}
