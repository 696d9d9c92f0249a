//! The tch Llama computes what HF transformers computes: logits on tiny random models covering
//! GQA and MHA, tied and untied embeddings, llama3 rope scaling, right- and left-padded batches;
//! and so do its family variants (Mistral, Qwen2, Qwen3, Phi-3: [`FAMILY_CASES`]), whose greedy
//! generations through the KV cache also equal transformers' `generate`.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use unlearn::eval::generate::{greedy_all, greedy_uncached};
use unlearn::model::{llama::positions_from_mask, load_model};

/// fp32 logits of one case against transformers on left- and right-padded batches; returns the
/// largest |Δlogit| seen.
fn check_fp32(case: &Case, seed: u64) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_tiny_model(&tmp.path().join("model"), case.config, seed, "bytebpe");
    let loaded = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    let vocab = loaded.config.vocab_size;
    let mut worst = 0f64;
    for left in [false, true] {
        let (ids, mask) = padded_batch(vocab, left);
        // Left padding needs explicit positions (as generate() computes them); right padding
        // uses the default 0..t, like transformers without position_ids.
        let pos = left.then(|| positions_from_mask(&mask));
        let ours = tch::no_grad(|| loaded.model.forward(&ids, Some(&mask), pos.as_ref()));
        let theirs = hf_logits(&dir, &ids, &mask, pos.as_ref(), "fp32");
        let diff = masked_max_abs_diff(&ours, &theirs, &mask);
        let scale = theirs.abs().max().double_value(&[]);
        println!("{} left={left}: max |dlogit| = {diff:.3e} (logit scale {scale:.2})", case.name);
        assert!(scale > 0.1, "logits are degenerate; the test would prove nothing");
        assert!(diff <= 1e-4, "{} left={left}: max |dlogit| {diff} > 1e-4", case.name);
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn fp32_logits_match_transformers_on_padded_batches() {
    for case in LLAMA_CASES {
        check_fp32(case, 7);
    }
}

#[test]
fn family_fp32_logits_match_transformers_on_padded_batches() {
    for case in FAMILY_CASES {
        check_fp32(case, 7);
    }
}

/// Each family's loaded model says what it is, so a silently ignored key would show here.
#[test]
fn family_switches_are_read_from_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |name: &str| {
        let case = FAMILY_CASES.iter().find(|c| c.name == name).unwrap();
        let dir = make_tiny_model(&tmp.path().join(name), case.config, 1, "bytebpe");
        load_model(&dir, Kind::Float, Device::Cpu).unwrap().config
    };
    let q2 = cfg("qwen2-window-layer1");
    assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm);
    assert_eq!((q2.layer_window(0), q2.layer_window(1)), (None, Some(5)));
    let q3 = cfg("qwen3-headdim32");
    assert!(q3.qk_norm && !q3.qkv_bias && q3.head_dim == 32 && q3.head_dim * q3.num_attention_heads != q3.hidden_size);
    let phi = cfg("phi3-partial-longrope-long");
    assert!(phi.fused_projections && phi.rotary_dim() == 8 && phi.head_dim == 16);
    let r = phi.rope_longrope.as_ref().unwrap();
    assert_eq!(r.original_max_position_embeddings, 8);
    // transformers' default: sqrt(1 + ln(64/8) / ln 8).
    assert!((r.attention_factor - (1.0 + (8f64).ln() / (8f64).ln()).sqrt()).abs() < 1e-12);
    assert_eq!(cfg("mistral-window4").sliding_window, Some(4));
    assert_eq!(cfg("mistral").sliding_window, None);
}

/// Greedy generation through the KV cache (batched, left-padded) equals transformers' `generate`
/// one prompt at a time, and our uncached recomputation; prompts plus generations run past the
/// sliding windows and, for Phi-3, across longrope's switch to the long factors (prompt 13 + 24
/// new tokens > 32 original positions).
#[test]
fn family_cached_greedy_generation_equals_transformers_generate() {
    // One case per family, each with its window or longrope switch inside the generated span.
    let names = ["mistral-window4", "qwen2-window-layer1", "qwen3-headdim32", "phi3-longrope-short-window6"];
    for case in FAMILY_CASES.iter().filter(|c| names.contains(&c.name)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make_tiny_model(&tmp.path().join("model"), case.config, 3, "bytebpe");
        let loaded = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        let v = loaded.config.vocab_size;
        let prompts: Vec<Vec<i64>> = [9usize, 4, 13, 1]
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n).map(|j| 3 + ((r * 31 + j * 7) as i64 % (v - 3))).collect())
            .collect();
        let eos = loaded.config.eos_token_ids.clone();
        // Longrope picks its factors from the largest position of the whole batch (as
        // transformers does), so rows of a batch switch together; one prompt per batch then
        // matches transformers' one-prompt generate.
        let batch = if loaded.config.rope_longrope.is_some() { 1 } else { 3 };
        // At the switch the cache is recomputed with the long factors (as transformers' Phi-3
        // generation does), so cached and uncached generation agree there too.
        let ours = greedy_all(&loaded.model, &prompts, 24, &eos, 0, batch, "gen");
        for (p, g) in prompts.iter().zip(&ours) {
            assert_eq!(g, &greedy_uncached(&loaded.model, p, 24, &eos), "{}: cached vs uncached for prompt {p:?}", case.name);
        }
        let hf = hf_generate(&dir, &prompts, 24);
        let n: usize = ours.iter().map(Vec::len).sum();
        assert_eq!(ours, hf, "{}", case.name);
        println!("{}: {n} generated tokens equal transformers' generate: {ours:?}", case.name);
        assert!(n > 20, "{}: generations too short to test anything: {ours:?}", case.name);
    }
}

/// bf16 differs from transformers only by rounding order: documented tolerance 0.05 absolute
/// on logits of scale ~1-3 (bf16 has 8 mantissa bits, ~4e-3 relative per op).
#[test]
fn bf16_logits_match_transformers_within_documented_tolerance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 11, "bytebpe");
    let loaded = load_model(&dir, Kind::BFloat16, Device::Cpu).unwrap();
    let (ids, mask) = padded_batch(loaded.config.vocab_size, false);
    let ours = tch::no_grad(|| loaded.model.forward(&ids, Some(&mask), None)).to_kind(Kind::Float);
    let theirs = hf_logits(&dir, &ids, &mask, None, "bf16");
    let diff = masked_max_abs_diff(&ours, &theirs, &mask);
    println!("bf16: max |dlogit| = {diff:.3e}");
    assert!(diff <= 0.05, "bf16 max |dlogit| {diff} > 0.05");
}

#[test]
fn family_bf16_logits_match_transformers_within_documented_tolerance() {
    let names = ["mistral-window4", "qwen2-tied", "qwen3-bias-tied", "phi3-partial-longrope-long"];
    for case in FAMILY_CASES.iter().filter(|c| names.contains(&c.name)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make_tiny_model(&tmp.path().join("model"), case.config, 11, "bytebpe");
        let loaded = load_model(&dir, Kind::BFloat16, Device::Cpu).unwrap();
        let (ids, mask) = padded_batch(loaded.config.vocab_size, false);
        let ours = tch::no_grad(|| loaded.model.forward(&ids, Some(&mask), None)).to_kind(Kind::Float);
        let theirs = hf_logits(&dir, &ids, &mask, None, "bf16");
        let diff = masked_max_abs_diff(&ours, &theirs, &mask);
        println!("{} bf16: max |dlogit| = {diff:.3e}", case.name);
        assert!(diff <= 0.05, "{} bf16 max |dlogit| {diff} > 0.05", case.name);
    }
}

/// The window and longrope's switch change these tiny models' logits, so the parity tests above
/// would see an implementation that ignored them.
#[test]
fn sliding_window_and_longrope_switch_change_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, without) in [
        ("mistral-window4", &(|c: &mut unlearn::model::Config| c.sliding_window = None) as &dyn Fn(&mut unlearn::model::Config)),
        ("phi3-partial-longrope-long", &|c| c.rope_longrope.as_mut().unwrap().original_max_position_embeddings = 64),
    ] {
        let case = FAMILY_CASES.iter().find(|c| c.name == name).unwrap();
        let mut loaded = load_model(&make_tiny_model(&tmp.path().join(name), case.config, 7, "bytebpe"), Kind::Float, Device::Cpu).unwrap();
        let mut cfg = loaded.config.clone();
        without(&mut cfg);
        let weights: std::collections::HashMap<String, Tensor> = loaded.model.named_params().into_iter().collect();
        let other = unlearn::model::Llama::new(&cfg, |spec| Ok(weights[&spec.name].shallow_clone())).unwrap();
        let (ids, mask) = padded_batch(cfg.vocab_size, false);
        let (a, b) = tch::no_grad(|| (loaded.model.forward(&ids, Some(&mask), None), other.forward(&ids, Some(&mask), None)));
        let diff = masked_max_abs_diff(&a, &b, &mask);
        println!("{name}: switching it off moves the logits by up to {diff:.3e}");
        assert!(diff > 1e-2, "{name}: {diff}");
    }
}
