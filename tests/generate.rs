//! Batched greedy generation with the KV cache and left padding equals transformers' `generate`
//! (greedy, one prompt at a time) and our own uncached recomputation.

mod common;

use common::*;
use tch::{Device, Kind};
use unlearn::eval::generate::{greedy_all, greedy_uncached};
use unlearn::model::load_model;

#[test]
fn cached_batched_greedy_equals_transformers_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_tiny_model(&tmp.path().join("model"), r#"{"num_key_value_heads": 2}"#, 3, "bytebpe");
    let loaded = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let v = loaded.config.vocab_size;
    // Prompts of different lengths so that left padding is exercised.
    let prompts: Vec<Vec<i64>> =
        [9usize, 4, 13, 1, 6].iter().enumerate().map(|(r, &n)| (0..n).map(|j| 3 + ((r * 31 + j * 7) as i64 % (v - 3))).collect()).collect();
    let eos = loaded.config.eos_token_ids.clone();
    let ours = greedy_all(&loaded.model, &prompts, 24, &eos, 0, 3, "gen");
    for (p, g) in prompts.iter().zip(&ours) {
        assert_eq!(g, &greedy_uncached(&loaded.model, p, 24, &eos), "cached vs uncached for prompt {p:?}");
    }
    let hf = hf_generate(&dir, &prompts, 24);
    assert_eq!(ours, hf);
    assert!(ours.iter().map(Vec::len).sum::<usize>() > 20, "generations too short to test anything: {ours:?}");
}
