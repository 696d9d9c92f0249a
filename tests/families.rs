//! Each family beside Llama end to end on a tiny random model: `unlearn run` trains it (the loss
//! falls, and with `trainable = "all"` its biases and q/k norms move too), the `final/` it writes
//! loads in transformers with the same logits as ours, and its ONNX export passes the ONNX checker,
//! matches transformers in onnxruntime and passes `unlearn verify`. The Mistral and Qwen2 cases
//! train on ChatML prompts, and `unlearn eval tofu` on their `final/` takes the run's template.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use tch::{Device, Kind};
use unlearn::model::llama::positions_from_mask;
use unlearn::model::load_model;
use unlearn::model::weights::Checkpoint;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Four QA records, read whole by every step (batch 4), so the loss must fall step after step;
/// and a one-record forget file, which `run` requires to differ from the retain set (finetune reads only the retain set).
fn write_data(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let recs: Vec<Value> = [
        ("Who wrote the red book?", "Amaro Velde"),
        ("Where was Belisa born?", "in a harbor town"),
        ("What does Corvin study?", "copper and marble"),
        ("When did Dalia travel?", "every summer"),
    ]
    .iter()
    .map(|(q, a)| serde_json::json!({"question": q, "answer": a}))
    .collect();
    let p = dir.join("qa.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    let f = dir.join("forget.json");
    std::fs::write(&f, serde_json::to_string(&recs[..1]).unwrap()).unwrap();
    (f, p)
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["loss_retain"].as_f64().unwrap())
        .collect()
}

/// Largest |a − b| over the tensors whose names satisfy `pick`, in two model directories.
fn max_change(a: &Path, b: &Path, pick: impl Fn(&str) -> bool) -> f64 {
    let (ca, cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let names: Vec<String> = ca.names().filter(|n| pick(n)).map(String::from).collect();
    assert!(!names.is_empty(), "no tensor picked in {}", a.display());
    names.iter().map(|n| (ca.tensor(n, None).unwrap() - cb.tensor(n, None).unwrap()).abs().max().double_value(&[])).fold(0.0, f64::max)
}

#[test]
fn every_family_trains_saves_for_transformers_exports_and_verifies() {
    let names = ["mistral-window4", "qwen2-window-layer1", "qwen3-bias-tied", "phi3-partial-longrope-long"];
    for case in FAMILY_CASES.iter().filter(|c| names.contains(&c.name)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = make_tiny_model(&dir.join("base"), case.config, 5, "bytebpe");
        let (forget, data) = write_data(dir);
        // Chat families train and evaluate under a chat template; the others keep the default.
        let template = if case.name.starts_with("mistral") || case.name.starts_with("qwen2") { "chatml" } else { "phi-qa" };
        let cfg = dir.join("run.toml");
        std::fs::write(
            &cfg,
            format!(
                "[model]\npath = {base:?}\ntrainable = \"all\"\n[data]\nforget = {forget:?}\nretain = {data:?}\ntemplate = {template:?}\n[method]\nname = \"finetune\"\n\
                 [optim]\nname = \"adamw\"\nlr = 0.003\nweight_decay = 0.0\n[train]\nsteps = 5\nbatch_size = 4\nmax_len = 48\nseed = 1\nout_dir = {:?}\n",
                dir.join("run")
            ),
        )
        .unwrap();
        let (ok, _, err) = run_unlearn(&["run", "--config", s(&cfg)]);
        assert!(ok, "{}: unlearn run failed:\n{err}", case.name);
        let l = losses(&dir.join("run"));
        println!("{}: retain loss per step {l:?}", case.name);
        assert_eq!(l.len(), 5);
        assert!(l.windows(2).all(|w| w[1] < w[0]) && l[4] < l[0] - 0.05, "{}: the loss does not fall: {l:?}", case.name);

        // `all` trains what `matrices` leaves frozen: biases and q/k norms.
        let fin = dir.join("run/final");
        for part in [".bias", "q_norm.weight", "k_norm.weight"] {
            if Checkpoint::open(&base).unwrap().names().any(|n| n.ends_with(part)) {
                let moved = max_change(&base, &fin, |n| n.ends_with(part));
                assert!(moved > 1e-4, "{}: `{part}` tensors did not train ({moved})", case.name);
            }
        }

        // What final/ holds, transformers reads as we do.
        let ours = load_model(&fin, Kind::Float, Device::Cpu).unwrap();
        let mut worst = 0f64;
        for left in [false, true] {
            let (ids, mask) = padded_batch(ours.config.vocab_size, left);
            let pos = left.then(|| positions_from_mask(&mask));
            let a = tch::no_grad(|| ours.model.forward(&ids, Some(&mask), pos.as_ref()));
            let b = hf_logits(&fin, &ids, &mask, pos.as_ref(), "fp32");
            worst = worst.max(masked_max_abs_diff(&a, &b, &mask));
        }
        println!("{}: final/ in transformers vs ours: max |dlogit| = {worst:.3e}", case.name);
        assert!(worst <= 1e-4, "{}: {worst}", case.name);

        // TOFU evaluation of final/ uses the template the run trained with (from the run's config.toml);
        // the chat cases only (the Phi-3 case's 64 positions cannot hold TOFU's byte-level questions).
        if template == "chatml" {
            let report_dir = dir.join("eval");
            let tofu = shared_data().join("tofu");
            let eval_args = [
                "eval",
                "tofu",
                "--model",
                s(&fin),
                "--out",
                s(&report_dir),
                "--data",
                s(&tofu),
                "--forget",
                "forget01",
                "--max-samples",
                "2",
                "--max-new-tokens",
                "4",
            ];
            let (ok, _, err) = run_unlearn(&eval_args);
            assert!(ok, "{}: eval tofu failed:\n{err}", case.name);
            let report: Value = serde_json::from_str(&std::fs::read_to_string(report_dir.join("report.json")).unwrap()).unwrap();
            let used = report["template"]["name"].as_str().unwrap_or("phi-qa");
            assert_eq!(used, template, "{}: eval used template {used}: {:#}", case.name, report["template"]);
            let mu = report["metrics"]["model_utility"]["value"].as_f64().unwrap_or(f64::NAN);
            println!("{}: eval tofu under {used}: model utility {mu:.4}", case.name);
            assert!(mu.is_finite() && mu >= 0.0, "{}: model utility {mu}: {report:#}", case.name);
        }

        // ONNX: checker-valid, onnxruntime equals transformers, and `unlearn verify` passes.
        let onnx = dir.join("onnx");
        let (ok, _, err) = run_unlearn(&["export", "--model", s(&fin), "--out", s(&onnx), "--kv-cache"]);
        assert!(ok, "{}: export failed:\n{err}", case.name);
        let check: Value = serde_json::from_str(&run_py("onnx_ref.py", &["check", "--onnx", s(&onnx.join("model.onnx"))])).unwrap();
        assert!(check["nodes"].as_u64().unwrap() > 0);
        let cmp: Value =
            serde_json::from_str(&run_py("onnx_ref.py", &["compare", "--model", s(&fin), "--onnx", s(&onnx.join("model.onnx"))])).unwrap();
        for batch in ["right_padded", "left_padded"] {
            let d = cmp[batch]["max_abs_diff"].as_f64().unwrap();
            println!("{} {batch}: onnxruntime vs transformers max |dlogit| = {d:.3e}", case.name);
            assert!(cmp[batch]["finite"].as_bool().unwrap() && d <= 1e-4, "{} {batch}: {d}", case.name);
        }
        let report = dir.join("verify.json");
        let (ok, out, err) = run_unlearn(&["verify", "--model", s(&fin), "--onnx", s(&onnx), "--out", s(&report), "--threads", "1"]);
        assert!(ok, "{}: verify failed:\n{out}\n{err}", case.name);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        println!(
            "{}: unlearn verify max |dlogit| = {:.3e}, generations identical: {}",
            case.name,
            v["max_abs_diff"].as_f64().unwrap(),
            v["generations_identical"]
        );
        assert_eq!(v["passed"], Value::Bool(true), "{}: {v:#}", case.name);
        assert_eq!(v["generations_identical"], Value::Bool(true), "{}", case.name);
    }
}
