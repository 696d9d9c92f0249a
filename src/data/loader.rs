//! Deterministic samplers over tokenized examples.
//!
//! Every rank runs the same sampler and sees the same *global* micro-batch of indices; it then
//! takes its own contiguous slice. Because all ranks know the whole global batch they agree on
//! its padded length and token count without communicating, which is what makes a run with N
//! ranks compute exactly the loss of a single-process run with the same global batch.
//!
//! The state is two integers (epoch, position), so a resumed run continues bit-identically.

use serde::{Deserialize, Serialize};

use super::batch::{collate, Batch, Example};

/// SplitMix64: tiny, fast, and its state is one integer (easy to derive per epoch and stream).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// A fresh permutation every epoch.
    Shuffle,
    /// Independent draws with replacement (mt-unlearn's `RandomSampler(replacement=True)`).
    Replacement,
}

/// Where a loader is; everything else is derived from (seed, stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub pos: usize,
}

pub struct Loader {
    examples: Vec<Example>,
    sampling: Sampling,
    seed: u64,
    state: LoaderState,
    perm: Vec<usize>,
}

impl Loader {
    /// `stream` separates independent loaders built from the same seed (forget vs retain).
    pub fn new(examples: Vec<Example>, sampling: Sampling, seed: u64, stream: u64) -> Self {
        assert!(!examples.is_empty(), "a loader needs at least one example");
        let seed = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64();
        let mut l = Loader { examples, sampling, seed, state: LoaderState { epoch: 0, pos: 0 }, perm: vec![] };
        l.perm = l.permutation(0);
        l
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved state; its position must lie within this loader's examples (it does
    /// not when the data changed since the state was saved).
    pub fn restore(&mut self, state: LoaderState) -> crate::Result<()> {
        if state.pos > self.examples.len() {
            return Err(crate::other!(
                "saved position {} is beyond the {} examples of this data (did the data files change?)",
                state.pos,
                self.examples.len()
            ));
        }
        self.state = state;
        self.perm = self.permutation(state.epoch);
        Ok(())
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let n = self.examples.len();
        let mut rng = SplitMix64::new(self.seed.wrapping_add(epoch.wrapping_mul(0xA24B_AED4_963E_E407)));
        match self.sampling {
            Sampling::Shuffle => {
                let mut p: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    p.swap(i, rng.below(i + 1));
                }
                p
            }
            Sampling::Replacement => (0..n).map(|_| rng.below(n)).collect(),
        }
    }

    /// The next global micro-batch: `size` example indices (crossing epochs as needed).
    pub fn next_indices(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.state.pos == self.perm.len() {
                self.state = LoaderState { epoch: self.state.epoch + 1, pos: 0 };
                self.perm = self.permutation(self.state.epoch);
            }
            out.push(self.perm[self.state.pos]);
            self.state.pos += 1;
        }
        out
    }
}

/// One rank's share of a global micro-batch, padded to the global batch's longest example.
pub struct LocalBatch {
    pub batch: Batch,
    /// Example indices of this rank's rows (for per-example precomputed values, e.g. NPO).
    pub example_ids: Vec<usize>,
    /// Totals over the *global* micro-batch, used as loss denominators on every rank.
    pub global: GlobalCounts,
}

#[derive(Debug, Clone, Copy)]
pub struct GlobalCounts {
    /// Target tokens.
    pub targets: i64,
    /// Sequences.
    pub sequences: i64,
    /// Padded positions, `sequences * padded_len` (the "mean over B×T" convention).
    pub positions: i64,
    pub padded_len: i64,
}

/// Build this rank's batch from a global index list: rank r takes rows `r*b/W .. (r+1)*b/W`.
pub fn local_batch(examples: &[Example], global: &[usize], rank: usize, world: usize, pad_id: i64, device: tch::Device) -> LocalBatch {
    assert!(global.len().is_multiple_of(world), "global batch {} not divisible by world size {world}", global.len());
    let per = global.len() / world;
    let mine = &global[rank * per..(rank + 1) * per];
    let padded_len = global.iter().map(|&i| examples[i].ids.len()).max().unwrap_or(2).max(2);
    let targets = global.iter().map(|&i| examples[i].n_targets() as i64).sum();
    let rows: Vec<&Example> = mine.iter().map(|&i| &examples[i]).collect();
    let mut batch = collate(&rows, pad_id, device);
    let t = batch.input_ids.size()[1] as usize;
    if t < padded_len {
        // Pad to the global length so every rank's tensors (and denominators) match the
        // single-process batch exactly.
        let extra = (padded_len - t) as i64;
        let b = rows.len() as i64;
        let dev = device;
        batch.input_ids = tch::Tensor::cat(&[&batch.input_ids, &tch::Tensor::full([b, extra], pad_id, (tch::Kind::Int64, dev))], 1);
        batch.attention_mask = tch::Tensor::cat(&[&batch.attention_mask, &tch::Tensor::zeros([b, extra], (tch::Kind::Int64, dev))], 1);
        batch.target_mask = tch::Tensor::cat(&[&batch.target_mask, &tch::Tensor::zeros([b, extra], (tch::Kind::Float, dev))], 1);
    }
    let global_counts = GlobalCounts {
        targets,
        sequences: global.len() as i64,
        positions: global.len() as i64 * padded_len as i64,
        padded_len: padded_len as i64,
    };
    LocalBatch { batch, example_ids: mine.to_vec(), global: global_counts }
}
