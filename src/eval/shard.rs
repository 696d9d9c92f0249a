//! Sharded evaluation: the samples of a split are cut into batches by a fixed plan, the batches
//! are dealt to the ranks, and the per-sample results are gathered back onto every rank. The same
//! loop serves single-process callers (`unlearn score`, `verify`'s reference generation) with a
//! world of one.
//!
//! The plan depends only on the samples' lengths and the batching options, never on the number of
//! ranks, so every sample is computed in the same batch (same rows, same padding) under
//! `mpirun -np N` as in a single process. That matters: greedy decoding takes an argmax, and
//! batching a prompt with different neighbours changes its padding and hence the floating-point
//! rounding of its logits, which can flip a near-tie. With the plan fixed, the only remaining
//! source of difference is the BLAS thread count (set OMP_NUM_THREADS equal in both runs for
//! bit-identical results).

use crate::dist::gather::{all_gather_indexed, Word};
use crate::dist::Collective;
use crate::progress::Progress;
use crate::Result;

/// How samples are grouped into forward passes.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// At most this many samples per batch.
    pub batch_size: usize,
    /// At most this many (padded) tokens per batch: rows x longest sequence. One sample longer
    /// than this still forms a batch of its own.
    pub max_batch_tokens: usize,
}

impl Batching {
    /// At most `batch_size` samples per batch, whatever their length.
    pub fn rows(batch_size: usize) -> Batching {
        Batching { batch_size, max_batch_tokens: usize::MAX }
    }
}

/// Batches of sample indices: longest first (ties by index), filled greedily under both limits.
pub fn plan(lengths: &[usize], b: &Batching) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut batches: Vec<Vec<usize>> = vec![];
    let mut cur: Vec<usize> = vec![];
    let mut longest = 0;
    for i in order {
        // Sorted longest first, so the first row of a batch fixes its padded length.
        let width = if cur.is_empty() { lengths[i] } else { longest };
        if !cur.is_empty() && (cur.len() >= b.batch_size.max(1) || (cur.len() + 1).saturating_mul(width) > b.max_batch_tokens) {
            batches.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            longest = lengths[i];
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// The one sort-and-batch loop of evaluation: `work` runs on the batches of `plan(lengths, b)`
/// that fall to `rank` of `world` (batch k goes to rank k mod world, strided so that long and
/// short batches spread evenly), and returns one result per row of its batch, in row order.
/// Returns `(item index, result)` for this rank's items.
fn run_my_batches<T, R>(
    items: &[T],
    lengths: &[usize],
    b: &Batching,
    (rank, world): (usize, usize),
    label: &str,
    mut work: impl FnMut(&[&T]) -> Vec<R>,
) -> Vec<(usize, R)> {
    let batches = plan(lengths, b);
    let mine: Vec<&Vec<usize>> = batches.iter().enumerate().filter(|(k, _)| k % world == rank).map(|(_, batch)| batch).collect();
    let total: usize = mine.iter().map(|batch| batch.len()).sum();
    let bar = Progress::new(total as u64, label);
    let mut out = Vec::with_capacity(total);
    for batch in mine {
        let rows: Vec<&T> = batch.iter().map(|&i| &items[i]).collect();
        let results = work(&rows);
        assert_eq!(results.len(), batch.len(), "one result per row of a batch");
        out.extend(batch.iter().copied().zip(results));
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    out
}

/// `work` over every item in the batches of `plan(lengths, b)`, in one process; results in input
/// order.
pub fn batched<T, R>(items: &[T], lengths: &[usize], b: &Batching, label: &str, work: impl FnMut(&[&T]) -> Vec<R>) -> Vec<R> {
    let mut out = run_my_batches(items, lengths, b, (0, 1), label, work);
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// `work` over every item in the batches of `plan(lengths, b)`, each rank of `comm` computing its
/// share; every rank returns every item's result (bit-exact), in input order.
pub fn sharded<T, W: Word>(
    items: &[T],
    lengths: &[usize],
    b: &Batching,
    comm: &dyn Collective,
    label: &str,
    work: impl FnMut(&[&T]) -> Vec<Vec<W>>,
) -> Result<Vec<Vec<W>>> {
    let mine = run_my_batches(items, lengths, b, (comm.rank(), comm.world()), label, work);
    static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let pass = PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    crate::fault::check(crate::fault::Fault::Eval, pass, label)?;
    let _g = crate::dist::watchdog::enter(format!("gathering the results of `{label}`"));
    all_gather_indexed(comm, &mine, items.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_respects_both_limits_and_covers_every_sample_once() {
        let lengths = [5, 9, 3, 9, 1, 7, 2];
        let b = Batching { batch_size: 3, max_batch_tokens: 20 };
        let batches = plan(&lengths, &b);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        assert_eq!(batches[0], vec![1, 3]); // 9, 9: a third row would make 27 > 20 tokens
        for batch in &batches {
            let width = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() <= 3 && (batch.len() == 1 || batch.len() * width <= 20), "{batch:?}");
        }
        // A sample longer than the token budget still gets a batch of its own.
        assert_eq!(plan(&[50, 1], &b), vec![vec![0], vec![1]]);
        // Without a token budget only the row count splits, longest first, ties by index.
        assert_eq!(plan(&lengths, &Batching::rows(3)), vec![vec![1, 3, 5], vec![0, 2, 6], vec![4]]);
    }

    #[test]
    fn batched_results_come_back_in_input_order() {
        let items = ["bb", "a", "dddd", "ccc"];
        let lengths: Vec<usize> = items.iter().map(|s| s.len()).collect();
        let mut seen_batches = vec![];
        let out = batched(&items, &lengths, &Batching::rows(2), "test", |rows| {
            seen_batches.push(rows.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            rows.iter().map(|s| s.len()).collect()
        });
        assert_eq!(out, vec![2, 1, 4, 3]);
        assert_eq!(seen_batches, vec![vec!["dddd", "ccc"], vec!["bb", "a"]]);
        let local = crate::dist::local::Local;
        let gathered =
            sharded(&items, &lengths, &Batching::rows(3), &local, "test", |rows| rows.iter().map(|s| vec![s.len() as i64]).collect())
                .unwrap();
        assert_eq!(gathered, vec![vec![2], vec![1], vec![4], vec![3]]);
    }
}
