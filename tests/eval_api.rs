//! The benchmark interface as a trainer will call it (a model already in memory, its tokenizer, a
//! rank group) gives exactly the numbers `unlearn eval` writes for the same model directory: the
//! CLI is only the wrapper that loads directories and writes the report.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use unlearn::data::{Template, Tokenizer};
use unlearn::dist::local::Local;
use unlearn::eval::benchmark::{BenchmarkArgs, ModelFacts, Outcome};
use unlearn::eval::context::EvalCtx;
use unlearn::eval::muse::{MuseArgs, Part, Variant};
use unlearn::eval::shard::Batching;
use unlearn::eval::tofu::TofuArgs;
use unlearn::model::{load_model, LoadedModel};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn load(dir: &Path) -> (LoadedModel, Tokenizer) {
    let m = load_model(dir, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let tok = Tokenizer::from_model_dir(dir, &m.config).unwrap();
    (m, tok)
}

/// `unlearn eval`'s default batching and prompt template (phi-qa: no run config next to the models).
fn ctx<'a>(m: &'a LoadedModel, tok: &'a Tokenizer, template: &'a Template, comm: &'a Local) -> EvalCtx<'a> {
    let score = Batching { batch_size: 8, max_batch_tokens: 4096 };
    let gen = Batching { batch_size: 32, max_batch_tokens: 65536 };
    EvalCtx::new(&m.model, tok, template, comm, &m.config.eos_token_ids, score, gen)
}

/// Evaluate `model` in memory, with `retain` as the reference model when given.
fn evaluate_in_memory(args: &dyn BenchmarkArgs, model: &Path, retain: Option<&Path>) -> Outcome {
    let comm = Local;
    let (m, tok) = load(model);
    let template = Template::phi_qa();
    let mut bench = args.prepare(&ModelFacts { config: &m.config, tok: &tok, template: &template }).unwrap();
    assert_eq!(bench.reference_model(), retain, "the reference model is the retain model named");
    if let Some(dir) = retain {
        let (r, rtok) = load(dir);
        bench.measure_reference(&ctx(&r, &rtok, &template, &comm)).unwrap();
    }
    bench.evaluate(&ctx(&m, &tok, &template, &comm)).unwrap()
}

/// Run `unlearn` and return its report.json, as text and parsed.
fn run_cli(args: &[&str]) -> (String, Value) {
    let out = std::process::Command::new(unlearn_bin()).args(args).env("OMP_NUM_THREADS", "1").output().expect("spawn unlearn");
    assert!(out.status.success(), "unlearn {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let i = args.iter().position(|a| *a == "--out").unwrap() + 1;
    let text = std::fs::read_to_string(Path::new(args[i]).join("report.json")).unwrap();
    let report = serde_json::from_str(&text).unwrap();
    (text, report)
}

/// The numbers of a JSON value as written (`"key": 1.5,` or a pretty-printed array), parsed by
/// `str::parse`, which rounds correctly: serde_json's default float parsing is best effort and
/// can be one ulp off, too coarse for a bit-for-bit comparison.
fn written_numbers(text: &str, key: &str) -> Vec<Option<f64>> {
    let start = text.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("`{key}` not in the report")) + key.len() + 4;
    let rest = &text[start..];
    let value = if rest.starts_with('[') { &rest[1..rest.find(']').unwrap()] } else { &rest[..rest.find(['\n', ',']).unwrap()] };
    value
        .split(',')
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| if v == "null" { None } else { Some(v.parse().unwrap()) })
        .collect()
}

fn bits(values: &[Option<f64>]) -> Vec<Option<u64>> {
    values.iter().map(|v| v.map(f64::to_bits)).collect()
}

/// Every metric of the outcome equals the report's, bit for bit, in the same order.
fn assert_same_metrics(outcome: &Outcome, (text, report): &(String, Value)) {
    let keys: Vec<&str> = outcome.metrics.iter().map(|(k, _)| k.as_str()).collect();
    let order: Vec<&str> = report["order"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(keys, order);
    for (key, metric) in &outcome.metrics {
        let block = &text[text.find(&format!("\"{key}\": {{")).unwrap()..];
        let theirs = written_numbers(block, "value");
        assert_eq!(bits(&[metric.value]), bits(&theirs), "{key}: in memory {:?}, unlearn eval {theirs:?}", metric.value);
        assert_eq!(metric.n, report["metrics"][key]["n"].as_u64().unwrap() as usize, "{key}: n");
    }
    println!("{} metrics equal: {:?}", keys.len(), outcome.metrics.iter().map(|(k, m)| (k.as_str(), m.value)).collect::<Vec<_>>());
}

#[test]
fn in_memory_evaluation_equals_unlearn_eval() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), "{}", 1, "sentencepiece");
    let retain = make_tiny_model(&tmp.path().join("retain"), "{}", 2, "sentencepiece");
    let tofu_data = shared_data().join("tofu");
    let muse_data = shared_data().join("muse/news");

    let tofu = TofuArgs {
        forget: "forget01".into(),
        data: tofu_data.clone(),
        retain_model: Some(retain.clone()),
        retain_stats: None,
        max_samples: Some(3),
        max_new_tokens: 8,
        sets: None,
        no_rouge: false,
    };
    let outcome = evaluate_in_memory(&tofu, &model, Some(&retain));
    let out = tmp.path().join("tofu");
    let report = run_cli(&[
        "eval",
        "tofu",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--data",
        s(&tofu_data),
        "--forget",
        "forget01",
        "--retain-model",
        s(&retain),
        "--max-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]);
    assert!(outcome.metrics.iter().any(|(k, _)| k == "forget_quality"), "the retain model was measured");
    assert_same_metrics(&outcome, &report);
    let stats = outcome.truth_stats.as_ref().unwrap();
    let theirs = written_numbers(&report.0[report.0.find("\"truth_stats\"").unwrap()..], "values");
    assert_eq!(bits(&stats.values.iter().map(|&v| Some(v)).collect::<Vec<_>>()), bits(&theirs), "forget truth statistics");
    assert_eq!(stats.split, "forget01");

    let muse = MuseArgs {
        data: muse_data.clone(),
        mmlu: None,
        parts: Some(vec![Part::KnowmemF, Part::Privleak]),
        variant: Variant::Muse,
        corpus: None,
        retain_auc: None,
        retain_model: Some(retain.clone()),
        max_samples: Some(6),
        max_new_tokens_verbmem: 128,
        max_new_tokens_knowmem: 8,
        max_new_tokens_mmlu: 4,
        max_prompt_tokens: Some(64),
        max_text_tokens: Some(64),
    };
    let outcome = evaluate_in_memory(&muse, &model, Some(&retain));
    let out = tmp.path().join("muse");
    let report = run_cli(&[
        "eval",
        "muse",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--data",
        s(&muse_data),
        "--parts",
        "knowmem-f,privleak",
        "--retain-model",
        s(&retain),
        "--max-samples",
        "6",
        "--max-new-tokens-knowmem",
        "8",
        "--max-prompt-tokens",
        "64",
        "--max-text-tokens",
        "64",
        "--device",
        "cpu",
    ]);
    assert!(outcome.metrics.iter().any(|(k, _)| k == "privleak"), "the retain model's AUC was measured");
    assert_same_metrics(&outcome, &report);
}
