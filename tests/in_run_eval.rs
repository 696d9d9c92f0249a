//! Evaluation inside a run (`[eval]`), the stop rules (`[stop]`) and `best/` on a tiny model:
//! the numbers a run logs at step N are the numbers `unlearn eval` gives for the model of step N
//! (one process and two MPI ranks), and each rule stops the run where its definition says.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tiny::make_tiny;
use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run `unlearn` (under `mpirun -np N` when `np > 1`); panics with its stderr on failure.
fn unlearn(np: usize, args: &[&str]) -> String {
    let mut cmd = if np > 1 {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]).arg(unlearn_bin());
        c
    } else {
        Command::new(unlearn_bin())
    };
    let out = cmd.args(args).env("OMP_NUM_THREADS", "1").output().expect("spawn unlearn");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "unlearn {args:?} (np {np}) failed:\n{err}");
    err
}

/// A GA run on the tiny model that evaluates TOFU forget01 (first 4 questions) every step.
fn write_config(dir: &Path, model: &Path, out: &Path, lr: f64, steps: u64, extra: &str) -> PathBuf {
    let tofu = shared_data().join("tofu");
    write_run_config(
        dir,
        model,
        out,
        lr,
        steps,
        1,
        &format!("[eval.tofu]\nforget = \"forget01\"\ndata = {tofu:?}\nmax_samples = 4\n{extra}"),
    )
}

/// A GA run on the tiny model (TOFU forget01 and retain, 8 records each) that evaluates `evals`
/// (its `[eval.<benchmark>]` tables and any rules) every `every` steps.
fn write_run_config(dir: &Path, model: &Path, out: &Path, lr: f64, steps: u64, every: u64, evals: &str) -> PathBuf {
    let cfg = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    let forget = shared_data().join("tofu/forget01.json");
    let retain = shared_data().join("tofu/retain_perturbed.json");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {model:?}\ntrainable = \"matrices\"\n[data]\nforget = {forget:?}\nretain = {retain:?}\nforget_limit = 8\nretain_limit = 8\n\
             [method]\nname = \"ga\"\n[optim]\nname = \"sgd\"\nlr = {lr}\n\
             [train]\nsteps = {steps}\nbatch_size = 4\nmax_len = 256\nseed = 3\nout_dir = {out:?}\n\
             [eval]\nevery = {every}\nsave_models = true\n{evals}"
        ),
    )
    .unwrap();
    cfg
}

/// metrics.jsonl's lines.
fn lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The raw text of every number the run logged for `step`'s evaluation, by metric, parsed with
/// `str::parse` (correctly rounded, unlike serde_json's default float parsing).
fn logged_eval(out: &Path, step: u64) -> Vec<(String, Option<f64>)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let (line, v) = text
        .lines()
        .map(|l| (l, serde_json::from_str::<Value>(l).unwrap()))
        .find(|(_, v)| v["step"] == step && v.get("eval").is_some())
        .unwrap_or_else(|| panic!("no eval at step {step}"));
    v["eval"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| {
            let at = line.find(&format!("\"{k}\":")).unwrap() + k.len() + 3;
            let raw = &line[at..at + line[at..].find([',', '}']).unwrap()];
            (k.clone(), if raw == "null" { None } else { Some(raw.parse().unwrap()) })
        })
        .collect()
}

/// `report.json`'s value of `key`, from its text.
fn report_value(text: &str, key: &str) -> Option<f64> {
    let block = &text[text.find(&format!("\"{key}\": {{")).unwrap_or_else(|| panic!("{key} not in the report"))..];
    let at = block.find("\"value\": ").unwrap() + 9;
    let raw = &block[at..at + block[at..].find([',', '\n']).unwrap()];
    if raw == "null" {
        None
    } else {
        Some(raw.parse().unwrap())
    }
}

fn eval_values(out: &Path, step: u64) -> Vec<(String, f64)> {
    logged_eval(out, step).into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn stop_line(out: &Path) -> Value {
    let all = lines(out);
    let stops: Vec<&Value> = all.iter().filter(|l| l.get("stop").is_some()).collect();
    assert_eq!(stops.len(), 1, "exactly one stop line");
    stops[0]["stop"].clone()
}

fn final_outcome(out: &Path) -> Value {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("final/record.json")).unwrap()).unwrap();
    r["outcome"].clone()
}

#[test]
fn in_run_numbers_equal_unlearn_eval_on_the_saved_model_np1_and_np2() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 7);
    let retain = make_tiny(&tmp.path().join("retain"), 8);
    let tofu = shared_data().join("tofu");
    // Every TOFU part (generation and ROUGE too), Forget Quality against a retain model measured in the run.
    let extra = format!("retain_model = {retain:?}\nmax_new_tokens = 8\n");
    let mut in_run: Vec<Vec<(String, f64)>> = vec![];
    for np in [1, 2] {
        let out = tmp.path().join(format!("run-np{np}"));
        let cfg = write_config(tmp.path(), &model, &out, 0.5, 2, &extra);
        unlearn(np, &["run", "--config", s(&cfg)]);
        for step in [0u64, 2] {
            let logged = logged_eval(&out, step);
            assert!(logged.iter().any(|(k, v)| k == "tofu.forget_quality" && v.is_some()), "forget quality logged");
            assert!(logged.iter().any(|(k, v)| k == "tofu.model_utility" && v.is_some()), "model utility logged");
            let dir = out.join(format!("evals/step-{step}"));
            let ev = tmp.path().join(format!("eval-np{np}-{step}"));
            unlearn(
                np,
                &[
                    "eval",
                    "tofu",
                    "--model",
                    s(&dir),
                    "--out",
                    s(&ev),
                    "--forget",
                    "forget01",
                    "--data",
                    s(&tofu),
                    "--max-samples",
                    "4",
                    "--retain-model",
                    s(&retain),
                    "--max-new-tokens",
                    "8",
                    "--device",
                    "cpu",
                ],
            );
            let report = std::fs::read_to_string(ev.join("report.json")).unwrap();
            for (k, v) in &logged {
                let theirs = report_value(&report, k.strip_prefix("tofu.").unwrap());
                assert_eq!(v.map(f64::to_bits), theirs.map(f64::to_bits), "np {np} step {step} {k}: in run {v:?}, unlearn eval {theirs:?}");
            }
            println!("np {np} step {step}: {} metrics equal to unlearn eval bit for bit", logged.len());
        }
        assert_eq!(weights(&out.join("evals/step-2")), weights(&out.join("final")), "final/ is the state of the last step");
        in_run.push(eval_values(&out, 2));
    }
    let max_diff = in_run[0].iter().zip(&in_run[1]).map(|((k1, a), (k2, b))| {
        assert_eq!(k1, k2);
        (a - b).abs()
    });
    println!("np=1 vs np=2 in-run metrics at step 2: max |diff| = {:.3e}", max_diff.fold(0.0, f64::max));
}

/// One run without rules gives the trajectory; each rule is then set to fire at a known step.
#[test]
fn stop_rules_fire_where_defined_and_best_is_the_named_state() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 7);
    let tofu = shared_data().join("tofu");
    let cheap = "sets = [\"forget\", \"retain\"]\nno_rouge = true\n";
    let base = tmp.path().join("base");
    unlearn(1, &["run", "--config", s(&write_config(tmp.path(), &model, &base, 2.0, 6, cheap))]);
    let traj =
        |m: &str| -> Vec<f64> { (0..=6).map(|step| eval_values(&base, step).into_iter().find(|(k, _)| k == m).unwrap().1).collect() };
    let (fprob, rprob) = (traj("tofu.forget_prob"), traj("tofu.retain_prob"));
    println!("forget_prob by step: {fprob:?}\nretain_prob by step: {rprob:?}");
    assert_eq!(stop_line(&base)["rule"], "max_steps");
    assert!(fprob.windows(2).all(|w| w[1] < w[0]), "gradient ascent lowers the forget probability every step");
    assert!(rprob[3] < rprob[2] && rprob[2] < rprob[0], "and the retain probability with it");

    // Threshold: the first evaluation below a value between steps 2 and 3 is step 3.
    let out = tmp.path().join("threshold");
    let limit = (fprob[2] + fprob[3]) / 2.0;
    unlearn(
        1,
        &[
            "run",
            "--config",
            s(&write_config(tmp.path(), &model, &out, 2.0, 6, &format!("{cheap}[stop]\nbelow = {{ \"tofu.forget_prob\" = {limit} }}\n"))),
        ],
    );
    let stop = stop_line(&out);
    assert_eq!((stop["rule"].as_str(), stop["step"].as_u64()), (Some("threshold"), Some(3)), "{stop}");
    assert!(lines(&out).iter().all(|l| l["step"].as_u64().unwrap() <= 3), "no step after the rule fired");
    assert_eq!(final_outcome(&out)["stop"]["rule"], "threshold");
    assert_eq!(weights(&out.join("final")), weights(&base.join("evals/step-3")), "final/ is the state at the stop");

    // Reach the retain model: the "retain model" here is the state of step 2 (evaluated by
    // `unlearn eval`), so the run is closest at step 2 and, with patience 2, stops at step 4;
    // best/ is step 2's model.
    let reference = tmp.path().join("reference");
    unlearn(
        1,
        &[
            "eval",
            "tofu",
            "--model",
            s(&base.join("evals/step-2")),
            "--out",
            s(&reference),
            "--forget",
            "forget01",
            "--data",
            s(&tofu),
            "--max-samples",
            "4",
            "--sets",
            "forget,retain",
            "--no-rouge",
            "--device",
            "cpu",
        ],
    );
    // `unlearn report` plots the in-run evaluation next to the training curves.
    let report = tmp.path().join("report");
    unlearn(1, &["report", "--reports", s(&reference), "--runs", s(&base), "--out", s(&report)]);
    let svg = std::fs::read_to_string(report.join("training_0_base.svg")).unwrap();
    assert!(svg.contains("in-run evaluation") && svg.contains("eval/tofu.forget_prob"), "the report plots the in-run metrics");

    let out = tmp.path().join("reach");
    let rules = format!("{cheap}[stop]\nreach = \"tofu.forget_prob\"\nreference = {:?}\npatience = 2\n", reference.join("report.json"));
    unlearn(1, &["run", "--config", s(&write_config(tmp.path(), &model, &out, 2.0, 6, &rules))]);
    let stop = stop_line(&out);
    assert_eq!((stop["rule"].as_str(), stop["step"].as_u64()), (Some("reach_retain"), Some(4)), "{stop}");
    assert!(stop["detail"].as_str().unwrap().contains("step 2"), "{stop}");
    let outcome = final_outcome(&out);
    assert_eq!(outcome["best_step"], 2);
    assert_eq!(weights(&out.join("best")), weights(&base.join("evals/step-2")), "best/ is the closest state");
    let best_record: Value = serde_json::from_str(&std::fs::read_to_string(out.join("best/record.json")).unwrap()).unwrap();
    assert_eq!(best_record["outcome"]["best_step"], 2);
    assert!(out.join("best/config.json").is_file() && out.join("best/tokenizer.json").is_file() && out.join("best/README.md").is_file());

    // Best rule with a guard: the lowest forget probability among the states whose retain
    // probability stays at or above a ratio of step 0's between steps 2 and 3 is step 2.
    let out = tmp.path().join("best-guard");
    let ratio = (rprob[2] + rprob[3]) / 2.0 / rprob[0];
    let rules =
        format!("{cheap}[best]\nmetric = \"tofu.forget_prob\"\nmode = \"min\"\nguard = \"tofu.retain_prob\"\nguard_ratio = {ratio}\n");
    unlearn(1, &["run", "--config", s(&write_config(tmp.path(), &model, &out, 2.0, 4, &rules))]);
    assert_eq!(final_outcome(&out)["best_step"], 2);
    assert_eq!(weights(&out.join("best")), weights(&base.join("evals/step-2")));

    // Utility floor: the retain probability falls below the same ratio at step 3; the run stops
    // there and final/ keeps the last good state, step 2.
    let out = tmp.path().join("floor");
    let rules = format!("{cheap}[stop]\nutility = \"tofu.retain_prob\"\nutility_floor = {ratio}\n");
    unlearn(1, &["run", "--config", s(&write_config(tmp.path(), &model, &out, 2.0, 6, &rules))]);
    let stop = stop_line(&out);
    assert_eq!(
        (stop["rule"].as_str(), stop["step"].as_u64(), stop["restored_step"].as_u64()),
        (Some("utility_floor"), Some(3), Some(2)),
        "{stop}"
    );
    assert_eq!(final_outcome(&out)["final_step"], 2);
    assert_eq!(weights(&out.join("final")), weights(&base.join("evals/step-2")), "final/ is the last good state");
}

#[test]
fn bad_rules_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 7);
    let out = tmp.path().join("bad");
    for (extra, key, words) in [
        ("max_samplez = 3\n", "eval.tofu", "max-samplez"),
        ("[stop]\nbelow = { \"muse.verbmem_f\" = 21.8 }\n", "stop.below", "muse.verbmem_f"),
        ("[stop]\nreach = \"tofu.forget_prob\"\n", "stop.reach", "stop.reference"),
        ("[best]\nmetric = \"tofu.forget_quality\"\nmode = \"highest\"\n", "best.mode", "allowed: max, min, reach"),
        ("model = \"x\"\n", "eval.tofu.model", "the run's own"),
    ] {
        let cfg = write_config(tmp.path(), &model, &out, 0.1, 2, extra);
        let (ok, _, err) = run_unlearn(&["run", "--config", s(&cfg)]);
        assert!(!ok, "{extra} accepted");
        assert!(err.contains(key) && err.contains(words), "{extra}: error does not name `{key}` / `{words}`:\n{err}");
        assert!(!out.exists(), "nothing written for a bad config");
    }
}

/// `[eval.nll]` (plus `extra` keys): the forget records the run trains on and a held-out retain
/// slice, records 8..14 of the retain file whose first 8 the run trains on.
fn nll_table(extra: &str) -> String {
    let (forget, retain) = (shared_data().join("tofu/forget01.json"), shared_data().join("tofu/retain_perturbed.json"));
    format!("[eval.nll]\nforget = {forget:?}\nretain = {retain:?}\nretain_offset = 8\nmax_samples = 6\nmax_len = 128\n{extra}")
}

/// In-run values at `step` (`bench.metric`) against `unlearn eval <bench> <args>` on the model saved at that step, bit for bit.
fn assert_equal_to_unlearn_eval(np: usize, out: &Path, step: u64, bench: &str, args: &[&str], ev: &Path) -> usize {
    let logged = logged_eval(out, step);
    assert!(logged.iter().all(|(_, v)| v.is_some_and(f64::is_finite)), "step {step}: every logged {bench} metric is a number: {logged:?}");
    let dir = out.join(format!("evals/step-{step}"));
    let mut all = vec!["eval", bench, "--model", s(&dir), "--out", s(ev), "--device", "cpu"];
    all.extend(args);
    unlearn(np, &all);
    let report = std::fs::read_to_string(ev.join("report.json")).unwrap();
    for (k, v) in &logged {
        let theirs = report_value(&report, k.strip_prefix(&format!("{bench}.")).unwrap());
        assert_eq!(v.map(f64::to_bits), theirs.map(f64::to_bits), "np {np} step {step} {k}: in run {v:?}, unlearn eval {theirs:?}");
    }
    logged.len()
}

#[test]
fn in_run_nll_equals_unlearn_eval_nll_np1_and_np2_and_reach_fires_on_forget_nll() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 7);
    let (forget, retain) = (shared_data().join("tofu/forget01.json"), shared_data().join("tofu/retain_perturbed.json"));
    let args = ["--forget", s(&forget), "--retain", s(&retain), "--retain-offset", "8", "--max-samples", "6", "--max-len", "128"];
    for np in [1, 2] {
        let out = tmp.path().join(format!("run-np{np}"));
        unlearn(np, &["run", "--config", s(&write_run_config(tmp.path(), &model, &out, 2.0, 4, 1, &nll_table("")))]);
        for step in [0u64, 4] {
            let n = assert_equal_to_unlearn_eval(np, &out, step, "nll", &args, &tmp.path().join(format!("eval-np{np}-{step}")));
            assert_eq!(n, 2, "forget_nll and retain_nll logged");
            println!("np {np} step {step}: nll.forget_nll and nll.retain_nll equal to unlearn eval nll bit for bit");
        }
        let f: Vec<f64> = (0..=4).map(|step| eval_values(&out, step).into_iter().find(|(k, _)| k == "nll.forget_nll").unwrap().1).collect();
        println!("np {np}: forget_nll by step {f:?}");
        assert!(f[4] > f[0], "gradient ascent raises the forget NLL");
    }

    // Reach the retain model measured in the run: the "retain model" is the np=1 run's state of
    // step 2, so the run is closest there (distance 0) and, with patience 2, stops at step 4,
    // with best/ = step 2's model.
    let base = tmp.path().join("run-np1");
    let out = tmp.path().join("reach");
    let table = nll_table(&format!("retain_model = {:?}\n", base.join("evals/step-2")));
    let cfg = write_run_config(tmp.path(), &model, &out, 2.0, 8, 1, &format!("{table}[stop]\nreach = \"nll.forget_nll\"\npatience = 2\n"));
    unlearn(1, &["run", "--config", s(&cfg)]);
    let stop = stop_line(&out);
    assert_eq!((stop["rule"].as_str(), stop["step"].as_u64()), (Some("reach_retain"), Some(4)), "{stop}");
    assert!(stop["detail"].as_str().unwrap().contains("step 2") && stop["detail"].as_str().unwrap().contains("= 0.0000"), "{stop}");
    assert_eq!(final_outcome(&out)["best_step"], 2);
    assert_eq!(weights(&out.join("best")), weights(&base.join("evals/step-2")), "best/ is the state the retain model is");
    assert!(lines(&out).iter().all(|l| l["step"].as_u64().unwrap() <= 4), "no step after the rule fired");
}

#[test]
fn in_run_muse_equals_unlearn_eval_muse_on_the_saved_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 7);
    let news = shared_data().join("muse/news");
    // Every MUSE part with data here (no MMLU subsample in the shared data), cut to the tiny model's 256 positions.
    let table = format!(
        "[eval.muse]\ndata = {news:?}\nparts = [\"verbmem\", \"knowmem-f\", \"knowmem-r\", \"privleak\"]\nmax_samples = 2\n\
         max_new_tokens_verbmem = 8\nmax_new_tokens_knowmem = 8\nmax_prompt_tokens = 96\nmax_text_tokens = 96\n"
    );
    let out = tmp.path().join("run");
    unlearn(1, &["run", "--config", s(&write_run_config(tmp.path(), &model, &out, 2.0, 2, 2, &table))]);
    let args = [
        "--data",
        s(&news),
        "--parts",
        "verbmem,knowmem-f,knowmem-r,privleak",
        "--max-samples",
        "2",
        "--max-new-tokens-verbmem",
        "8",
        "--max-new-tokens-knowmem",
        "8",
        "--max-prompt-tokens",
        "96",
        "--max-text-tokens",
        "96",
    ];
    for step in [0u64, 2] {
        let n = assert_equal_to_unlearn_eval(1, &out, step, "muse", &args, &tmp.path().join(format!("eval-{step}")));
        assert!(n >= 5, "verbmem_f, knowmem_f, knowmem_r, privleak_auc, privleak logged ({n})");
        println!("step {step}: {n} MUSE metrics equal to unlearn eval muse bit for bit");
    }
    assert_ne!(eval_values(&out, 0), eval_values(&out, 2), "the evaluated states differ");
}
