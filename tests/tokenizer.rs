//! Our tokenizer (tokenizers crate 0.22) gives transformers' token ids for a Llama-2-style
//! SentencePiece BPE (byte fallback, BOS added) and a Llama-3/SmolLM2-style byte-level BPE, and
//! `unlearn score` scores exactly the answer tokens transformers scores under our QA format.

mod common;

use common::*;
use unlearn::data::Tokenizer;
use unlearn::model::Config;

fn texts() -> Vec<String> {
    let recs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(shared_data().join("tofu/forget01.json")).unwrap()).unwrap();
    let mut t: Vec<String> = recs
        .iter()
        .take(10)
        .flat_map(|r| [r["prompt"].as_str().unwrap().to_string(), r["response"].as_str().unwrap().to_string()])
        .collect();
    t.extend(
        [
            "Café naïve — 東京 🙂 ½",
            "  leading spaces\n\nand blank lines\t tab",
            "numbers 1234567 and 3.14159",
            "",
            "Question: x?\nAnswer: y",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    t
}

#[test]
fn token_ids_equal_transformers_for_sentencepiece_and_byte_level_bpe() {
    for kind in ["sentencepiece", "bytebpe"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = make_tiny_model(&tmp.path().join("m"), "{}", 1, kind);
        let cfg = Config::from_file(&dir.join("config.json")).unwrap();
        let tok = Tokenizer::from_model_dir(&dir, &cfg).unwrap();
        let texts = texts();
        let tf = tmp.path().join("texts.json");
        let of = tmp.path().join("ids.json");
        std::fs::write(&tf, serde_json::to_string(&texts).unwrap()).unwrap();
        run_py(
            "hf_ref.py",
            &["tokenize", "--model", dir.to_str().unwrap(), "--texts", tf.to_str().unwrap(), "--out", of.to_str().unwrap()],
        );
        let theirs: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(&of).unwrap()).unwrap();
        assert_eq!(theirs.len(), texts.len());
        for (t, ids) in texts.iter().zip(&theirs) {
            assert_eq!(&tok.encode(t, true).unwrap(), ids, "{kind}: ids differ for {t:?}");
        }
        let bos_added = theirs[0].first() == cfg.bos_token_id.as_ref();
        println!("{kind}: {} texts, identical ids (BOS prepended: {bos_added})", texts.len());
        assert_eq!(bos_added, kind == "sentencepiece");

        // Answer-only NLL: our data pipeline vs transformers on the same documented format.
        let ours = tmp.path().join("ours.jsonl");
        let hf = tmp.path().join("hf.jsonl");
        let data = shared_data().join("tofu/forget01.json");
        let (ok, _, err) = run_unlearn(&[
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            ours.to_str().unwrap(),
            "--limit",
            "12",
            "--max-len",
            "1024",
        ]);
        assert!(ok, "{err}");
        run_py(
            "hf_ref.py",
            &[
                "score",
                "--model",
                dir.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--out",
                hf.to_str().unwrap(),
                "--limit",
                "12",
                "--max-len",
                "1024",
            ],
        );
        let read = |p: &std::path::Path| -> Vec<serde_json::Value> {
            std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        let (ours, hf) = (read(&ours), read(&hf));
        assert_eq!((ours.len(), hf.len()), (12, 12), "{kind}: expected 12 scored samples from each side");
        for (a, b) in ours.iter().zip(hf) {
            assert_eq!(a["tokens"], b["tokens"], "{kind}: scored token counts differ");
            let (x, y) = (a["nll"].as_f64().unwrap(), b["nll"].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{kind}: NLL {x} vs transformers {y}");
            let (x, y) = (a["min_k_40"].as_f64(), b["min_k_40"].as_f64());
            assert_eq!(x.is_some(), y.is_some());
            if let (Some(x), Some(y)) = (x, y) {
                assert!((x - y).abs() <= 1e-5 * y.abs());
            }
        }
    }
}
