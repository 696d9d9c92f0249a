//! `unlearn eval muse|tofu` and `unlearn report` end to end on tiny models over the shared data:
//! every per-sample ROUGE, loss, Min-K score, prompt, reference and (for the first samples)
//! generation is recomputed by tests/py/eval_ref.py with transformers / rouge_score, every
//! aggregate with numpy / scipy / scikit-learn; `mpirun -np 2` must give the same numbers as one
//! process; bad inputs must fail with a message naming the file and leave no output behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

/// Models shared by the tests: `target` memorized a few evaluation items (so ROUGE, accuracy and
/// probabilities are not noise), `retain` is a random model with the same tokenizer, `other_tok`
/// one with a different tokenizer.
struct Models {
    _dir: tempfile::TempDir,
    target: PathBuf,
    retain: PathBuf,
    other_tok: PathBuf,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = make_tiny_model(&dir.path().join("base"), "{}", 1, "sentencepiece");
        let retain = make_tiny_model(&dir.path().join("retain"), "{}", 2, "sentencepiece");
        let other_tok = make_tiny_model(&dir.path().join("bytebpe"), "{}", 3, "bytebpe");
        let target = dir.path().join("target");
        run_py("eval_ref.py", &["overfit", "--model", s(&base), "--out", s(&target), "--steps", "300", "--prompt-tokens", "64"]);
        Models { _dir: dir, target, retain, other_tok }
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run `unlearn` (optionally under `mpirun -np N`) with one BLAS thread per rank, so that one and
/// several ranks do bit-identical arithmetic. Returns (success, stderr).
fn unlearn(ranks: usize, args: &[&str]) -> (bool, String) {
    let mut cmd = if ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &ranks.to_string(), "-x", "OMP_NUM_THREADS=1"]);
        c.arg(unlearn_bin());
        c
    } else {
        Command::new(unlearn_bin())
    };
    let out = cmd.args(args).env("OMP_NUM_THREADS", "1").output().expect("spawn unlearn");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ok(ranks: usize, args: &[&str]) {
    let (success, err) = unlearn(ranks, args);
    assert!(success, "unlearn {args:?} failed:\n{err}");
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn metric(r: &Value, key: &str) -> f64 {
    r["metrics"][key]["value"].as_f64().unwrap_or_else(|| panic!("metric {key} missing or null in {r}"))
}

/// Same metric keys and bit-identical values, and identical per-sample outputs.
fn assert_same_results(a: &Path, b: &Path) {
    let (ra, rb) = (report(a), report(b));
    assert_eq!(ra["metrics"], rb["metrics"], "report.json metrics differ between {} and {}", a.display(), b.display());
    let (sa, sb) = (std::fs::read_to_string(a.join("samples.jsonl")).unwrap(), std::fs::read_to_string(b.join("samples.jsonl")).unwrap());
    assert_eq!(sa, sb, "samples.jsonl differ");
}

fn check(script_cmd: &str, args: &[&str]) -> Value {
    let mut all = vec![script_cmd];
    all.extend_from_slice(args);
    let out = run_py("eval_ref.py", &all);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn tofu_data() -> PathBuf {
    shared_data().join("tofu")
}

fn muse_data(corpus: &str) -> PathBuf {
    shared_data().join("muse").join(corpus)
}

const TOFU_LIMITS: &[&str] = &[
    "--forget",
    "forget01",
    "--max-samples",
    "7",
    "--max-new-tokens",
    "32",
    "--batch-size",
    "3",
    "--gen-batch-size",
    "3",
    "--device",
    "cpu",
];

#[test]
fn tofu_eval_recomputes_with_references_and_is_the_same_on_two_ranks() {
    let m = models();
    let tmp = tempfile::tempdir().unwrap();
    let data = tofu_data();
    let (retain_out, one, two, via_stats) =
        (tmp.path().join("retain"), tmp.path().join("np1"), tmp.path().join("np2"), tmp.path().join("stats"));
    let common = |model: &Path, out: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            ["eval", "tofu", "--model", s(model), "--out", s(out), "--data", s(&data)].iter().map(|x| x.to_string()).collect();
        v.extend(TOFU_LIMITS.iter().map(|x| x.to_string()));
        v
    };
    run_args(1, &common(&m.retain, &retain_out));
    let with = |mut v: Vec<String>, extra: [&str; 2]| {
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    run_args(1, &with(common(&m.target, &one), ["--retain-model", s(&m.retain)]));
    run_args(2, &with(common(&m.target, &two), ["--retain-model", s(&m.retain)]));
    run_args(1, &with(common(&m.target, &via_stats), ["--retain-stats", s(&retain_out)]));

    // Two ranks = one rank, and the saved retain statistics = the retain model evaluated in-run.
    assert_same_results(&one, &two);
    assert_eq!(report(&two)["run"]["ranks"], 2);
    assert_eq!(metric(&report(&one), "forget_quality"), metric(&report(&via_stats), "forget_quality"));

    let v = check(
        "check-tofu",
        &["--run", s(&one), "--model", s(&m.target), "--data", s(&data), "--retain-run", s(&retain_out), "--n-gen", "2", "--n-nll", "3"],
    );
    eprintln!("check-tofu: {v}");
    assert_eq!(num(&v, "prompt_mismatch"), 0.0);
    assert_eq!(num(&v, "rouge_max_diff"), 0.0, "ROUGE-L recall vs rouge_score");
    assert!(num(&v, "nll_max_diff") < 1e-4, "answer NLLs vs transformers");
    assert!(num(&v, "nll_checked") >= 40.0);
    assert_eq!(num(&v, "gen_mismatch"), 0.0, "greedy answers vs transformers generate");
    assert_eq!(num(&v, "gen_checked"), 8.0);
    assert!(num(&v, "agg_max_rel_diff") < 1e-12, "aggregates vs numpy/scipy");
    assert_eq!(v["agg_checked"].as_array().unwrap().len(), 14, "all 14 numbers checked: {v}");
    assert!(num(&v, "forget_stats_max_rel_diff") < 1e-12);
    // The memorizing model gives non-trivial numbers, so the checks above compare real values.
    let vals = &v["values"];
    assert!(vals["real_authors_rouge"].as_f64().unwrap() > 0.0 && vals["model_utility"].as_f64().unwrap() > 0.0, "{vals}");
    // Files a person reads.
    let md = std::fs::read_to_string(one.join("report.md")).unwrap();
    assert!(md.contains("| forget_quality |") && md.contains("| model_utility |"), "{md}");
    let svg = std::fs::read_to_string(one.join("metrics.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("model_utility"));
}

fn muse_args(model: &Path, out: &Path, corpus: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "eval",
        "muse",
        "--model",
        s(model),
        "--out",
        s(out),
        "--data",
        s(&muse_data(corpus)),
        "--max-samples",
        "5",
        "--max-new-tokens-verbmem",
        "16",
        "--max-new-tokens-knowmem",
        "16",
        "--max-prompt-tokens",
        "64",
        "--max-text-tokens",
        "200",
        "--batch-size",
        "2",
        "--gen-batch-size",
        "2",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run_args(ranks: usize, v: &[String]) {
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    ok(ranks, &args);
}

#[test]
fn muse_eval_recomputes_with_references_and_is_the_same_on_two_ranks() {
    let m = models();
    let tmp = tempfile::tempdir().unwrap();
    let (retain_out, one, two) = (tmp.path().join("retain"), tmp.path().join("np1"), tmp.path().join("np2"));
    run_args(1, &muse_args(&m.retain, &retain_out, "news", &["--parts", "privleak"]));
    run_args(1, &muse_args(&m.target, &one, "news", &["--retain-model", s(&m.retain)]));
    run_args(2, &muse_args(&m.target, &two, "news", &["--retain-model", s(&m.retain)]));
    assert_same_results(&one, &two);

    let r = report(&one);
    // The in-run retain AUC is the AUC a separate evaluation of the retain model reports.
    assert_eq!(r["reference"]["auc_retrain"].as_f64().unwrap(), metric(&report(&retain_out), "privleak_auc"));
    let v = check(
        "check-muse",
        &[
            "--run",
            s(&one),
            "--model",
            s(&m.target),
            "--data",
            s(&muse_data("news")),
            "--mmlu",
            s(&shared_data().join("muse/mmlu_subsample")),
            "--retain-run",
            s(&retain_out),
            "--n-gen",
            "2",
            "--n-nll",
            "3",
        ],
    );
    eprintln!("check-muse: {v}");
    assert_eq!(num(&v, "prompt_mismatch"), 0.0, "prompts rebuilt from the data files");
    assert_eq!(num(&v, "reference_mismatch"), 0.0, "VerbMem gt[:N tokens] via the HF tokenizer");
    assert_eq!(num(&v, "rouge_max_diff"), 0.0, "ROUGE-L F1 vs rouge_score");
    assert_eq!(num(&v, "gen_mismatch"), 0.0, "generations vs transformers generate + stop strings");
    assert_eq!(num(&v, "gen_checked"), 8.0);
    assert!(num(&v, "mink_max_diff") < 1e-4, "Min-40% vs transformers log-probs");
    assert_eq!(num(&v, "mink_checked"), 6.0);
    assert!(num(&v, "agg_max_rel_diff") < 1e-12, "aggregates vs numpy / sklearn");
    let checked: Vec<&str> = v["agg_checked"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    for k in ["verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc", "privleak", "mmlu"] {
        assert!(checked.contains(&k), "{k} not checked: {v}");
    }
    let vals = &v["values"];
    assert!(
        vals["verbmem_f"].as_f64().unwrap() > 0.0 && vals["knowmem_r"].as_f64().unwrap() > 0.0 && vals["mmlu"].as_f64().unwrap() > 0.0,
        "{vals}"
    );
}

#[test]
fn muse_books_skips_absent_parts_and_open_unlearning_variant_recomputes() {
    let m = models();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("books");
    run_args(
        1,
        &muse_args(&m.target, &out, "books", &["--variant", "open-unlearning", "--mmlu", s(&shared_data().join("muse/mmlu_subsample"))]),
    );
    let r = report(&out);
    let notes = r["notes"].to_string();
    assert!(notes.contains("verbmem skipped") && notes.contains("verbmem/forget.json"), "{notes}");
    assert!(notes.contains("privleak skipped"), "{notes}");
    assert!(r["metrics"].get("verbmem_f").is_none() && r["metrics"].get("knowmem_f").is_some());
    assert!(r["metrics"]["knowmem_f"]["definition"].as_str().unwrap().contains("with stemmer"));
    let v = check(
        "check-muse",
        &[
            "--run",
            s(&out),
            "--model",
            s(&m.target),
            "--data",
            s(&muse_data("books")),
            "--mmlu",
            s(&shared_data().join("muse/mmlu_subsample")),
        ],
    );
    eprintln!("check-muse books: {v}");
    assert_eq!(num(&v, "prompt_mismatch") + num(&v, "reference_mismatch") + num(&v, "gen_mismatch"), 0.0);
    assert_eq!(num(&v, "rouge_max_diff"), 0.0);
    assert!(num(&v, "agg_max_rel_diff") < 1e-12);
    assert_eq!(v["agg_checked"].as_array().unwrap().len(), 3, "{v}");
}

/// Copy the TOFU evaluation files into a scratch data directory that a test may break.
fn scratch_tofu(dir: &Path) -> PathBuf {
    let d = dir.join("tofu");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["forget01_perturbed.json", "retain_perturbed.json", "real_authors_perturbed.json", "world_facts_perturbed.json"] {
        std::fs::copy(tofu_data().join(f), d.join(f)).unwrap();
    }
    d
}

/// The command fails, its message contains every `needles`, and `out` still holds exactly what
/// it held before (here: the report.json of an earlier evaluation, which `--out` may replace).
fn assert_fails_cleanly(args: &[&str], out: &Path, needles: &[&str]) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("report.json"), "before").unwrap();
    let (success, err) = unlearn(1, args);
    assert!(!success, "expected failure for {args:?}");
    for n in needles {
        assert!(err.contains(n), "error for {args:?} should mention {n:?}:\n{err}");
    }
    let entries: Vec<_> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("report.json")], "partial outputs left in {}", out.display());
    assert_eq!(std::fs::read_to_string(out.join("report.json")).unwrap(), "before", "the earlier output was replaced");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary output left behind: {leftovers:?}");
}

#[test]
fn bad_inputs_fail_naming_the_file_and_leave_no_outputs() {
    let m = models();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let tofu = |data: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "eval",
            "tofu",
            "--model",
            s(&m.target),
            "--out",
            s(&out),
            "--data",
            s(data),
            "--max-samples",
            "2",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let fails = |v: Vec<String>, needles: &[&str]| {
        let args: Vec<&str> = v.iter().map(String::as_str).collect();
        assert_fails_cleanly(&args, &out, needles);
    };

    // Missing split file.
    fails(tofu(&tofu_data(), &["--forget", "forget07"]), &["forget07_perturbed.json", "file not found"]);
    // A MUSE part asked for explicitly whose file is absent (Books has no VerbMem).
    fails(muse_args(&m.target, &out, "books", &["--parts", "verbmem"]), &["verbmem/forget.json", "file not found", "verbmem"]);

    // Wrong keys.
    let bad = scratch_tofu(&tmp.path().join("keys"));
    let text = std::fs::read_to_string(bad.join("retain_perturbed.json")).unwrap().replace("\"paraphrased_answer\"", "\"paraphrase\"");
    std::fs::write(bad.join("retain_perturbed.json"), text).unwrap();
    fails(tofu(&bad, &["--forget", "forget01"]), &["retain_perturbed.json", "record 0", "missing key `paraphrased_answer`"]);
    let muse_bad = tmp.path().join("muse_bad");
    std::fs::create_dir_all(muse_bad.join("knowmem")).unwrap();
    for f in ["forget_qa.json", "forget_qa_icl.json"] {
        std::fs::copy(muse_data("news").join("knowmem").join(f), muse_bad.join("knowmem").join(f)).unwrap();
    }
    std::fs::write(muse_bad.join("knowmem/forget_qa_icl.json"), r#"[{"q": "x", "a": "y"}]"#).unwrap();
    let mut v = muse_args(&m.target, &out, "news", &["--parts", "knowmem-f"]);
    let i = v.iter().position(|x| x == "--data").unwrap();
    v[i + 1] = s(&muse_bad).to_string();
    fails(v, &["forget_qa_icl.json", "missing key `question`"]);

    // Empty file.
    let empty = scratch_tofu(&tmp.path().join("empty"));
    std::fs::write(empty.join("world_facts_perturbed.json"), "").unwrap();
    fails(tofu(&empty, &["--forget", "forget01"]), &["world_facts_perturbed.json", "file is empty"]);
    std::fs::write(empty.join("world_facts_perturbed.json"), "[]").unwrap();
    fails(tofu(&empty, &["--forget", "forget01"]), &["world_facts_perturbed.json", "contains no records"]);

    // A retain model with another tokenizer (TOFU and MUSE).
    fails(tofu(&tofu_data(), &["--forget", "forget01", "--retain-model", s(&m.other_tok)]), &["different tokenizer", "bytebpe"]);
    fails(muse_args(&m.target, &out, "news", &["--parts", "privleak", "--retain-model", s(&m.other_tok)]), &["different tokenizer"]);
    // Retain statistics of another forget split.
    let stats_dir = tmp.path().join("stats");
    let mut v = tofu(&tofu_data(), &["--forget", "forget01"]);
    let i = v.iter().position(|x| x == "--out").unwrap();
    v[i + 1] = s(&stats_dir).to_string();
    run_args(1, &v);
    fails(tofu(&tofu_data(), &["--forget", "forget05", "--retain-stats", s(&stats_dir)]), &["report.json", "forget01", "forget05"]);
}

#[test]
fn report_command_compares_evaluations_and_plots_training_curves() {
    let m = models();
    let tmp = tempfile::tempdir().unwrap();
    let (before, after, out) = (tmp.path().join("before"), tmp.path().join("after"), tmp.path().join("report"));
    let data = tofu_data();
    for (model, dir, compare) in [(&m.retain, &before, None), (&m.target, &after, Some(&before))] {
        let mut v: Vec<&str> = vec!["eval", "tofu", "--model", s(model), "--out", s(dir), "--data", s(&data)];
        v.extend(["--forget", "forget01", "--max-samples", "3", "--max-new-tokens", "8", "--device", "cpu"]);
        if let Some(c) = compare {
            v.extend(["--compare", s(c)]);
        }
        ok(1, &v);
    }
    // `eval --compare` puts the earlier report first (before/after table).
    let md = std::fs::read_to_string(after.join("report.md")).unwrap();
    assert!(md.contains("| metric | retain | target | change | better |"), "{md}");
    // A training run's metrics.jsonl in the layout `unlearn run` writes.
    let run = tmp.path().join("run_ngdiff");
    std::fs::create_dir_all(&run).unwrap();
    let lines: Vec<String> = (1..=12)
        .map(|step| {
            let x = step as f64;
            format!(
                r#"{{"step":{step},"loss_forget":{},"loss_retain":{},"grad_norm_forget":{},"grad_norm_retain":{},"lr":1e-5,"clip":1.0,"tokens_per_s":100.0,"elapsed_s":{x}}}"#,
                2.0 + 0.3 * x,
                1.5 - 0.01 * x,
                10f64.powf(x / 4.0),
                0.5 + 0.01 * x
            )
        })
        .collect();
    std::fs::write(run.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    ok(1, &["report", "--reports", s(&before), s(&after), "--names", "retain", "unlearned", "--runs", s(&run), "--out", s(&out)]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| metric | retain | unlearned | change | better |"), "{md}");
    let fq_row = md.lines().find(|l| l.starts_with("| model_utility |")).expect("model_utility row");
    let (a, b) = (metric(&report(&before), "model_utility"), metric(&report(&after), "model_utility"));
    assert!(fq_row.contains(&unlearn::eval::report::fmt_value(Some(b - a))), "{fq_row}");
    let cmp: Value = serde_json::from_str(&std::fs::read_to_string(out.join("comparison.json")).unwrap()).unwrap();
    assert_eq!(cmp["metrics"]["model_utility"]["unlearned"].as_f64().unwrap(), b);
    // Both SVGs are well-formed XML (checked by Python's parser) and carry the series names.
    let svgs = [out.join("metrics.svg"), out.join("training_0_run_ngdiff.svg")];
    for svg in &svgs {
        let text = std::fs::read_to_string(svg).unwrap();
        let parsed = run_py_inline(&format!("import xml.etree.ElementTree as E; E.parse({:?}); print('ok')", s(svg)));
        assert_eq!(parsed.trim(), "ok");
        assert!(text.contains("<svg"));
    }
    let curves = std::fs::read_to_string(&svgs[1]).unwrap();
    for k in ["loss_forget", "grad_norm_retain", "clip"] {
        assert!(curves.contains(k), "training plot lacks {k}");
    }
}

fn run_py_inline(code: &str) -> String {
    let out = Command::new(python()).args(["-c", code]).output().expect("spawn python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
