//! Behaviour of every method on a tiny model that first memorises a small synthetic fact set:
//! unlearning the forget facts raises their NLL by at least 2 nats while the retain facts' NLL
//! rises by less than 0.5 (fixed seeds, end to end through `unlearn run` and `unlearn score`).

mod common;

use std::path::{Path, PathBuf};

use common::*;

const NAMES: [&str; 16] = [
    "Amaro", "Belisa", "Corvin", "Dalia", "Eskil", "Fenna", "Goran", "Hilde", "Ilario", "Jorun", "Kasimir", "Liora", "Magnus", "Nerea",
    "Osric", "Petra",
];
/// Answer words of the retained facts and of the forgotten ones: disjoint pools, as the content
/// of different people's records would be (with shared words, no method can lower one set's
/// likelihood without the other's, and plain gradient ascent drags both).
const RETAIN_WORDS: [&str; 8] = ["river", "copper", "lantern", "meadow", "violet", "harbor", "thunder", "marble"];
const FORGET_WORDS: [&str; 6] = ["willow", "falcon", "ember", "glacier", "saffron", "quartz"];

/// Sixteen independent facts "the password of NAME is W1 W2 W3"; the last four are forgotten.
fn write_facts(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let fact = |i: usize| {
        let pool: &[&str] = if i >= 12 { &FORGET_WORDS } else { &RETAIN_WORDS };
        let w = |k: usize| pool[(i * 5 + k * 7 + i * k) % pool.len()];
        serde_json::json!({"question": format!("What is the password of {}?", NAMES[i]), "answer": format!("{} {} {}", w(0), w(1), w(2))})
    };
    let all: Vec<_> = (0..16).map(fact).collect();
    let write = |name: &str, v: &[serde_json::Value]| {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        p
    };
    (write("all.json", &all), write("forget.json", &all[12..]), write("retain.json", &all[..12]))
}

fn run(cfg: &Path, sets: &[&str]) {
    let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let (ok, _, err) = run_unlearn(&args);
    assert!(ok, "unlearn run {sets:?} failed:\n{err}");
}

fn mean_nll(model: &Path, data: &Path, out: &Path) -> f64 {
    let (ok, _, err) =
        run_unlearn(&["score", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "score failed: {err}");
    let text = std::fs::read_to_string(out).unwrap();
    let v: Vec<f64> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["nll"].as_f64().unwrap()).collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn every_method_forgets_the_forget_facts_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = make_tiny_model(
        &dir.join("base"),
        r#"{"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 4, "num_key_value_heads": 2}"#,
        13,
        "bytebpe",
    );
    let (all, forget, retain) = write_facts(dir);
    let cfg = dir.join("cfg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {base:?}\ntrainable = \"all\"\n[data]\nforget = {forget:?}\nretain = {all:?}\n[method]\nname = \"finetune\"\n\
             [optim]\nname = \"adamw\"\nlr = 0.003\nweight_decay = 0.0\n[train]\nsteps = 250\nbatch_size = 8\nmax_len = 64\nseed = 1\nout_dir = {:?}\n",
            dir.join("target")
        ),
    )
    .unwrap();
    run(&cfg, &[]);
    let target = dir.join("target/final");
    let f0 = mean_nll(&target, &forget, &dir.join("f0.jsonl"));
    let r0 = mean_nll(&target, &retain, &dir.join("r0.jsonl"));
    println!("target: forget NLL {f0:.3}, retain NLL {r0:.3}");
    assert!(f0 < 0.3 && r0 < 0.3, "the target did not memorise the facts (forget {f0}, retain {r0})");

    let target_s = format!("model.path={:?}", target.display().to_string());
    let retain_s = format!("data.retain={:?}", retain.display().to_string());
    // (method, extra overrides); the optimizer and learning rate are each method's usual kind.
    let cases: &[(&str, &[&str])] = &[
        ("ga", &["method.name=\"ga\"", "optim.lr=0.001", "train.steps=6"]),
        ("graddiff", &["method.name=\"graddiff\"", "optim.lr=0.002", "train.steps=20"]),
        ("npo", &["method.name=\"npo\"", "method.retain_weight=1.0", "optim.lr=0.002", "train.steps=40"]),
        ("ngdiff", &["method.name=\"ngdiff\"", "optim.lr=0.002", "train.steps=30"]),
        (
            "mean-teacher",
            &[
                "method.name=\"mean-teacher\"",
                "method.alpha=1.0",
                "method.delta=0.05",
                "method.damp=1.0",
                "method.clip=1.0",
                "optim.name=\"sgd\"",
                "optim.momentum=0.9",
                "optim.lr=0.5",
                "optim.weight_decay=0.0",
                "train.steps=40",
            ],
        ),
    ];
    let mut failures = vec![];
    for (name, sets) in cases {
        let out = dir.join(format!("run-{name}"));
        let out_s = format!("train.out_dir={:?}", out.display().to_string());
        let mut all_sets: Vec<&str> = vec![&target_s, &retain_s, &out_s, "train.batch_size=4"];
        all_sets.extend(sets.iter());
        run(&cfg, &all_sets);
        let f = mean_nll(&out.join("final"), &forget, &dir.join(format!("f-{name}.jsonl")));
        let r = mean_nll(&out.join("final"), &retain, &dir.join(format!("r-{name}.jsonl")));
        println!("{name}: forget NLL {f0:.3} -> {f:.3} (+{:.3}), retain NLL {r0:.3} -> {r:.3} (+{:.3})", f - f0, r - r0);
        if !(f - f0 >= 2.0 && r - r0 < 0.5) {
            failures.push(format!("{name}: forget +{:.3}, retain +{:.3}", f - f0, r - r0));
        }
    }
    assert!(failures.is_empty(), "methods outside the bounds (forget ≥ +2 nats, retain < +0.5): {failures:?}");
}
