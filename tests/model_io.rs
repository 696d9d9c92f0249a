//! HF model directories in and out: bit-identical round trips, sharded saves that transformers
//! loads, and a clear error (naming the file and the problem, non-zero exit) for each kind of bad
//! input.

mod common;

use std::path::Path;

use common::*;
use tch::{Device, Kind, Tensor};
use unlearn::model::{load_model, weights::save_model};

fn sorted_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let ck = unlearn::model::weights::Checkpoint::open(dir).unwrap();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    names.iter().map(|n| (n.clone(), ck.tensor(n, None).unwrap())).collect()
}

#[test]
fn load_save_load_is_bit_identical_and_sharded_saves_load_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let src = make_tiny_model(&tmp.path().join("src"), r#"{"num_key_value_heads": 2}"#, 9, "bytebpe");
    let mut loaded = load_model(&src, Kind::Float, Device::Cpu).unwrap();
    let single = tmp.path().join("single");
    save_model(&mut loaded.model, &loaded.raw_config, &single, Some(&src), u64::MAX).unwrap();
    let a = sorted_tensors(&src);
    let b = sorted_tensors(&single);
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} changed in the round trip");
    }
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(single.join(f).exists(), "{f} not written");
    }

    // Sharded: a 64 KiB shard limit splits the tiny model into many files plus an index.
    let sharded = tmp.path().join("sharded");
    save_model(&mut loaded.model, &loaded.raw_config, &sharded, Some(&src), 64 * 1024).unwrap();
    let shards = std::fs::read_dir(&sharded)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
        .count();
    assert!(shards > 2, "expected several shards, got {shards}");
    assert!(sharded.join("model.safetensors.index.json").exists());
    let c = sorted_tensors(&sharded);
    assert_eq!(a.len(), c.len(), "the sharded save holds a different number of tensors");
    for ((na, ta), (nc, tc)) in a.iter().zip(&c) {
        assert_eq!(na, nc);
        assert!(ta.equal(tc), "{na} changed in the sharded round trip");
    }
    // transformers loads the sharded directory and computes the same logits as the original.
    let out = run_py("hf_ref.py", &["load-check", "--model", sharded.to_str().unwrap()]);
    println!("transformers on the sharded save: {out}");
    let reloaded = load_model(&sharded, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[3i64, 17, 42, 5, 9, 100, 7]).view([1, 7]);
    let mask = ids.ones_like();
    let inp = tmp.path().join("in.safetensors");
    let logits_file = tmp.path().join("logits.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids), ("attention_mask", &mask)], &inp).unwrap();
    run_py(
        "hf_ref.py",
        &["logits", "--model", sharded.to_str().unwrap(), "--inputs", inp.to_str().unwrap(), "--out", logits_file.to_str().unwrap()],
    );
    let hf = Tensor::read_safetensors(&logits_file).unwrap().remove(0).1;
    let ours = tch::no_grad(|| reloaded.model.forward(&ids, Some(&mask), None));
    let diff = (&ours - &hf).abs().max().double_value(&[]);
    println!("sharded model: max |dlogit| vs transformers {diff:.2e}");
    assert!(diff <= 1e-4);
}

/// Run `unlearn score` on `model` and expect failure with every needle in the message.
fn expect_score_error(model: &Path, data: &Path, needles: &[&str]) {
    let out = model.parent().unwrap().join("scores.jsonl");
    let (ok, _, err) =
        run_unlearn(&["score", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    println!("{}", err.lines().last().unwrap_or(""));
    assert!(!ok, "expected failure");
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}:\n{err}");
    }
    assert!(!out.exists(), "no output may be written on failure");
}

#[test]
fn bad_model_directories_and_data_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make_tiny_model(&tmp.path().join("good"), "{}", 4, "bytebpe");
    let data = shared_data().join("tofu/forget01.json");
    let variant = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
        dir
    };
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };

    let d = variant("no-config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    expect_score_error(&d, &data, &["no-config", "no config.json"]);

    let d = variant("garbled-config");
    std::fs::write(d.join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    expect_score_error(&d, &data, &["garbled-config/config.json", "not valid JSON"]);

    let d = variant("unknown-type");
    edit_config(&d, &|v| v["model_type"] = "gemma".into());
    expect_score_error(&d, &data, &["unknown-type/config.json", "unsupported model_type `gemma`"]);

    let d = variant("bad-rope");
    edit_config(&d, &|v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        v.as_object_mut().unwrap().remove("rope_parameters");
    });
    expect_score_error(&d, &data, &["bad-rope/config.json", "rope scaling type `yarn`"]);

    let d = variant("truncated");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    expect_score_error(&d, &data, &["truncated/model.safetensors", "truncated or corrupt"]);

    // A checkpoint without one tensor, and one with a wrongly shaped tensor.
    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, Tensor)>);
    let rewrite = |dir: &Path, f: Edit| {
        let st = dir.join("model.safetensors");
        let mut ts = Tensor::read_safetensors(&st).unwrap();
        f(&mut ts);
        let named: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &st).unwrap();
    };
    let d = variant("missing-tensor");
    rewrite(&d, &|ts| ts.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight"));
    expect_score_error(&d, &data, &["missing-tensor/model.safetensors", "model.layers.1.mlp.up_proj.weight", "missing"]);

    let d = variant("wrong-shape");
    rewrite(&d, &|ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.layers.0.self_attn.k_proj.weight" {
                *t = t.narrow(0, 0, t.size()[0] - 1);
            }
        }
    });
    expect_score_error(&d, &data, &["wrong-shape/model.safetensors", "model.layers.0.self_attn.k_proj.weight", "has shape"]);

    // A tokenizer larger than the embedding table: tokenizer and model do not belong together.
    let d = variant("vocab-mismatch");
    edit_config(&d, &|v| v["vocab_size"] = 100.into());
    rewrite(&d, &|ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                *t = t.narrow(0, 0, 100);
            }
        }
    });
    expect_score_error(&d, &data, &["vocab-mismatch/tokenizer.json", "vocab_size 100"]);

    let empty = tmp.path().join("empty.json");
    std::fs::write(&empty, "").unwrap();
    expect_score_error(&good, &empty, &["empty.json", "empty"]);
    let no_records = tmp.path().join("none.json");
    std::fs::write(&no_records, "[]").unwrap();
    expect_score_error(&good, &no_records, &["none.json", "no records"]);
    let wrong_keys = tmp.path().join("keys.json");
    std::fs::write(&wrong_keys, r#"[{"q": "x", "a": "y"}]"#).unwrap();
    expect_score_error(&good, &wrong_keys, &["keys.json", "record 0", "not a known layout"]);
}
