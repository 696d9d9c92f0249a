//! The baselines of issue 14: IT's small teacher is refused when its vocabulary is not the
//! student's (naming both files, before any weights load), the planner counts it, LossNorm and
//! IT plan like every method, and the relearning recipe (configs/relearn-tofu.toml followed by
//! `unlearn eval tofu --compare`) runs end to end on a tiny model. The methods' numbers are checked
//! against PyTorch in tests/step_equivalence.rs and pinned in tests/golden.rs.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the model directory `src` (config, tokenizer, weights) with its JSON files edited.
fn copy_model(src: &Path, dst: &Path, edit_config: impl Fn(&mut Value), edit_tokenizer: impl Fn(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    for (file, edit) in [("config.json", &edit_config as &dyn Fn(&mut Value)), ("tokenizer.json", &edit_tokenizer)] {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(dst.join(file)).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(dst.join(file), serde_json::to_string(&v).unwrap()).unwrap();
    }
    dst.to_path_buf()
}

fn it_config(dir: &Path, model: &Path, teacher: &Path, out: &Path) -> PathBuf {
    let data = shared_data().join("tofu");
    let cfg = dir.join(format!("{}.toml", out.file_name().unwrap().to_str().unwrap()));
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {model:?}\n[data]\nforget = {:?}\nretain = {:?}\nforget_limit = 4\nretain_limit = 4\n\
             [method]\nname = \"it\"\nteacher_model = {teacher:?}\n[optim]\nname = \"adamw\"\nlr = 1e-3\nclip_norm = 1.0\n\
             [train]\nsteps = 1\nbatch_size = 2\nmax_len = 96\nout_dir = {out:?}\n",
            data.join("forget01.json"),
            data.join("retain_perturbed.json")
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn it_refuses_a_small_teacher_with_another_vocabulary_naming_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = make_tiny_model(&dir.join("student"), r#"{"num_key_value_heads": 2}"#, 3, "bytebpe");
    let small = make_tiny_model(&dir.join("small"), r#"{"num_key_value_heads": 2, "num_hidden_layers": 1}"#, 4, "bytebpe");

    // The matching teacher trains.
    let out = dir.join("ok");
    let (ok, _, err) = run_unlearn(&["run", "--config", s(&it_config(dir, &model, &small, &out))]);
    assert!(ok, "IT with a matching teacher failed:\n{err}");
    assert!(out.join("final/config.json").exists());

    // Another vocab_size: the two config.json files are named.
    let wider = copy_model(&small, &dir.join("wider"), |c| c["vocab_size"] = (c["vocab_size"].as_i64().unwrap() + 8).into(), |_| {});
    refused(dir, &model, &wider, &["vocab_size", s(&wider.join("config.json")), s(&model.join("config.json"))]);

    // Same size, two token ids swapped: the two tokenizer.json files are named.
    let swapped = copy_model(
        &small,
        &dir.join("swapped"),
        |_| {},
        |t| {
            let vocab = t["model"]["vocab"].as_object_mut().unwrap();
            let (a, b) = ("a".to_string(), "b".to_string());
            let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
            vocab.insert(a, ib);
            vocab.insert(b, ia);
        },
    );
    refused(dir, &model, &swapped, &["vocabulary", s(&swapped.join("tokenizer.json")), s(&model.join("tokenizer.json"))]);
}

/// `unlearn run` of IT with `teacher` fails with an error naming the key and `needles`, and leaves no model.
fn refused(dir: &Path, model: &Path, teacher: &Path, needles: &[&str]) {
    let out = dir.join(format!("{}-run", teacher.file_name().unwrap().to_str().unwrap()));
    let (ok, _, err) = run_unlearn(&["run", "--config", s(&it_config(dir, model, teacher, &out))]);
    println!("{err}");
    assert!(!ok, "the teacher {} was accepted", teacher.display());
    for needle in ["method.teacher_model"].iter().chain(needles) {
        assert!(err.contains(needle), "the error does not name `{needle}`:\n{err}");
    }
    assert!(!out.join("final").exists(), "a refused run left a model behind");
}

fn plan(args: &[&str]) -> Value {
    let mut all = vec!["plan", "--json", "--device", "cpu", "--world-size", "2"];
    all.extend_from_slice(args);
    let (ok, out, err) = run_unlearn(&all);
    assert!(ok, "unlearn {all:?} failed:\n{err}");
    serde_json::from_str(&out).unwrap()
}

fn resident_row(p: &Value, component: &str) -> Option<f64> {
    p["resident"]["rows"].as_array().unwrap().iter().find(|r| r["component"] == component).map(|r| r["bytes"].as_f64().unwrap())
}

#[test]
fn the_planner_counts_the_small_teacher_and_plans_every_new_method() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("m"), r#"{"num_key_value_heads": 2}"#, 3, "bytebpe");
    let small = make_tiny_model(&tmp.path().join("small"), r#"{"num_key_value_heads": 2, "num_hidden_layers": 1}"#, 4, "bytebpe");
    let teacher = format!("method.teacher_model={:?}", s(&small));
    let it = plan(&["--model", s(&model), "--method", "it", "--set", &teacher]);
    // Its weights, counted from the safetensors file (fp32 on the CPU plan).
    let small_params: i64 =
        tch::Tensor::read_safetensors(small.join("model.safetensors")).unwrap().iter().map(|(_, t)| t.numel() as i64).sum();
    let bytes = resident_row(&it, "frozen side model").expect("no row for the small teacher");
    println!("it: frozen side model {bytes} B for {small_params} parameters; peak {} B", it["peak_bytes"]);
    assert_eq!(bytes, small_params as f64 * 4.0);
    assert!(resident_row(&it, "EMA teacher shard").is_some(), "IT keeps θ₀ as a teacher shard");
    assert_eq!(it["input"]["trainable"], "matrices");
    let ln = plan(&["--model", s(&model), "--method", "lossnorm"]);
    assert_eq!(ln["input"]["trainable"], "all");
    assert!(resident_row(&ln, "frozen side model").is_none());
    // Without its teacher, IT names the key.
    let (ok, _, err) = run_unlearn(&["plan", "--device", "cpu", "--world-size", "2", "--model", s(&model), "--method", "it"]);
    assert!(!ok && err.contains("method.teacher_model"), "{err}");
}

/// configs/relearn-tofu.toml as README's recipe runs it, shrunk to a tiny model: evaluate the
/// "unlearned" model, fine-tune it on unrelated data, evaluate again against the first report.
#[test]
fn the_relearning_recipe_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let unlearned = make_tiny_model(&dir.join("unlearned"), r#"{"num_key_value_heads": 2}"#, 7, "bytebpe");
    let data = shared_data().join("tofu");
    let eval = |model: &Path, out: &Path, compare: Option<&Path>| {
        let mut args = vec!["eval", "tofu", "--model", s(model), "--out", s(out), "--data", s(&data), "--forget", "forget01"];
        args.extend(["--max-samples", "2", "--max-new-tokens", "4", "--device", "cpu"]);
        if let Some(c) = compare {
            args.extend(["--compare", s(c)]);
        }
        let (ok, _, err) = run_unlearn(&args);
        assert!(ok, "unlearn {args:?} failed:\n{err}");
    };
    let before = dir.join("eval-unlearned");
    eval(&unlearned, &before, None);

    let run = dir.join("relearn");
    let config = repo().join("configs/relearn-tofu.toml");
    let sets = [
        format!("model.path={:?}", s(&unlearned)),
        format!("data.retain={:?}", s(&data.join("retain99.json"))),
        "data.retain_limit=8".to_string(),
        "train.steps=2".to_string(),
        "train.batch_size=4".to_string(),
        "train.max_len=96".to_string(),
        "model.device=\"cpu\"".to_string(),
        format!("train.out_dir={:?}", s(&run)),
    ];
    let mut args = vec!["run", "--config", s(&config)];
    for x in &sets {
        args.extend(["--set", x.as_str()]);
    }
    let (ok, _, err) = run_unlearn(&args);
    assert!(ok, "the relearning fine-tune failed:\n{err}");
    // It is the recipe's fine-tune: method finetune, every weight, on the retain data only.
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("name = \"finetune\"") && resolved.contains("trainable = \"all\""), "{resolved}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    // The weights moved.
    let w0: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(unlearned.join("model.safetensors")).unwrap().into_iter().collect();
    let w1 = tch::Tensor::read_safetensors(run.join("final/model.safetensors")).unwrap();
    let moved = w1.iter().map(|(k, t)| (t - &w0[k]).abs().max().double_value(&[])).fold(0.0, f64::max);
    assert!(moved > 0.0, "the relearning fine-tune did not change the model");

    let after = dir.join("eval-relearned");
    eval(&run.join("final"), &after, Some(&before));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(after.join("report.json")).unwrap()).unwrap();
    assert!(!report.as_object().unwrap().is_empty());
    let md = std::fs::read_to_string(after.join("report.md")).unwrap();
    println!("{md}");
    assert!(md.contains("| change |"), "the relearned evaluation has no before/after table:\n{md}");
}
