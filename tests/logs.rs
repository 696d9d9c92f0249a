//! Logs a batch job can read: off a terminal, long work prints progress lines (done, rate, ETA);
//! `--log-format json` gives one JSON object per line, each with its rank, the final error
//! included; and `unlearn run` writes TensorBoard event files that TensorBoard's own reader
//! (the `tensorboard` package) loads with the same scalars as metrics.jsonl, across a resume.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every non-empty stderr line as JSON; panics on a line that is not.
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect()
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// NGDiff with AutoLR on a tiny model: metrics with optional and nested (AutoLR fit) fields.
fn ngdiff_config(dir: &Path, model: &Path, steps: u64) -> PathBuf {
    let path = dir.join("ngdiff.toml");
    let (forget, retain) = (shared_data().join("tofu/forget01.json"), shared_data().join("tofu/retain_perturbed.json"));
    std::fs::write(
        &path,
        format!(
            "[model]\npath = {model:?}\n[data]\nforget = {forget:?}\nretain = {retain:?}\nretain_limit = 32\n\
             [method]\nname = \"ngdiff\"\nautolr = true\nautolr_period = 3\n[optim]\nname = \"sgd\"\nlr = 0.05\n\
             [train]\nsteps = {steps}\nbatch_size = 2\nmax_len = 128\nseed = 1\ncheckpoint_every = 4\nkeep_checkpoints = 10\n\
             log_every = 1\nout_dir = {:?}\n",
            dir.join("run")
        ),
    )
    .unwrap();
    path
}

type Series = std::collections::BTreeMap<String, Vec<(i64, f32)>>;

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// TensorBoard's view of `run`: (event file names, tag -> [(step, value)]).
fn tensorboard_scalars(run: &Path) -> (Vec<String>, serde_json::Map<String, Value>) {
    let out = run.with_extension("tb.json");
    run_py("tb_ref.py", &["scalars", "--logdir", s(run), "--out", s(&out)]);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let files = v["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    (files, v["tags"].as_object().unwrap().clone())
}

/// Every number of every metrics line is in TensorBoard at its step (as the f32 TensorBoard
/// stores, compared exactly), nested keys as `a/b`, and TensorBoard has nothing else. Values are
/// compared as f32 because serde_json's default float parsing may land one f64 ulp off.
fn assert_tensorboard_equals_metrics(run: &Path) -> usize {
    let lines = metrics(run);
    let (_, tags) = tensorboard_scalars(run);
    let mut expected: Series = Default::default();
    fn walk(prefix: &str, v: &Value, step: i64, out: &mut Series) {
        match v {
            Value::Number(n) => out.entry(prefix.to_string()).or_default().push((step, n.as_f64().unwrap() as f32)),
            Value::Object(m) => {
                m.iter().for_each(|(k, v)| walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") }, v, step, out))
            }
            _ => {}
        }
    }
    for l in &lines {
        let step = l["step"].as_i64().unwrap();
        for (k, v) in l.as_object().unwrap().iter().filter(|(k, _)| *k != "step") {
            walk(k, v, step, &mut expected);
        }
    }
    let got: Series = tags
        .iter()
        .map(|(t, pts)| {
            (t.clone(), pts.as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32)).collect())
        })
        .collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "tags");
    for (tag, want) in &expected {
        assert_eq!(&got[tag], want, "TensorBoard scalars of `{tag}` vs metrics.jsonl");
    }
    expected.values().map(Vec::len).sum()
}

#[test]
fn json_run_logs_progress_lines_and_tensorboard_reads_the_metrics_across_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 11, "bytebpe");
    let cfg = ngdiff_config(tmp.path(), &model, 12);
    let run = tmp.path().join("run");
    // Not a terminal (captured), JSON format: no bar, progress as JSON lines.
    let (ok, _, err) = run_unlearn(&["--log-format", "json", "run", "--config", s(&cfg)]);
    assert!(ok, "run failed:\n{err}");
    let lines = json_lines(&err);
    assert!(lines.iter().all(|l| l["rank"] == 0 && l["level"].is_string() && l["timestamp"].is_string()), "{err}");
    let progress: Vec<&str> = lines.iter().filter(|l| l["target"] == "unlearn::progress").map(message).collect();
    println!("progress lines:\n{}", progress.join("\n"));
    // How many lines depends on the machine's speed (tenths within a second of the last line are
    // folded; src/progress.rs tests the cadence); the last one reports the whole run and its rate.
    let last = progress.last().unwrap_or_else(|| panic!("no progress line:\n{err}"));
    assert!(last.starts_with("train: 12/12 (100%), ") && last.contains("/s") && last.contains("elapsed"), "{progress:?}");
    assert!(lines.iter().any(|l| message(l).starts_with("step 12/12")), "step lines are JSON too");

    let n = assert_tensorboard_equals_metrics(&run);
    println!("fresh run: {n} scalars in TensorBoard equal metrics.jsonl");
    assert!(metrics(&run).iter().any(|l| l["autolr"]["lr_star"].is_number()), "the test should cover nested AutoLR scalars");

    // Preempted after step 12 with the last checkpoint at 8: the resume rewrites steps 9..12
    // (metrics.jsonl is truncated; TensorBoard must drop the first session's 9..12 as well).
    std::fs::remove_dir_all(run.join("checkpoints/step-000012")).unwrap();
    std::fs::write(run.join("checkpoints/latest"), "step-000008").unwrap();
    let before: Vec<Value> = metrics(&run);
    let (ok, _, err) = run_unlearn(&["run", "--resume", s(&run), "--set", "train.steps=14"]);
    assert!(ok, "resume failed:\n{err}");
    let after = metrics(&run);
    assert_eq!(after.iter().map(|l| l["step"].as_i64().unwrap()).collect::<Vec<_>>(), (1..=14).collect::<Vec<_>>());
    assert_eq!(after[..8], before[..8]);
    let (files, _) = tensorboard_scalars(&run);
    assert_eq!(files.len(), 2, "one event file per session: {files:?}");
    let n = assert_tensorboard_equals_metrics(&run);
    println!("after the resume: {n} scalars in TensorBoard equal metrics.jsonl");
}

#[test]
fn the_final_error_is_a_json_line_in_json_mode_and_plain_text_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    let out = tmp.path().join("onnx");
    let (ok, _, err) = run_unlearn(&["--log-format", "json", "export", "--model", s(&missing), "--out", s(&out)]);
    assert!(!ok);
    let lines = json_lines(&err);
    let last = lines.last().unwrap();
    println!("{last}");
    // A missing model directory is bad input: exit code 2 (README "Exit codes").
    assert_eq!((last["level"].as_str(), last["rank"].as_u64(), last["fields"]["exit_code"].as_i64()), (Some("ERROR"), Some(0), Some(2)));
    assert!(message(last).contains(s(&missing)), "the error names the path: {last}");

    let (ok, _, err) = run_unlearn(&["export", "--model", s(&missing), "--out", s(&out)]);
    assert!(!ok);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: ") && last.contains(s(&missing)), "{err}");
}

/// Under mpirun every rank's JSON lines carry its own rank (RUST_LOG=info makes rank 1 log too).
#[test]
fn json_lines_under_mpirun_carry_each_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 11, "bytebpe");
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "RUST_LOG=info"])
        .arg(unlearn_bin())
        .args(["--log-format", "json", "score", "--model", s(&model), "--data"])
        .arg(shared_data().join("tofu/forget01.json"))
        .args(["--out", s(&tmp.path().join("score.jsonl")), "--max-len", "128"])
        .output()
        .expect("spawn mpirun");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines = json_lines(&err);
    let mut ranks: Vec<u64> = lines.iter().map(|l| l["rank"].as_u64().unwrap()).collect();
    ranks.sort();
    ranks.dedup();
    assert_eq!(ranks, [0, 1], "{err}");
    // Progress is the main rank's alone.
    assert!(lines.iter().filter(|l| l["target"] == "unlearn::progress").all(|l| l["rank"] == 0), "{err}");
}
