//! `unlearn eval nll`: the forget and retain NLL of slices of data files, recomputed by
//! transformers (tests/py/hf_ref.py `score`, one sample at a time, no padding), identical under two
//! MPI ranks, with the retain model's values measured on the same slices.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `unlearn eval nll` (under `mpirun -np N` when `np > 1`): (success, stderr).
fn eval_nll(np: usize, args: &[&str]) -> (bool, String) {
    let mut cmd = if np > 1 {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]).arg(unlearn_bin());
        c
    } else {
        Command::new(unlearn_bin())
    };
    let out = cmd.args(["eval", "nll", "--device", "cpu"]).args(args).env("OMP_NUM_THREADS", "1").output().expect("spawn unlearn");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn value(r: &Value, key: &str) -> f64 {
    r["metrics"][key]["value"].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"))
}

/// hf_ref.py's per-sample (index, tokens, nll) of records `offset..offset + n` of `data`.
fn reference(model: &Path, data: &Path, offset: usize, n: usize, max_len: usize, dir: &Path) -> Vec<(u64, u64, f64)> {
    let out = dir.join("reference.jsonl");
    let (o, l, m) = (offset.to_string(), n.to_string(), max_len.to_string());
    run_py(
        "hf_ref.py",
        &["score", "--model", s(model), "--data", s(data), "--out", s(&out), "--offset", &o, "--limit", &l, "--max-len", &m],
    );
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["index"].as_u64().unwrap(), v["tokens"].as_u64().unwrap(), v["nll"].as_f64().unwrap())
        })
        .collect()
}

/// samples.jsonl's (index, tokens, nll) of one split.
fn rust_samples(dir: &Path, split: &str) -> Vec<(u64, u64, f64)> {
    std::fs::read_to_string(dir.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["split"] == split)
        .map(|v| (v["index"].as_u64().unwrap(), v["scores"]["tokens"].as_u64().unwrap(), v["scores"]["nll"].as_f64().unwrap()))
        .collect()
}

#[test]
fn nll_of_qa_and_text_slices_matches_transformers_and_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), "{}", 5, "bytebpe");
    let retain_model = make_tiny_model(&tmp.path().join("retain-model"), "{}", 6, "bytebpe");
    // QA records for the forget slice, raw texts (MUSE news, cut at max_len) for the retain slice.
    let forget = shared_data().join("tofu/forget01.json");
    let retain = shared_data().join("muse/news/privleak/holdout.json");
    let (f_off, r_off, n, max_len) = (3, 10, 6, 96);
    let args = |out: &Path, r_off: usize, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            ["--model", s(&model), "--out", s(out), "--forget", s(&forget), "--retain", s(&retain)].iter().map(|x| x.to_string()).collect();
        a.extend(
            ["--forget-offset", &f_off.to_string(), "--retain-offset", &r_off.to_string(), "--max-samples", &n.to_string()]
                .map(String::from),
        );
        a.extend(["--max-len".to_string(), max_len.to_string(), "--batch-size".into(), "4".into()]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let one = tmp.path().join("np1");
    let a = args(&one, r_off, &["--retain-model", s(&retain_model)]);
    let (ok, err) = eval_nll(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let r1 = report(&one);

    for (split, data, offset) in [("forget", &forget, f_off), ("retain", &retain, r_off)] {
        let key = format!("{split}_nll");
        let ours = rust_samples(&one, &key);
        let theirs = reference(&model, data, offset, n, max_len, tmp.path());
        assert_eq!(ours.len(), n, "{split}: {n} samples");
        let idx = |v: &[(u64, u64, f64)]| v.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>();
        assert_eq!(idx(&ours), idx(&theirs), "{split}: the same records and target-token counts as transformers");
        let max_diff = ours.iter().zip(&theirs).map(|(a, b)| (a.2 - b.2).abs()).fold(0.0, f64::max);
        let mean_ref = theirs.iter().map(|x| x.2).sum::<f64>() / n as f64;
        let mean = value(&r1, &key);
        let tokens: u64 = theirs.iter().map(|x| x.1).sum();
        println!(
            "{key}: unlearn {mean:.6}, transformers {mean_ref:.6} ({n} samples, {tokens} tokens); per-sample max |diff| {max_diff:.2e}"
        );
        assert!(max_diff < 2e-5, "{split}: per-sample NLL differs from transformers by {max_diff}");
        assert!((mean - mean_ref).abs() < 2e-5, "{split}: {mean} vs transformers {mean_ref}");
        assert_eq!(r1["metrics"][&key]["n"], n);
        assert!(
            r1["notes"].as_array().unwrap().iter().any(|x| x.as_str().unwrap().contains(&format!("{tokens} target tokens"))),
            "token count reported"
        );
        // The retain model's value, measured in the same run, is its own `eval nll` value.
        let rv = r1["reference"]["values"][&key].as_f64().unwrap();
        let rr = reference(&retain_model, data, offset, n, max_len, tmp.path());
        let rr_mean = rr.iter().map(|x| x.2).sum::<f64>() / n as f64;
        println!("{key} of the retain model: unlearn {rv:.6}, transformers {rr_mean:.6}");
        assert!((rv - rr_mean).abs() < 2e-5, "retain model {split}: {rv} vs transformers {rr_mean}");
    }

    // Two ranks: the same numbers bit for bit (the batches do not depend on the rank count).
    let two = tmp.path().join("np2");
    let a = args(&two, r_off, &["--retain-model", s(&retain_model)]);
    let (ok, err) = eval_nll(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let r2 = report(&two);
    for key in ["forget_nll", "retain_nll"] {
        assert_eq!(value(&r1, key).to_bits(), value(&r2, key).to_bits(), "{key}: np=1 vs np=2");
        assert_eq!(r1["reference"]["values"][key], r2["reference"]["values"][key]);
    }

    // A slice past the end of the file is refused, naming the file, and writes nothing.
    let bad = tmp.path().join("bad");
    let a = args(&bad, 100_000, &[]);
    let (ok, err) = eval_nll(1, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && err.contains("holdout.json") && err.contains("leaves none"), "{err}");
    assert!(!bad.exists());
}
