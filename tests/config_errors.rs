//! Every kind of bad `unlearn run` config fails with a message naming the file, the key and what
//! is wrong; and the resolved config written for `--resume` parses back for every method.

mod common;

use std::path::PathBuf;

use common::*;
use unlearn::config::{RunConfig, METHODS};

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Validation only reads config.json of the model directory; a real model's is used.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let cfg = unlearn::model::Config { num_hidden_layers: 1, ..unlearn::model::Config::llama2_7b() };
    std::fs::write(model.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    Fixture { _tmp: tmp, dir, model }
}

fn base(f: &Fixture, method: &str) -> String {
    let forget = shared_data().join("tofu/forget01.json");
    let retain = shared_data().join("tofu/retain_perturbed.json");
    format!(
        "[model]\npath = {:?}\n[data]\nforget = {forget:?}\nretain = {retain:?}\n[method]\nname = \"{method}\"\n\
         [optim]\nname = \"adamw\"\nlr = 1e-5\n[train]\nsteps = 10\nbatch_size = 4\nout_dir = {:?}\n",
        f.model,
        f.dir.join("out")
    )
}

fn load(f: &Fixture, text: &str, sets: &[&str]) -> Result<RunConfig, String> {
    let path = f.dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::load(&path, &sets).map_err(|e| e.to_string())
}

fn expect_err(f: &Fixture, text: &str, sets: &[&str], needles: &[&str]) {
    let err = load(f, text, sets).expect_err("config should have been rejected");
    println!("{err}");
    assert!(err.contains("bad.toml") || err.contains("--set"), "message does not name the file: {err}");
    for n in needles {
        assert!(err.contains(n), "message {err:?} lacks {n:?}");
    }
}

#[test]
fn unknown_keys_are_named_with_the_allowed_ones() {
    let f = fixture();
    let text = base(&f, "ngdiff").replace("lr = 1e-5", "lr = 1e-5\nlearning_rate = 3");
    expect_err(&f, &text, &[], &["optim.learning_rate", "unknown key", "allowed: name, lr"]);
    expect_err(&f, &base(&f, "ngdiff"), &["train.stepz=3"], &["train.stepz", "unknown key"]);
    expect_err(&f, &base(&f, "ngdiff"), &["extra.thing=1"], &["extra", "unknown key", "allowed: model, data"]);
    // A key that exists but not for this method is rejected, not ignored.
    expect_err(&f, &base(&f, "ngdiff"), &["method.alpha=0.1"], &["method.alpha", "method `ngdiff`"]);
}

#[test]
fn wrong_types_and_values_are_named() {
    let f = fixture();
    expect_err(&f, &base(&f, "ngdiff"), &["train.steps=\"ten\""], &["train.steps", "expected an integer"]);
    expect_err(&f, &base(&f, "ngdiff"), &["optim.name=\"adam\""], &["optim.name", "\"adam\"", "allowed: adamw, sgd"]);
    expect_err(&f, &base(&f, "ngdiff"), &["method.name=\"rmu\""], &["method.name", "allowed: finetune, ga"]);
    expect_err(&f, &base(&f, "ngdiff"), &["method.autolr=\"yes\""], &["method.autolr", "true or false"]);
    expect_err(&f, &base(&f, "ngdiff"), &["dist.zero=4"], &["dist.zero", "0, 1, 2 or 3"]);
    expect_err(&f, &base(&f, "ngdiff"), &["train.batch_size=0"], &["train.batch_size", ">= 1"]);
    expect_err(
        &f,
        &base(&f, "ngdiff"),
        &["data.retain_overflow=\"wrap\""],
        &["data.retain_overflow", "allowed: truncate, chunk, chunk-exact"],
    );
    expect_err(&f, "model = [", &[], &["bad.toml"]);
}

#[test]
fn non_positive_learning_rates_are_rejected() {
    let f = fixture();
    for lr in ["0", "-1e-5", "0.0"] {
        expect_err(&f, &base(&f, "graddiff"), &[&format!("optim.lr={lr}")], &["optim.lr", "must be a finite number > 0"]);
    }
    expect_err(&f, &base(&f, "graddiff").replace("lr = 1e-5\n", ""), &[], &["optim.lr", "is required"]);
}

#[test]
fn missing_files_and_missing_data_are_named() {
    let f = fixture();
    expect_err(
        &f,
        &base(&f, "ngdiff"),
        &["data.forget=\"/nonexistent/forget.json\""],
        &["data.forget", "file not found", "/nonexistent/forget.json"],
    );
    expect_err(&f, &base(&f, "ngdiff"), &["model.path=\"/nonexistent/model\""], &["model.path", "no config.json"]);
    expect_err(
        &f,
        &base(&f, "npo"),
        &["method.reference_model=\"/nonexistent/ref\""],
        &["method.reference_model", "/nonexistent/ref", "no config.json"],
    );
    // An unset variable in a path is named, not silently expanded to nothing.
    expect_err(
        &f,
        &base(&f, "ngdiff"),
        &["model.path=\"${UNLEARN_TEST_UNSET_VAR}/m\""],
        &["model.path", "UNLEARN_TEST_UNSET_VAR", "not set"],
    );
    // Methods without the data they need.
    let no_retain = base(&f, "ngdiff").lines().filter(|l| !l.starts_with("retain")).collect::<Vec<_>>().join("\n");
    expect_err(&f, &no_retain, &[], &["data.retain", "method `ngdiff` needs retain data"]);
    let mt = no_retain.replace("\"ngdiff\"", "\"mean-teacher\"");
    expect_err(&f, &mt, &[], &["data.retain", "pretraining text"]);
    let no_forget = base(&f, "ga").lines().filter(|l| !l.starts_with("forget")).collect::<Vec<_>>().join("\n");
    expect_err(&f, &no_forget, &[], &["data.forget", "method `ga` needs forget data"]);
}

#[test]
fn the_cli_exits_nonzero_with_the_message() {
    let f = fixture();
    let path = f.dir.join("bad.toml");
    std::fs::write(&path, base(&f, "ngdiff")).unwrap();
    let (ok, _, err) = run_unlearn(&["run", "--config", path.to_str().unwrap(), "--set", "optim.lr=-1"]);
    assert!(!ok);
    assert!(err.contains("bad.toml") && err.contains("optim.lr"), "{err}");
    assert!(!f.dir.join("out").exists(), "a rejected config must not create the output directory");
    // A TOML syntax error keeps its position, for `run` and for `plan` alike.
    std::fs::write(&path, "[model\npath = \"x\"\n").unwrap();
    for args in [vec!["run", "--config", path.to_str().unwrap()], vec!["plan", "--config", path.to_str().unwrap(), "--world-size", "2"]] {
        let (ok, _, err) = run_unlearn(&args);
        assert!(!ok && err.contains("bad.toml") && err.contains("line 1, column 7"), "{args:?}: {err}");
    }
}

#[test]
fn resolved_config_round_trips_for_every_method() {
    let f = fixture();
    // IT's one required key: its small teacher (any model directory parses).
    let teacher = format!("method.teacher_model={:?}", f.model.display().to_string());
    for m in METHODS {
        let sets: &[&str] = if *m == "it" { &[&teacher] } else { &[] };
        let cfg = load(&f, &base(&f, m), sets).unwrap_or_else(|e| panic!("{m}: {e}"));
        let again = load(&f, &cfg.to_toml(), &[]).unwrap_or_else(|e| panic!("{m}: resolved config does not parse back: {e}"));
        assert_eq!(cfg.to_toml(), again.to_toml(), "{m}");
    }
}

/// `chunk-exact` (the mean-teacher recipe's pretraining text) is a value configs may use, and the
/// resolved config written for `--resume` keeps it.
#[test]
fn overflow_modes_parse_and_round_trip() {
    use unlearn::data::Overflow;
    let f = fixture();
    let cfg = load(&f, &base(&f, "mean-teacher"), &["data.retain_overflow=\"chunk-exact\"", "data.forget_overflow=\"chunk\""]).unwrap();
    assert_eq!((cfg.data.forget_overflow, cfg.data.retain_overflow), (Overflow::Chunk, Overflow::ChunkExact));
    assert!(cfg.to_toml().contains("retain_overflow = \"chunk-exact\""), "{}", cfg.to_toml());
    let again = load(&f, &cfg.to_toml(), &[]).unwrap();
    assert_eq!(again.data.retain_overflow, Overflow::ChunkExact);
    // Defaults: forget text truncated, retain text chunked with its tails.
    let cfg = load(&f, &base(&f, "mean-teacher"), &[]).unwrap();
    assert_eq!((cfg.data.forget_overflow, cfg.data.retain_overflow), (Overflow::Truncate, Overflow::Chunk));
}

#[test]
fn a_global_clip_is_refused_for_a_method_that_clips_itself() {
    let f = fixture();
    // Mean teacher clips its own update and scales its EMA rate by the same factor (issue 14).
    expect_err(&f, &base(&f, "mean-teacher"), &["optim.clip_norm=1.0"], &["optim.clip_norm", "mean-teacher", "method.clip"]);
    // Zero is "off", and other methods take a global clip.
    load(&f, &base(&f, "mean-teacher"), &["optim.clip_norm=0"]).unwrap();
    load(&f, &base(&f, "ngdiff"), &["optim.clip_norm=1.0"]).unwrap();
}
