//! Text chunking equals mt-unlearn's, computed independently with transformers
//! (tests/py/chunk_ref.py): `return_overflowing_tokens` chunks with the tokenizer's specials on
//! every chunk (BOS for a Llama-2-style tokenizer, nothing for SmolLM2's), `chunk-exact` keeping only
//! chunks of exactly max_len tokens as `preparation/tokenize_webtext.py` does for the KL/QKL
//! pretraining text, over the 889 MUSE-News forget articles. QA records are never chunked.

mod common;

use std::path::Path;

use common::*;
use unlearn::data::{read_records, tokenize_all, Overflow, Record, Template, Tokenizer};
use unlearn::model::Config;

fn load_tokenizer(dir: &Path) -> Tokenizer {
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    Tokenizer::from_model_dir(dir, &cfg).unwrap()
}

/// Compare every mode, id for id, with the reference and print the counts.
fn check_against_transformers(name: &str, dir: &Path, max_len: usize, bos: Option<i64>) {
    let news = shared_data().join("muse/news/raw/forget.json");
    let records = read_records(&news).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ref.json");
    run_py("chunk_ref.py", &[dir.to_str().unwrap(), news.to_str().unwrap(), &max_len.to_string(), out.to_str().unwrap()]);
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let tok = load_tokenizer(dir);
    let mut line = format!("{name} ({}), {} articles, max_len {max_len}:", reference["tokenizer_class"], records.len());
    for (mode, key) in [(Overflow::Chunk, "chunk"), (Overflow::ChunkExact, "chunk_exact"), (Overflow::Truncate, "truncate")] {
        let ours: Vec<Vec<i64>> =
            tokenize_all(&tok, &Template::phi_qa(), &records, max_len, mode).unwrap().into_iter().map(|e| e.ids).collect();
        let theirs: Vec<Vec<i64>> = serde_json::from_value(reference[key].clone()).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{name} {key}: {} chunks vs transformers' {}", ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a, b, "{name} {key}: chunk {i} differs from transformers'");
        }
        assert!(ours.iter().all(|c| c.len() <= max_len), "{name} {key}: a chunk exceeds max_len");
        if mode == Overflow::ChunkExact {
            assert!(ours.iter().all(|c| c.len() == max_len), "{name}: chunk-exact kept a short chunk");
        }
        if let Some(bos) = bos {
            assert!(ours.iter().all(|c| c[0] == bos), "{name} {key}: a chunk does not start with BOS");
        }
        let tokens: usize = ours.iter().map(Vec::len).sum();
        line += &format!(" {key} {} chunks / {tokens} tokens;", ours.len());
    }
    println!("{line}");
}

#[test]
fn chunks_equal_transformers_overflow_for_llama_and_smollm2_tokenizers() {
    let tmp = tempfile::tempdir().unwrap();
    // A Llama-2-style tokenizer (SentencePiece BPE, BOS added by its post-processor), loaded by
    // transformers as LlamaTokenizerFast, as Llama-2's tokenizer_config.json names it.
    let sp = make_tiny_model(&tmp.path().join("sp"), "{}", 1, "sentencepiece");
    let cfg_path = sp.join("tokenizer_config.json");
    let mut tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    tc["tokenizer_class"] = "LlamaTokenizerFast".into();
    std::fs::write(&cfg_path, tc.to_string()).unwrap();
    let bos = Config::from_file(&sp.join("config.json")).unwrap().bos_token_id;
    assert!(bos.is_some(), "the Llama-style model has a BOS id");
    // The tiny tokenizer's 320-token vocabulary makes articles ~4x longer than Llama-2's would.
    check_against_transformers("llama-style", &sp, 512, bos);

    let smol = cache_dir().join("models/smollm2-135m-instruct");
    assert!(smol.join("tokenizer.json").exists(), "no demo model at {} (launch/setup.sh imports it)", smol.display());
    check_against_transformers("smollm2", &smol, 512, None);
    // At MUSE's 2048-token context most news articles have no full chunk: why `chunk-exact` is
    // only the pretraining-text rule, not the rule for every chunked dataset.
    check_against_transformers("smollm2", &smol, 2048, None);
}

#[test]
fn specials_start_every_chunk_and_qa_records_are_never_chunked() {
    let tmp = tempfile::tempdir().unwrap();
    let sp = make_tiny_model(&tmp.path().join("sp"), "{}", 1, "sentencepiece");
    let cfg = Config::from_file(&sp.join("config.json")).unwrap();
    let tok = Tokenizer::from_model_dir(&sp, &cfg).unwrap();
    let bos = cfg.bos_token_id.unwrap();
    let text = "Basil Mahfouz Al-Kuwaiti was born in Kuwait City. ".repeat(20);
    let plain = tok.encode(&text, false).unwrap();
    let max_len = 16;
    let chunks = tok.encode_chunks(&text, max_len).unwrap();
    // Each chunk: BOS + the next max_len - 1 text tokens, in order, covering the whole text.
    assert_eq!(chunks.len(), plain.len().div_ceil(max_len - 1), "chunk count");
    let rebuilt: Vec<i64> = chunks.iter().flat_map(|c| c[1..].to_vec()).collect();
    assert_eq!(rebuilt, plain, "chunks without their BOS are not the text's tokens in order");
    assert!(chunks.iter().all(|c| c[0] == bos), "every chunk starts with BOS");
    assert!(chunks.iter().take(chunks.len() - 1).all(|c| c.len() == max_len), "all but the tail are full");
    // Truncate = the first chunk, exactly transformers' `truncation=True`.
    let rec = vec![Record::Text(text.clone())];
    let first = tokenize_all(&tok, &Template::phi_qa(), &rec, max_len, Overflow::Truncate).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].ids, chunks[0]);
    // A text with no full chunk gives nothing under chunk-exact, and says why.
    let short = vec![Record::Text("A short text.".into())];
    let err = tokenize_all(&tok, &Template::phi_qa(), &short, max_len, Overflow::ChunkExact).unwrap_err().to_string();
    assert!(err.contains("chunk-exact") && err.contains("max_len 16"), "{err}");

    // QA records shorter than max_len: identical examples in every mode.
    let qa = read_records(&shared_data().join("tofu/forget01.json")).unwrap();
    let base = tokenize_all(&tok, &Template::phi_qa(), &qa, 256, Overflow::Truncate).unwrap();
    assert_eq!(base.len(), qa.len(), "one example per QA record");
    for mode in [Overflow::Chunk, Overflow::ChunkExact] {
        assert_eq!(tokenize_all(&tok, &Template::phi_qa(), &qa, 256, mode).unwrap(), base, "{mode:?} changed QA examples");
    }
    println!("QA: {} forget01 records give the same {} examples in all three modes", qa.len(), base.len());
}
