//! The reproduction record (record.json): `unlearn export` and `unlearn eval` write one, print its
//! hash and the hash of the record they were given; every digest equals `sha256sum` of the file,
//! the versions equal what the Python side of the same installation reports, the commit is the
//! checkout's, and the record of a run (the API the run side uses) carries its config, seed, world
//! size, ZeRO stage and inputs, with a model card built from it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};
use unlearn::config::RunConfig;
use unlearn::record::{self, Input, ModelDigest, Record};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `sha256sum FILE` (coreutils): an implementation independent of ours.
fn sha256sum(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().expect("sha256sum runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The 64-hex hash logged after `label` (e.g. "record written: DIR/record.json sha256 ").
fn logged_hash(log: &str, label: &str) -> String {
    let line = log.lines().find(|l| l.contains(label)).unwrap_or_else(|| panic!("no {label:?} line in:\n{log}"));
    let h = line.rsplit("sha256 ").next().unwrap().trim().to_string();
    assert_eq!(h.len(), 64, "{line}");
    h
}

/// Every file of a digest list equals sha256sum of `dir/name`, and the list names every file
/// of `dir` except `skip`.
fn assert_files_match(dir: &Path, files: &Value, skip: &[&str]) {
    let mut expect: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| !skip.contains(&n.as_str()))
        .collect();
    expect.sort();
    let names: Vec<String> = files.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, expect, "digested files of {}", dir.display());
    for f in files.as_array().unwrap() {
        let p = dir.join(f["name"].as_str().unwrap());
        assert_eq!(f["sha256"].as_str().unwrap(), sha256sum(&p), "{}", p.display());
        assert_eq!(f["bytes"].as_u64().unwrap(), std::fs::metadata(&p).unwrap().len());
    }
}

/// The software section against the Python installation the binary links (same venv).
fn assert_software(sw: &Value) {
    assert_eq!(sw["unlearn"], env!("CARGO_PKG_VERSION"));
    let torch = run_py_code("import torch; print(torch.__version__)");
    assert_eq!(sw["libtorch"].as_str().unwrap(), torch, "libtorch version");
    let git = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(repo()).output().unwrap();
    if git.status.success() {
        // The binary was built from this checkout; a commit made after the build would re-run
        // build.rs at the next build (it watches HEAD and the branch ref).
        assert_eq!(sw["git_commit"].as_str().unwrap(), String::from_utf8_lossy(&git.stdout).trim());
        assert!(sw["git_dirty"].is_boolean(), "git_dirty known in a checkout: {sw}");
    }
}

fn run_py_code(code: &str) -> String {
    let out = Command::new(python()).args(["-c", code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn export_and_eval_write_print_and_chain_records() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), "{}", 5, "sentencepiece");

    // A record shipped with the model, as a run's final/ will carry.
    let given = Record::new("run", json!({"method": {"name": "test"}}), 1).with_inputs(&[Input::Model("model", &model)]).unwrap();
    let given_hash = given.write(&model).unwrap();
    assert_eq!(given_hash, sha256sum(&model.join("record.json")), "the record's hash is sha256sum of record.json");
    assert_eq!(Record::read(&model).unwrap(), given, "record.json reads back unchanged");

    // Export: the record of the export, in the export directory; the weights' digests come from
    // the manifest (not re-read) and equal sha256sum.
    let onnx = tmp.path().join("onnx");
    let (ok, _, err) = run_unlearn(&["export", "--model", s(&model), "--out", s(&onnx)]);
    assert!(ok, "{err}");
    assert_eq!(logged_hash(&err, "record given:"), given_hash);
    let written = logged_hash(&err, "record written:");
    assert_eq!(written, sha256sum(&onnx.join("record.json")));
    let r = read_json(&onnx.join("record.json"));
    assert_eq!(r["format"], "unlearn-record/1");
    assert_eq!(r["kind"], "export");
    assert_eq!(r["config"]["opset"], read_json(&onnx.join("export.json"))["opset"]);
    let src = &r["models"][0];
    assert_eq!(src["role"], "source_model");
    assert_eq!(src["record_sha256"].as_str().unwrap(), given_hash);
    assert_files_match(&model, &src["files"], &["record.json"]);
    assert!(src.get("weights_sha256").is_none(), "weights were not re-read, so no weights_sha256: {src}");
    assert_software(&r["software"]);
    let ort = run_py_code("import onnxruntime; print(onnxruntime.__version__)");
    assert!(r["software"]["onnxruntime"].as_str().unwrap().starts_with(&ort), "onnxruntime {} vs {ort}", r["software"]["onnxruntime"]);
    let leftovers: Vec<String> = std::fs::read_dir(&onnx)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Eval: its own record next to report.json, naming the model, the benchmark data and the
    // record it was given; the report's model hash is the record's weights_sha256 (one read of
    // the weights) and keeps the definition eval reports always had.
    let out = tmp.path().join("eval");
    let data = shared_data().join("tofu");
    let args = [
        "eval",
        "tofu",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--data",
        s(&data),
        "--forget",
        "forget01",
        "--max-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ];
    let (ok, _, err) = run_unlearn(&args);
    assert!(ok, "{err}");
    assert_eq!(logged_hash(&err, "record given:"), given_hash);
    let written = logged_hash(&err, "record written:");
    assert_eq!(written, sha256sum(&out.join("record.json")));
    let r = read_json(&out.join("record.json"));
    assert_eq!((r["kind"].as_str(), r["world_size"].as_u64(), r["metric_variant"].as_str()), (Some("eval"), Some(1), Some("tofu")));
    assert_eq!(r["config"]["limits"]["max_samples"], json!(2), "eval options are recorded: {}", r["config"]);
    let m = &r["models"][0];
    assert_eq!((m["role"].as_str(), m["record_sha256"].as_str()), (Some("model"), Some(given_hash.as_str())));
    assert_files_match(&model, &m["files"], &["record.json"]);
    let report = read_json(&out.join("report.json"));
    assert_eq!(m["weights_sha256"], report["model"]["sha256"]);
    assert_eq!(report["model"]["sha256"].as_str().unwrap(), unlearn::eval::report::model_sha256(&model).unwrap());
    let bench = &r["data"][0];
    assert_eq!(bench["role"], "benchmark");
    assert_files_match(&data, &bench["files"], &[]);
    assert_software(&r["software"]);
    println!(
        "export record {written}; eval record: {} models, {} data files",
        r["models"].as_array().unwrap().len(),
        bench["files"].as_array().unwrap().len()
    );
}

#[test]
fn run_record_and_model_card() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), "{}", 6, "bytebpe");
    let forget = shared_data().join("tofu/forget01.json");
    let retain = shared_data().join("tofu/retain99.json");
    let toml = format!(
        "[model]\npath = {:?}\ntrainable = \"all\"\n[data]\nforget = {:?}\nretain = {:?}\n[method]\nname = \"graddiff\"\n\
         [optim]\nname = \"adamw\"\nlr = 1e-5\n[train]\nsteps = 3\nbatch_size = 4\nseed = 17\nout_dir = {:?}\n[dist]\nzero = 1\n",
        s(&model),
        s(&forget),
        s(&retain),
        s(&tmp.path().join("run"))
    );
    let cfg_path = tmp.path().join("c.toml");
    std::fs::write(&cfg_path, toml).unwrap();
    let cfg = RunConfig::load(&cfg_path, &["train.steps=5".into()]).unwrap();
    let rec = Record::for_run(&cfg, 4).unwrap();
    assert_eq!(rec.seeds.get("train.seed"), Some(&17));
    assert_eq!((rec.world_size, rec.zero_stage, rec.kind.as_str()), (4, Some(1), "run"));
    // The config is the resolved one: --set applied, defaults explicit, equal to config.toml.
    assert_eq!(rec.config["train"]["steps"], json!(5));
    let resolved: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    assert_eq!(rec.config, serde_json::to_value(resolved).unwrap());
    let roles: Vec<(&str, &str)> = rec.data.iter().map(|d| (d.role.as_str(), d.path.as_str())).collect();
    assert_eq!(roles, [("forget", s(&forget)), ("retain", s(&retain))]);
    assert_eq!(rec.data[0].files[0].sha256, sha256sum(&forget));
    assert_eq!(rec.data[1].files[0].sha256, sha256sum(&retain));
    assert_eq!(rec.weights_sha256("model").unwrap(), unlearn::eval::report::model_sha256(&model).unwrap());

    let out = tmp.path().join("final");
    std::fs::create_dir_all(&out).unwrap();
    let h = rec.write(&out).unwrap();
    assert_eq!(h, rec.sha256());
    let table = "| metric | value |\n|---|---|\n| forget_quality | 0.5 |\n";
    record::write_model_card(&out, &rec, Some(table)).unwrap();
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "graddiff unlearning of",
        s(&forget),
        s(&retain),
        "| forget_quality | 0.5 |",
        &h,
        "train.seed = 17",
        "4 rank(s), ZeRO stage 1",
        "5 steps",
    ] {
        assert!(card.contains(needle), "model card lacks {needle:?}:\n{card}");
    }
    // The card and the record are not model files: a model directory's digest ignores them.
    let d = ModelDigest::of("model", &out.join(".."), &[]);
    assert!(d.is_err(), "a directory without config.json is refused");
    std::fs::copy(model.join("config.json"), out.join("config.json")).unwrap();
    let names: Vec<String> = ModelDigest::of("model", &out, &[]).unwrap().files.into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["config.json"]);
    println!("run record {h}; model card {} bytes", card.len());
}

/// What a record costs on the demo model: one streamed read of the 538 MB safetensors file.
#[test]
fn hashing_the_demo_model_reads_each_file_once() {
    let smol = cache_dir().join("models/smollm2-135m-instruct");
    assert!(smol.join("model.safetensors").exists(), "no demo model at {} (launch/setup.sh imports it)", smol.display());
    let t = std::time::Instant::now();
    let d = ModelDigest::of("model", &smol, &[]).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let bytes: u64 = d.files.iter().map(|f| f.bytes).sum();
    let weights = d.files.iter().find(|f| f.name == "model.safetensors").unwrap();
    assert_eq!(weights.sha256, sha256sum(&smol.join("model.safetensors")));
    assert_eq!(d.weights_sha256.as_deref().unwrap(), unlearn::eval::report::model_sha256(&smol).unwrap());
    println!(
        "SmolLM2-135M: {} files, {:.0} MB hashed in {secs:.2} s ({:.0} MB/s; shared machine, noisy)",
        d.files.len(),
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
}
