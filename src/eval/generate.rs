//! Batched greedy generation with the KV cache: prompts are left-padded so that every row's next
//! token sits in the last column; positions follow the real tokens (as transformers' `generate`),
//! and rows that hit EOS leave the batch so finished sequences cost nothing.

use tch::{Device, Tensor};

use crate::eval::shard::{batched, Batching};
use crate::model::llama::positions_from_mask;
use crate::model::{KvCache, Llama};

/// Left-pad prompts into `[b, t]` ids and mask.
pub fn left_pad(prompts: &[&[i64]], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(1).max(1);
    let b = prompts.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0i64; b * t];
    for (r, p) in prompts.iter().enumerate() {
        let start = r * t + (t - p.len());
        ids[start..start + p.len()].copy_from_slice(p);
        mask[start..start + p.len()].fill(1);
    }
    let shape = [b as i64, t as i64];
    (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device))
}

/// Greedy continuation of each prompt, at most `max_new_tokens` tokens, stopping after any id in
/// `eos` (the EOS token is not included in the result).
pub fn greedy_batch(model: &Llama, prompts: &[&[i64]], max_new_tokens: usize, eos: &[i64], pad_id: i64) -> Vec<Vec<i64>> {
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    let mut out: Vec<Vec<i64>> = vec![vec![]; prompts.len()];
    if prompts.is_empty() || max_new_tokens == 0 {
        return out;
    }
    let (ids, mut mask) = left_pad(prompts, pad_id, dev);
    let mut pos = positions_from_mask(&mask);
    let mut cache = KvCache::new();
    let mut last = model.forward_cached_last(&ids, &mask, &pos, &mut cache);
    // Batch row -> prompt index, for the rows still generating.
    let mut alive: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..max_new_tokens {
        let next = last.argmax(-1, false).to_device(Device::Cpu);
        let next: Vec<i64> = Vec::<i64>::try_from(&next).expect("argmax to vec");
        let mut keep = vec![];
        for (row, &tok) in next.iter().enumerate() {
            if eos.contains(&tok) {
                continue;
            }
            out[alive[row]].push(tok);
            keep.push(row);
        }
        if keep.is_empty() || step + 1 == max_new_tokens {
            break;
        }
        let next_t = Tensor::from_slice(&next).to_device(dev).view([-1, 1]);
        let (next_t, new_pos) = if keep.len() < alive.len() {
            let idx = Tensor::from_slice(&keep.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(dev);
            cache.select_rows(&idx);
            mask = mask.index_select(0, &idx);
            pos = pos.index_select(0, &idx);
            alive = keep.iter().map(|&r| alive[r]).collect();
            (next_t.index_select(0, &idx), pos.narrow(1, pos.size()[1] - 1, 1) + 1)
        } else {
            (next_t, pos.narrow(1, pos.size()[1] - 1, 1) + 1)
        };
        mask = Tensor::cat(&[&mask, &mask.ones_like().narrow(1, 0, 1)], 1);
        pos = new_pos;
        last = model.forward_cached_last(&next_t, &mask, &pos, &mut cache);
    }
    out
}

/// Greedy generation for many prompts in batches of `batch_size` (longest first, so padding
/// within a batch stays small), results in input order.
pub fn greedy_all(
    model: &Llama,
    prompts: &[Vec<i64>],
    max_new_tokens: usize,
    eos: &[i64],
    pad_id: i64,
    batch_size: usize,
    label: &str,
) -> Vec<Vec<i64>> {
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    batched(prompts, &lengths, &Batching::rows(batch_size), label, |rows| {
        let rows: Vec<&[i64]> = rows.iter().map(|p| p.as_slice()).collect();
        greedy_batch(model, &rows, max_new_tokens, eos, pad_id)
    })
}

/// Greedy continuation of one prompt without any cache: the full sequence is re-run each step.
/// Slow; it is the reference the cached path is tested against.
pub fn greedy_uncached(model: &Llama, prompt: &[i64], max_new_tokens: usize, eos: &[i64]) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..max_new_tokens {
        let ids = Tensor::from_slice(&seq).view([1, -1]).to_device(model.device());
        let logits = model.forward(&ids, None, None);
        let tok = logits.select(1, seq.len() as i64 - 1).argmax(-1, false).int64_value(&[0]);
        if eos.contains(&tok) {
            break;
        }
        out.push(tok);
        seq.push(tok);
    }
    out
}
