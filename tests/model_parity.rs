//! The tch Llama computes what HF transformers computes: logits on tiny random models covering
//! GQA and MHA, tied and untied embeddings, llama3 rope scaling, right- and left-padded batches.

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use unlearn::model::{llama::positions_from_mask, load_model};

/// Three sequences of lengths 11, 7 and 3, padded with 0 to 11 tokens; left or right aligned.
fn padded_batch(vocab: i64, left: bool) -> (Tensor, Tensor) {
    let lens = [11i64, 7, 3];
    let t = 11;
    let mut ids = vec![0i64; 3 * t as usize];
    let mut mask = vec![0i64; 3 * t as usize];
    for (r, &len) in lens.iter().enumerate() {
        for j in 0..len {
            let col = if left { t - len + j } else { j };
            let idx = r * t as usize + col as usize;
            ids[idx] = 3 + (r as i64 * 37 + j * 11) % (vocab - 3);
            mask[idx] = 1;
        }
    }
    (Tensor::from_slice(&ids).view([3, t]), Tensor::from_slice(&mask).view([3, t]))
}

fn hf_logits(model_dir: &std::path::Path, ids: &Tensor, mask: &Tensor, pos: Option<&Tensor>, dtype: &str) -> Tensor {
    let dir = model_dir.parent().unwrap();
    let inp = dir.join(format!("inputs-{dtype}.safetensors"));
    let out = dir.join(format!("logits-{dtype}.safetensors"));
    let mut named = vec![("input_ids", ids.shallow_clone()), ("attention_mask", mask.shallow_clone())];
    if let Some(p) = pos {
        named.push(("position_ids", p.shallow_clone()));
    }
    Tensor::write_safetensors(&named, &inp).unwrap();
    run_py(
        "hf_ref.py",
        &["logits", "--model", model_dir.to_str().unwrap(), "--inputs", inp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", dtype],
    );
    Tensor::read_safetensors(&out).unwrap().remove(0).1
}

#[test]
fn fp32_logits_match_transformers_on_padded_batches() {
    for case in LLAMA_CASES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make_tiny_model(&tmp.path().join("model"), case.config, 7, "bytebpe");
        let loaded = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
        let vocab = loaded.config.vocab_size;
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
        }
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
