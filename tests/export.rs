//! `unlearn export` / `unlearn verify` on tiny random Llamas saved by transformers, judged by
//! references that share no code with ours: `onnx.checker` (full check), Python onnxruntime
//! running the exported graph against transformers' logits and `generate`, and a SHA-256 of the
//! weight file computed here. The clients users load exports with (optimum's ORTModelForCausalLM,
//! onnxruntime-genai) must generate exactly what transformers generates.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `unlearn export --model model --out out extra...`; panics with stderr on failure.
fn export(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["export", "--model", s(model), "--out", s(out)];
    args.extend_from_slice(extra);
    let (ok, _, err) = run_unlearn(&args);
    assert!(ok, "export {extra:?} failed:\n{err}");
}

/// onnx.checker.check_model(full_check=True) and a summary of the graph.
fn onnx_check(onnx_dir: &Path) -> Value {
    serde_json::from_str(&run_py("onnx_ref.py", &["check", "--onnx", s(&onnx_dir.join("model.onnx"))])).unwrap()
}

/// Python onnxruntime on the export vs transformers on the model, padded batches.
fn onnx_vs_transformers(model: &Path, onnx_dir: &Path) -> Value {
    let out = run_py("onnx_ref.py", &["compare", "--model", s(model), "--onnx", s(&onnx_dir.join("model.onnx"))]);
    serde_json::from_str(&out).unwrap()
}

/// `unlearn verify`; returns (exit ok, verify.json, stderr).
fn verify(model: &Path, onnx: &Path, extra: &[&str]) -> (bool, Option<Value>, String) {
    let report = onnx.parent().unwrap().join(format!("{}-verify.json", onnx.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&report);
    let mut args = vec!["verify", "--model", s(model), "--onnx", s(onnx), "--out", s(&report), "--threads", "1"];
    args.extend_from_slice(extra);
    let (ok, stdout, err) = run_unlearn(&args);
    println!("{stdout}");
    let json = std::fs::read_to_string(&report).ok().map(|t| serde_json::from_str(&t).unwrap());
    (ok, json, err)
}

fn assert_matches_transformers(case: &str, cmp: &Value, tol: f64) {
    for batch in ["right_padded", "left_padded"] {
        let d = cmp[batch]["max_abs_diff"].as_f64().unwrap();
        let scale = cmp[batch]["logit_scale"].as_f64().unwrap();
        println!("{case} {batch}: onnxruntime vs transformers max |dlogit| = {d:.3e} (logit scale {scale:.2})");
        assert!(cmp[batch]["finite"].as_bool().unwrap(), "{case} {batch}: non-finite logits");
        assert!(scale > 0.1, "{case}: degenerate logits, the comparison would prove nothing");
        assert!(d <= tol, "{case} {batch}: max |dlogit| {d} > {tol}");
    }
}

fn assert_verify_passed(case: &str, report: &Value, tol: f64) {
    let max = report["max_abs_diff"].as_f64().unwrap();
    println!("{case}: unlearn verify max |dlogit| = {max:.3e}");
    assert_eq!(report["passed"], Value::Bool(true), "{case}: {report:#}");
    assert!(max <= tol, "{case}: {max} > {tol}");
    let checks: Vec<&str> = report["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(checks[..2], ["right_padded", "left_padded"]);
    assert!(report["generations"].as_array().unwrap().iter().map(|g| g["onnx"].as_array().unwrap().len()).sum::<usize>() > 8);
}

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn fp32_exports_pass_the_checker_match_transformers_and_verify() {
    for case in LLAMA_CASES {
        let tmp = tempfile::tempdir().unwrap();
        let model = make_tiny_model(&tmp.path().join("model"), case.config, 7, "bytebpe");
        let out = tmp.path().join("onnx");
        export(&model, &out, &[]); // the KV-cache graph is the default

        let g = onnx_check(&out);
        let inputs: Vec<&str> = g["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
        let outputs: Vec<&str> = g["outputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
        assert_eq!(
            inputs,
            [
                "input_ids",
                "attention_mask",
                "position_ids",
                "past_key_values.0.key",
                "past_key_values.0.value",
                "past_key_values.1.key",
                "past_key_values.1.value"
            ]
        );
        assert_eq!(outputs, ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]);
        assert_eq!(g["opset"][""], 21);
        assert_eq!(g["inputs"][1]["dims"], serde_json::json!(["batch_size", "total_sequence_length"]));
        assert!(g["external"].as_array().unwrap().is_empty(), "a tiny model is stored inline");

        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
        assert_eq!(manifest["source_sha256"].as_str().unwrap(), sha256_file(&model.join("model.safetensors")));
        assert_eq!((manifest["dtype"].as_str(), manifest["kv_cache"].as_bool()), (Some("fp32"), Some(true)));
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(model.join(f)).unwrap(), "{f} copied");
        }

        assert_matches_transformers(case.name, &onnx_vs_transformers(&model, &out), 1e-4);
        let (ok, report, err) = verify(&model, &out, &[]);
        assert!(ok, "{}: verify failed:\n{err}", case.name);
        let report = report.unwrap();
        assert_verify_passed(case.name, &report, 1e-3);
        assert_eq!(report["checks"][2]["name"], "kv_decode");
        assert_eq!(report["generations_identical"], Value::Bool(true));

        if case.name == "gqa-untied" {
            // Without the cache, and a verify that must fail on an impossible tolerance.
            let plain = tmp.path().join("plain");
            export(&model, &plain, &["--no-kv-cache"]);
            assert_eq!(onnx_check(&plain)["outputs"].as_array().unwrap().len(), 1);
            assert_matches_transformers("no-cache", &onnx_vs_transformers(&model, &plain), 1e-4);
            let (ok, report, err) = verify(&model, &plain, &[]);
            assert!(ok, "verify failed:\n{err}");
            assert_verify_passed("no-cache", report.as_ref().unwrap(), 1e-3);
            let (ok, report, _) = verify(&model, &plain, &["--tolerance", "1e-12"]);
            assert!(!ok, "verify must exit non-zero when the difference exceeds the tolerance");
            assert_eq!(report.unwrap()["passed"], Value::Bool(false));
        }
    }
}

#[test]
fn kv_cache_generation_equals_uncached_generation_and_transformers_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 3, "bytebpe");
    let (kv, plain) = (tmp.path().join("kv"), tmp.path().join("plain"));
    export(&model, &kv, &["--kv-cache"]); // the default, spelled as scripts from before it was
    export(&model, &plain, &["--no-kv-cache"]);
    let prompts: Vec<Vec<i64>> =
        [9usize, 4, 13, 1, 6].iter().enumerate().map(|(r, &n)| (0..n).map(|j| 3 + ((r * 31 + j * 7) as i64 % 300)).collect()).collect();
    let pfile = tmp.path().join("prompts.json");
    std::fs::write(&pfile, serde_json::to_string(&prompts).unwrap()).unwrap();
    let generate = |onnx: &Path, name: &str| -> Vec<Vec<i64>> {
        let out = tmp.path().join(name);
        run_py(
            "onnx_ref.py",
            &[
                "generate",
                "--onnx",
                s(&onnx.join("model.onnx")),
                "--model",
                s(&model),
                "--prompts",
                s(&pfile),
                "--out",
                s(&out),
                "--max-new-tokens",
                "24",
            ],
        );
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    let with_cache = generate(&kv, "kv.json");
    let without = generate(&plain, "plain.json");
    let hf_out = tmp.path().join("hf.json");
    run_py("hf_ref.py", &["generate", "--model", s(&model), "--prompts", s(&pfile), "--out", s(&hf_out), "--max-new-tokens", "24"]);
    let hf: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(hf_out).unwrap()).unwrap();
    println!("kv-cache generations: {with_cache:?}");
    assert_eq!(with_cache, without, "cache graph vs re-running the sequence");
    assert_eq!(with_cache, hf, "onnxruntime-driven vs transformers generate");
    assert!(with_cache.iter().map(Vec::len).sum::<usize>() > 20, "generations too short to test anything");
}

#[test]
fn external_data_export_loads_in_onnxruntime_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[1].config, 5, "sentencepiece");
    let out = tmp.path().join("onnx");
    export(&model, &out, &["--kv-cache", "--external-threshold-bytes", "1024"]);
    assert!(out.join("model.onnx.data").is_file());
    let g = onnx_check(&out);
    let external: Vec<&str> = g["external"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    let loaded = unlearn::model::load_model(&model, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let params: Vec<String> = unlearn::model::param_specs(&loaded.config).into_iter().map(|p| p.name).collect();
    assert_eq!(external, params, "every weight is external, under its HF name");
    assert_eq!(g["offsets_aligned"], Value::Bool(true));
    for c in g["inline"].as_array().unwrap() {
        assert!(c["bytes"].as_u64().unwrap() <= 1024, "only small constants stay inline: {c}");
    }
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
    assert_eq!(manifest["external_data"], "model.onnx.data");

    assert_matches_transformers("external", &onnx_vs_transformers(&model, &out), 1e-4);
    let (ok, report, err) = verify(&model, &out, &[]);
    assert!(ok, "verify failed:\n{err}");
    assert_verify_passed("external", report.as_ref().unwrap(), 1e-3);

    // The same graph without unlearn's metadata or export.json (as another exporter's would be)
    // is still matched to the model by its inputs and outputs, and verifies.
    let foreign = tmp.path().join("foreign");
    run_py("onnx_ref.py", &["strip", "--onnx", s(&out.join("model.onnx")), "--out", s(&foreign)]);
    let (ok, report, err) = verify(&model, &foreign.join("model.onnx"), &[]);
    assert!(ok, "verify of a metadata-less graph failed:\n{err}");
    assert_verify_passed("foreign", report.as_ref().unwrap(), 1e-3);
}

#[test]
fn fp16_export_runs_on_onnxruntime_cpu_within_documented_tolerance() {
    let tol = unlearn::export::verify::DEFAULT_TOLERANCE_FP16;
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[2].config, 11, "bytebpe");
    let out = tmp.path().join("onnx");
    export(&model, &out, &["--dtype", "fp16", "--kv-cache"]);
    let g = onnx_check(&out);
    assert_eq!(g["outputs"][0]["elem_type"], 10, "fp16 logits");
    assert_eq!(g["inputs"][3]["elem_type"], 10, "fp16 cache");
    let cmp = onnx_vs_transformers(&model, &out);
    assert_matches_transformers("fp16", &cmp, tol);
    let (ok, report, err) = verify(&model, &out, &[]);
    assert!(ok, "verify failed:\n{err}");
    let report = report.unwrap();
    assert_eq!(report["tolerance"].as_f64().unwrap(), tol, "fp16 default tolerance");
    assert_verify_passed("fp16", &report, tol);
}

#[test]
fn every_supported_opset_passes_the_checker_and_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 13, "bytebpe");
    for opset in ["15", "17", "18", "23", "26"] {
        let out = tmp.path().join(format!("opset{opset}"));
        export(&model, &out, &["--kv-cache", "--opset", opset]);
        assert_eq!(onnx_check(&out)["opset"][""].to_string(), opset);
        assert_matches_transformers(&format!("opset {opset}"), &onnx_vs_transformers(&model, &out), 1e-4);
    }
    for opset in ["14", "27"] {
        let out = tmp.path().join(format!("opset{opset}"));
        let (ok, _, err) = run_unlearn(&["export", "--model", s(&model), "--out", s(&out), "--opset", opset]);
        assert!(!ok && err.contains("supported opsets are 15..=26"), "{err}");
        assert_no_output(&out);
    }
}

/// Neither the output directory nor any temporary sibling of it exists.
fn assert_no_output(out: &Path) {
    assert!(!out.exists(), "{} exists after a failed export", out.display());
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    if let Ok(entries) = std::fs::read_dir(out.parent().unwrap()) {
        for e in entries {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(&format!("{name}.tmp")), "temporary {n} left behind");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to.to_path_buf()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn bad_models_and_outputs_fail_clearly_without_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make_tiny_model(&tmp.path().join("model"), LLAMA_CASES[0].config, 17, "bytebpe");
    let t = tmp.path();

    let gemma = copy_dir(&good, &t.join("gemma"));
    edit_config(&gemma, |c| {
        c.insert("model_type".into(), "gemma".into());
    });
    let yarn = copy_dir(&good, &t.join("yarn"));
    edit_config(&yarn, |c| {
        c.remove("rope_parameters");
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}));
    });
    let no_weights = copy_dir(&good, &t.join("no-weights"));
    std::fs::remove_file(no_weights.join("model.safetensors")).unwrap();
    let no_tensor = copy_dir(&good, &t.join("no-tensor"));
    let st = no_tensor.join("model.safetensors");
    let kept: Vec<(String, tch::Tensor)> =
        tch::Tensor::read_safetensors(&st).unwrap().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    tch::Tensor::write_safetensors(&kept, &st).unwrap();
    let a_file = t.join("a-file");
    std::fs::write(&a_file, "not a directory").unwrap();

    let cases: Vec<(&str, &Path, PathBuf, Vec<&str>, &str)> = vec![
        ("model_type gemma", &gemma, t.join("out1"), vec![], "unsupported model_type `gemma`"),
        ("rope yarn", &yarn, t.join("out2"), vec![], "unsupported rope scaling type `yarn`"),
        ("no safetensors", &no_weights, t.join("out3"), vec![], "no model.safetensors"),
        ("missing tensor", &no_tensor, t.join("out4"), vec![], "tensor `model.layers.1.mlp.up_proj.weight` is missing"),
        ("parent is a file", &good, a_file.join("out"), vec![], "cannot create the output directory"),
        ("bad dtype", &good, t.join("out5"), vec!["--dtype", "bf16"], "unknown export dtype `bf16`"),
        ("threshold too big", &good, t.join("out6"), vec!["--external-threshold-bytes", "3000000000"], "2 GiB"),
    ];
    for (what, model, out, extra, expect) in cases {
        let mut args = vec!["export", "--model", s(model), "--out", s(&out)];
        args.extend(extra);
        let (ok, _, err) = run_unlearn(&args);
        println!("{what}: {}", err.lines().last().unwrap_or(""));
        assert!(!ok, "{what}: export succeeded");
        assert!(err.contains(expect), "{what}: expected `{expect}` in:\n{err}");
        assert!(!err.contains("panicked"), "{what}: panic instead of an error:\n{err}");
        if out.parent().unwrap().is_dir() {
            assert_no_output(&out);
        }
    }
    assert_eq!(std::fs::read_to_string(&a_file).unwrap(), "not a directory");

    // Read-only parent directory (root ignores permissions, so only checked for other users).
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = t.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let (ok, _, err) = run_unlearn(&["export", "--model", s(&good), "--out", s(&ro.join("out"))]);
        assert!(!ok && err.contains("cannot create the output directory"), "{err}");
        assert_no_output(&ro.join("out"));
    }
}

#[test]
fn verify_refuses_an_onnx_from_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = make_tiny_model(&t.join("model"), LLAMA_CASES[0].config, 19, "bytebpe");
    let out = t.join("onnx");
    export(&model, &out, &["--kv-cache"]);
    let other_vocab = make_tiny_model(&t.join("vocab"), r#"{"tokenizer_vocab": 400}"#, 19, "bytebpe");
    let other_hidden = make_tiny_model(&t.join("hidden"), r#"{"hidden_size": 96}"#, 19, "bytebpe");
    let other_weights = make_tiny_model(&t.join("weights"), LLAMA_CASES[0].config, 20, "bytebpe");
    for (what, m, expect) in [
        ("vocab", &other_vocab, "ONNX logits have 320 entries, the model 400"),
        ("hidden size", &other_hidden, "hidden_size: ONNX 64, model 96"),
        ("weights", &other_weights, "was exported from weights with SHA-256"),
    ] {
        let (ok, report, err) = verify(m, &out, &[]);
        println!("{what}: {}", err.lines().last().unwrap_or(""));
        assert!(!ok, "{what}: verify accepted an ONNX file from another model");
        assert!(err.contains(expect), "{what}: expected `{expect}` in:\n{err}");
        assert!(report.is_none(), "{what}: no numbers are reported for a mismatched pair");
    }
}

/// The demo model (imported from the SmolLM2 GGUF by `unlearn import-gguf`, which
/// launch/setup.sh runs): fp32 export verifies within 1e-3, and Python onnxruntime agrees with
/// transformers.
#[test]
fn smollm2_demo_model_exports_and_verifies() {
    let model = cache_dir().join("models/smollm2-135m-instruct");
    assert!(model.join("model.safetensors").exists(), "no demo model at {} (launch/setup.sh imports it)", model.display());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("onnx");
    export(&model, &out, &["--kv-cache"]);
    onnx_check(&out);
    assert_matches_transformers("smollm2", &onnx_vs_transformers(&model, &out), 1e-3);
    let (ok, report, err) = verify(&model, &out, &["--device", "cpu"]);
    assert!(ok, "verify failed:\n{err}");
    let report = report.unwrap();
    assert_verify_passed("smollm2", &report, 1e-3);
    assert_eq!(report["generations_identical"], Value::Bool(true));
}

/// `n` prompts of token ids in `3..3+range`, of assorted lengths.
fn id_prompts(n: usize, range: i64) -> Vec<Vec<i64>> {
    [9usize, 4, 13, 1, 6, 11]
        .iter()
        .take(n)
        .enumerate()
        .map(|(r, &len)| (0..len).map(|j| 3 + ((r * 31 + j * 7) as i64 % range)).collect())
        .collect()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// transformers' greedy generate() on the HF model directory (the reference).
fn hf_generate(model: &Path, prompts: &Path, max_new: usize) -> Vec<Vec<i64>> {
    let out = prompts.with_extension("hf.json");
    run_py(
        "hf_ref.py",
        &["generate", "--model", s(model), "--prompts", s(prompts), "--out", s(&out), "--max-new-tokens", &max_new.to_string()],
    );
    serde_json::from_value(read_json(&out)).unwrap()
}

/// A client's greedy generations from an export directory (tests/py/client_ref.py), or the reason
/// it could not run here (onnxruntime-genai only).
fn client_generate(client: &str, onnx: &Path, prompts: &Path, max_new: usize, extra: &[&str]) -> Result<Vec<Vec<i64>>, String> {
    let out = onnx.with_extension(format!("{client}.json"));
    let mut args = vec![client, "--onnx", s(onnx), "--prompts", s(prompts), "--out", s(&out)];
    let max_new = max_new.to_string();
    args.extend(["--max-new-tokens", &max_new]);
    args.extend_from_slice(extra);
    let overlay = if client == "optimum" { Some(optimum_path()) } else { None };
    let env: Vec<(&str, &Path)> = overlay.iter().map(|p| ("PYTHONPATH", p.as_path())).collect();
    run_py_env("client_ref.py", &args, &env);
    let v = read_json(&out);
    match v.get("skipped") {
        Some(why) => Err(why.as_str().unwrap_or_default().to_string()),
        None => Ok(serde_json::from_value(v).unwrap()),
    }
}

/// Exports `model` with the default (KV-cache) graph and with `--no-kv-cache`, then checks that
/// optimum (with and without the cache) and onnxruntime-genai generate exactly what transformers
/// generates; prints the generations compared.
fn clients_generate_as_transformers(case: &str, model: &Path, tmp: &Path, prompts: &[Vec<i64>], max_new: usize, extra: &[&str]) {
    let (kv, plain) = (tmp.join(format!("{case}-kv")), tmp.join(format!("{case}-plain")));
    export(model, &kv, extra);
    export(model, &plain, &[extra, &["--no-kv-cache"]].concat());
    let genai_config = read_json(&kv.join("genai_config.json"));
    assert_eq!(read_json(&kv.join("export.json"))["genai_config"], "genai_config.json");
    assert!(!plain.join("genai_config.json").exists(), "onnxruntime-genai cannot run a cache-less graph; no genai_config.json for it");
    let cfg = read_json(&model.join("config.json"));
    for key in ["num_hidden_layers", "num_key_value_heads", "hidden_size", "num_attention_heads"] {
        assert_eq!(genai_config["model"]["decoder"][key], cfg[key], "{case}: genai_config {key}");
    }
    assert_eq!(genai_config["model"]["context_length"], cfg["max_position_embeddings"]);

    let pfile = tmp.join(format!("{case}-prompts.json"));
    std::fs::write(&pfile, serde_json::to_string(prompts).unwrap()).unwrap();
    let hf = hf_generate(model, &pfile, max_new);
    println!("{case}: transformers generate: {hf:?}");
    assert!(hf.iter().map(Vec::len).sum::<usize>() >= prompts.len() * max_new / 2, "{case}: generations too short to test anything");
    let with_cache = client_generate("optimum", &kv, &pfile, max_new, &[]).unwrap();
    assert_eq!(with_cache, hf, "{case}: optimum ORTModelForCausalLM (KV cache) vs transformers generate");
    let without = client_generate("optimum", &plain, &pfile, max_new, &["--no-cache"]).unwrap();
    assert_eq!(without, hf, "{case}: optimum ORTModelForCausalLM (no cache) vs transformers generate");
    println!("{case}: optimum with and without the cache: equal to transformers ({} prompts)", prompts.len());
    match client_generate("genai", &kv, &pfile, max_new, &[]) {
        Ok(genai) => {
            assert_eq!(genai, hf, "{case}: onnxruntime-genai vs transformers generate");
            println!("{case}: onnxruntime-genai: equal to transformers");
        }
        Err(why) => println!("{case}: SKIPPED onnxruntime-genai: {why}"),
    }
}

/// Tiny Llamas (GQA with a byte-level BPE; llama3 rope scaling with a SentencePiece-style
/// tokenizer and its weights in external data) through optimum and onnxruntime-genai.
#[test]
fn optimum_and_onnxruntime_genai_generate_what_transformers_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let gqa = make_tiny_model(&tmp.path().join("gqa"), LLAMA_CASES[0].config, 3, "bytebpe");
    clients_generate_as_transformers("gqa-untied", &gqa, tmp.path(), &id_prompts(5, 300), 24, &[]);
    let rope = make_tiny_model(&tmp.path().join("rope"), LLAMA_CASES[2].config, 5, "sentencepiece");
    clients_generate_as_transformers(
        "gqa-llama3-rope-external",
        &rope,
        tmp.path(),
        &id_prompts(4, 300),
        24,
        &["--external-threshold-bytes", "1024"],
    );
    assert!(tmp.path().join("gqa-llama3-rope-external-kv/model.onnx.data").exists());
}

/// The demo model, asked TOFU questions in its own chat format (ChatML).
#[test]
fn smollm2_generates_in_optimum_and_onnxruntime_genai_as_in_transformers() {
    let model = cache_dir().join("models/smollm2-135m-instruct");
    assert!(model.join("model.safetensors").exists(), "no demo model at {} (launch/setup.sh imports it)", model.display());
    let tmp = tempfile::tempdir().unwrap();
    let records = read_json(&shared_data().join("tofu/forget01.json"));
    let texts: Vec<String> = records
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|r| format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", r["prompt"].as_str().unwrap()))
        .collect();
    let (tfile, ids) = (tmp.path().join("texts.json"), tmp.path().join("ids.json"));
    std::fs::write(&tfile, serde_json::to_string(&texts).unwrap()).unwrap();
    run_py("hf_ref.py", &["tokenize", "--model", s(&model), "--texts", s(&tfile), "--out", s(&ids)]);
    let prompts: Vec<Vec<i64>> = serde_json::from_value(read_json(&ids)).unwrap();
    clients_generate_as_transformers("smollm2", &model, tmp.path(), &prompts, 24, &[]);
}
