//! `unlearn plan`: parameter counts against transformers (models built on the meta device, and a
//! saved model's safetensors), the ZeRO-2 resident state against the trainer's buffer list
//! recomputed from those counts, config reading with a preset standing in for absent weights, and
//! the errors. (Whether the plan matches real memory is benches/plan_rss.sh: it needs minutes.)

mod common;

use common::*;
use serde_json::Value;

const LLAMA2_7B: &str = r#"{"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"tie_word_embeddings":false}"#;
const LLAMA3_8B: &str = r#"{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"tie_word_embeddings":false}"#;
/// The other families' 7B-class members, as their config.json files give the shapes.
const ZEPHYR_7B: &str = r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"tie_word_embeddings":false}"#;
const QWEN2_5_7B: &str = r#"{"model_type":"qwen2","vocab_size":152064,"hidden_size":3584,"intermediate_size":18944,"num_hidden_layers":28,"num_attention_heads":28,"num_key_value_heads":4,"tie_word_embeddings":false}"#;
const PHI3_5_MINI: &str = r#"{"model_type":"phi3","vocab_size":32064,"hidden_size":3072,"intermediate_size":8192,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"tie_word_embeddings":false,"pad_token_id":32000}"#;

fn plan(args: &[&str]) -> Value {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    all.push("--json");
    let (ok, out, err) = run_unlearn(&all);
    assert!(ok, "unlearn {all:?} failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("plan JSON: {e}\n{out}"))
}

fn plan_err(args: &[&str]) -> String {
    let mut all = vec!["plan"];
    all.extend_from_slice(args);
    let (ok, _, err) = run_unlearn(&all);
    assert!(!ok, "unlearn {all:?} should fail");
    err
}

fn counts(args: &[&str]) -> (i64, i64) {
    let mut all = vec!["count-params"];
    all.extend_from_slice(args);
    let v: Value = serde_json::from_str(&run_py("hf_ref.py", &all)).unwrap();
    (v["total"].as_i64().unwrap(), v["matrices"].as_i64().unwrap())
}

fn resident(plan: &Value, component: &str) -> f64 {
    plan["resident"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["component"] == component)
        .unwrap_or_else(|| panic!("no resident row `{component}`"))["bytes"]
        .as_f64()
        .unwrap()
}

#[test]
fn preset_counts_and_zero2_resident_state_match_transformers() {
    for (preset, cfg) in [
        ("llama2-7b", LLAMA2_7B),
        ("llama3-8b", LLAMA3_8B),
        ("zephyr-7b-beta", ZEPHYR_7B),
        ("qwen2.5-7b", QWEN2_5_7B),
        ("phi3.5-mini", PHI3_5_MINI),
    ] {
        let (total, matrices) = counts(&["--config", cfg]);
        let args = [
            "--preset",
            preset,
            "--world-size",
            "8",
            "--method",
            "mean-teacher",
            "--zero",
            "2",
            "--batch",
            "32",
            "--seq",
            "1024",
            "--recompute",
        ];
        let p = plan(&[&args[..], &["--reduce", "micro-batch"]].concat());
        println!(
            "{preset}: transformers {total} params, {matrices} in matrices; plan peak {:.2} GiB ({})",
            p["peak_bytes"].as_f64().unwrap() / 1073741824.0,
            p["peak_phase"]
        );
        assert_eq!(p["params"].as_i64(), Some(total), "{preset}: total parameters");
        assert_eq!(p["trainable_params"].as_i64(), Some(matrices), "{preset}: trainable (matrices)");
        // What Trainer::new keeps at ZeRO-2, bf16, AdamW, mean teacher with a teacher replica,
        // gradients reduced every micro-batch: frozen and two compute replicas in bf16; master,
        // two Adam moments, EMA and the one gradient shard (the weighted sum of both objectives)
        // in fp32, each 1/8 of the trainable parameters (plus bucket padding).
        let (t, f, s) = (matrices as f64, (total - matrices) as f64, matrices as f64 / 8.0);
        let expect = [
            ("frozen weights", 2.0 * f),
            ("student compute replica", 2.0 * t),
            ("teacher compute replica", 2.0 * t),
            ("fp32 master weights", 4.0 * s),
            ("AdamW state", 8.0 * s),
            ("EMA teacher shard", 4.0 * s),
            ("gradient accumulators", 4.0 * s),
        ];
        for (name, bytes) in expect {
            let got = resident(&p, name);
            assert!((got - bytes).abs() <= 1e-4 * bytes, "{preset}: {name}: plan {got}, expected {bytes}");
        }
        // Reduced once per step: the full fp32 local sum and the reduced shard.
        let q = plan(&[&args[..], &["--reduce", "step"]].concat());
        let (got, want) = (resident(&q, "gradient accumulators"), 4.0 * t + 4.0 * s);
        assert!((got - want).abs() <= 1e-4 * want, "{preset}: per-step accumulators: plan {got}, expected {want}");
    }
}

#[test]
fn model_dir_counts_match_its_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("m"), r#"{"num_key_value_heads": 2, "tie_word_embeddings": true}"#, 3, "bytebpe");
    let (total, matrices) = counts(&["--model", model.to_str().unwrap()]);
    // NGDiff trains every weight by default: ask for the matrices to count them.
    let p = plan(&[
        "--model",
        model.to_str().unwrap(),
        "--world-size",
        "2",
        "--method",
        "ngdiff",
        "--zero",
        "1",
        "--device",
        "cpu",
        "--trainable",
        "matrices",
    ]);
    assert_eq!(p["params"].as_i64(), Some(total));
    assert_eq!(p["trainable_params"].as_i64(), Some(matrices));
    let all =
        plan(&["--model", model.to_str().unwrap(), "--world-size", "2", "--method", "ngdiff", "--trainable", "all", "--device", "cpu"]);
    assert_eq!(all["trainable_params"].as_i64(), Some(total));
    assert_eq!(all["frozen_params"].as_i64(), Some(0));
}

#[test]
fn config_is_read_and_a_preset_stands_in_for_absent_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "[model]\npath = \"/nonexistent/llama2-7b\"\ndtype = \"bf16\"\ndevice = \"cuda\"\n\
         [data]\nforget = [\"/nonexistent/forget.json\"]\nretain = [\"/nonexistent/retain.json\"]\n\
         [method]\nname = \"ngdiff\"\n[optim]\nname = \"adamw\"\nlr = 1e-5\n\
         [train]\nsteps = 10\nbatch_size = 32\nmax_len = 2048\nrecompute = true\nout_dir = \"runs/x\"\n\
         [dist]\nzero = 3\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let err = plan_err(&["--config", c, "--world-size", "8"]);
    assert!(err.contains("model.path") && err.contains("--preset"), "{err}");
    let p = plan(&["--config", c, "--world-size", "8", "--preset", "llama2-7b"]);
    let input = &p["input"];
    assert_eq!(input["method"], "ngdiff");
    assert_eq!(input["zero"], 3);
    assert_eq!(input["dtype"], "bf16");
    assert_eq!(input["batch"], 32);
    assert_eq!(input["seq"], 2048);
    assert_eq!(input["recompute"], true);
    assert_eq!(input["model"]["vocab_size"], 32000);
    // Flags override the config.
    let q = plan(&["--config", c, "--world-size", "8", "--preset", "llama2-7b", "--zero", "1", "--seq", "512"]);
    assert_eq!(q["input"]["zero"], 1);
    assert_eq!(q["input"]["seq"], 512);
    assert!(q["peak_bytes"].as_f64() > p["peak_bytes"].as_f64(), "ZeRO-1 must need more than ZeRO-3");
}

#[test]
fn bad_inputs_are_named() {
    let base = ["--preset", "llama2-7b", "--method", "ga"];
    let err = plan_err(&[&base[..], &["--world-size", "0"]].concat());
    assert!(err.contains("world-size"), "{err}");
    let err = plan_err(&[&base[..], &["--world-size", "3", "--batch", "4"]].concat());
    assert!(err.contains("train.batch_size") && err.contains("divisible"), "{err}");
    let err = plan_err(&["--preset", "llama2-7b", "--world-size", "2", "--method", "forget-everything"]);
    assert!(err.contains("forget-everything") && err.contains("mean-teacher"), "{err}");
    let err = plan_err(&["--preset", "llama9-1t", "--world-size", "2", "--method", "ga"]);
    assert!(err.contains("llama9-1t") && err.contains("llama2-7b"), "{err}");
    let err = plan_err(&["--model", "/nonexistent", "--world-size", "2", "--method", "ga"]);
    assert!(err.contains("/nonexistent"), "{err}");
}

/// The step-time model's FLOPs per token equal torch's FlopCounterMode on the same Llama (weight
/// products exactly; attention at half the full s × s products, the causal kernel's work), and
/// the command of issue 11 prints a predicted step time and the exposed communication. Matrices
/// only, as `hf_ref.py count-flops` counts them (finetune's own default also trains the embedding).
#[test]
fn step_time_flops_match_torch_and_the_issue_command_prints_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = r#"{"vocab_size":320,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#;
    let model = make_tiny_model(&tmp.path().join("m"), cfg, 3, "bytebpe");
    let (batch, seq) = (2.0, 64.0);
    let torch: Value =
        serde_json::from_str(&run_py("hf_ref.py", &["count-flops", "--config", cfg, "--batch", "2", "--seq", "64"])).unwrap();
    let p = plan(&[
        "--model",
        model.to_str().unwrap(),
        "--world-size",
        "1",
        "--method",
        "finetune",
        "--trainable",
        "matrices",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq",
        "64",
    ]);
    let f = &p["step_time"]["flops"];
    let ours = |k: &str| f[k].as_f64().unwrap() * batch * seq;
    let t = |k: &str| torch[k].as_f64().unwrap();
    let (fwd, bwd) = (ours("forward_per_token"), ours("backward_per_token"));
    let (want_fwd, want_bwd) = (t("forward_mm") + t("forward_attention_full") / 2.0, t("backward_mm") + t("backward_attention_full") / 2.0);
    println!("FLOPs of a 2 x 64 batch: forward ours {fwd} torch {want_fwd}; backward ours {bwd} torch {want_bwd}");
    assert_eq!(fwd, want_fwd);
    assert_eq!(bwd, want_bwd);

    let (ok, out, err) =
        run_unlearn(&["plan", "--preset", "llama2-7b", "--world-size", "16", "--fabric", "ib-400g-x1", "--method", "mean-teacher"]);
    assert!(ok, "{err}");
    let step = out.lines().find(|l| l.contains("predicted step time")).unwrap_or_else(|| panic!("no predicted step time:\n{out}"));
    let exposed = out.lines().find(|l| l.contains("exposed")).unwrap_or_else(|| panic!("no exposed communication:\n{out}"));
    println!("{step}\n{exposed}");
    assert!(out.contains("ib-400g-x1") && out.contains("2 node(s)"), "{out}");

    // The promised bytes at 7B: mean teacher, grad_accum 5, ZeRO-2 on 16 ranks reduces its one
    // fp32 buffer once per step; before, both objectives every micro-batch.
    let j = plan(&[
        "--preset",
        "llama2-7b",
        "--world-size",
        "16",
        "--fabric",
        "ib-400g-x1",
        "--method",
        "mean-teacher",
        "--zero",
        "2",
        "--batch",
        "16",
        "--seq",
        "1024",
        "--grad-accum",
        "5",
        "--recompute",
        "--reduce",
        "step",
    ]);
    let flat = j["flat_elems"].as_f64().unwrap();
    let bytes = |design: &str| -> f64 {
        j["step_time"][design]["comm"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["what"] == "gradient reduction")
            .map(|r| r["bytes"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(bytes("now"), 4.0 * flat);
    assert_eq!(bytes("before"), 10.0 * 4.0 * flat);
    let (now, before) = (&j["step_time"]["now"], &j["step_time"]["before"]);
    assert!(now["exposed_s"].as_f64() < before["exposed_s"].as_f64());
}
