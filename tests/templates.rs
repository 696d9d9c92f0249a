//! Prompt templates against transformers' `apply_chat_template` on real chat templates (Meta's
//! Llama-2-chat and Llama-3-Instruct, Llama-3.2-Instruct's, plain ChatML, and the SmolLM2 demo
//! model's own): the prompt and conversation texts, their token ids, the answer targets, the few-shot
//! prompts, and the answer NLL `unlearn score --template` computes; then a run that trains with a
//! chat template, from a hub id in a fake local Hugging Face cache, whose evaluation picks the
//! template up from the run's config.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use unlearn::config::Choice;
use unlearn::data::{Template, TemplateKind, Tokenizer};
use unlearn::model::Config;

/// Question/answer pairs: TOFU forget01 plus whitespace, multi-line, non-ASCII and empty answers.
fn pairs() -> Vec<(String, String)> {
    let recs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(shared_data().join("tofu/forget01.json")).unwrap()).unwrap();
    let mut out: Vec<(String, String)> =
        recs.iter().take(10).map(|r| (r["prompt"].as_str().unwrap().to_string(), r["response"].as_str().unwrap().to_string())).collect();
    for (q, a) in [
        ("  Who wrote it?  ", "  She did, in 1999.  "),
        ("Two\nlines?", "Yes:\nline one\nline two"),
        ("Café naïve — 東京?", "½ 🙂 ok"),
        ("Nothing to say?", ""),
    ] {
        out.push((q.to_string(), a.to_string()));
    }
    out
}

fn tokenizer(dir: &Path) -> Tokenizer {
    Tokenizer::from_model_dir(dir, &Config::from_file(&dir.join("config.json")).unwrap()).unwrap()
}

fn make_models(dir: &Path) {
    run_py("template_ref.py", &["make-models", "--out", dir.to_str().unwrap()]);
}

/// (model directory, its end-of-turn token, the named formats that must equal its template).
fn cases(models: &Path) -> Vec<(PathBuf, &'static str, Vec<TemplateKind>)> {
    vec![
        (models.join("llama2"), "</s>", vec![TemplateKind::Model, TemplateKind::Llama2Chat]),
        (models.join("llama3"), "<|eot_id|>", vec![TemplateKind::Model, TemplateKind::Llama3Chat]),
        (models.join("llama32"), "<|eot_id|>", vec![TemplateKind::Model]),
        (models.join("chatml"), "<|im_end|>", vec![TemplateKind::Model, TemplateKind::Chatml]),
        (cache_dir().join("models/smollm2-135m-instruct"), "<|im_end|>", vec![TemplateKind::Model]),
    ]
}

#[test]
fn chat_templates_equal_transformers_apply_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    make_models(&tmp.path().join("m"));
    let pairs = pairs();
    let data = tmp.path().join("pairs.json");
    std::fs::write(&data, serde_json::to_string(&pairs).unwrap()).unwrap();
    let shots: Vec<(String, String)> = pairs[..2].to_vec();
    for (dir, eot, kinds) in cases(&tmp.path().join("m")) {
        let out = tmp.path().join("ref.json");
        run_py(
            "template_ref.py",
            &["render", "--model", dir.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--shots", "2"],
        );
        let reference: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(reference.len(), pairs.len());
        let tok = tokenizer(&dir);
        let eot_id = tok.token_id(eot).unwrap();
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        for kind in kinds {
            let t = Template::load(kind, &dir, &tok).unwrap();
            assert_eq!(t.stop_ids(), vec![eot_id], "{case}/{}: end-of-turn token", kind.name());
            let (mut dropped, mut merged) = (0, 0);
            for (i, ((q, a), r)) in pairs.iter().zip(&reference).enumerate() {
                let ids_of = |k: &str| -> Vec<i64> { r[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect() };
                let what = format!("{case}/{} pair {i}", kind.name());
                assert_eq!(t.prompt_text(&[], q).unwrap(), r["prompt_text"].as_str().unwrap(), "{what}: prompt text");
                assert_eq!(t.prompt_ids(&tok, q).unwrap(), ids_of("prompt_ids"), "{what}: prompt ids");
                assert_eq!(t.prompt_text(&shots, q).unwrap(), r["few_shot_text"].as_str().unwrap(), "{what}: few-shot prompt text");
                let (ids, n_context) = t.qa_tokens(&tok, q, a).unwrap();
                let (full, prompt_ids) = (ids_of("full_ids"), ids_of("prompt_ids"));
                assert_eq!(n_context, prompt_ids.len(), "{what}: context = the prompt's tokens");
                assert_eq!(ids[..n_context], prompt_ids[..], "{what}: context = the generation prompt");
                assert_eq!(*ids.last().unwrap(), eot_id, "{what}: the last target is the end-of-turn token");
                if full.starts_with(&prompt_ids) {
                    assert_eq!(ids[..], full[..ids.len()], "{what}: ids are transformers' ids of the conversation");
                    // Only what the template writes after the end-of-turn token is left out.
                    let tail = tok.decode(&full[ids.len()..], false).unwrap();
                    assert!(tail.trim().is_empty(), "{what}: dropped tail {tail:?}");
                    dropped = full.len() - ids.len();
                } else {
                    // The answer's leading whitespace merges with the prompt's last token in the
                    // conversation's tokens: the turn is tokenized on its own after the prompt.
                    let (text, prompt) = (r["full_text"].as_str().unwrap(), r["prompt_text"].as_str().unwrap());
                    let ours = tok.decode(&ids, false).unwrap();
                    assert!(text.starts_with(&ours) && text[ours.len()..].trim().is_empty(), "{what}: {ours:?} vs {text:?}");
                    assert_eq!(ids[n_context..], tok.encode(&ours[prompt.len()..], false).unwrap()[..], "{what}: the turn's own tokens");
                    merged += 1;
                }
            }
            println!(
                "{case}/{}: {} pairs, prompt text + ids, few-shot text equal transformers; conversation ids and targets equal for {} (end of turn {eot}, {dropped} trailing token(s) after it not targets), {merged} answer(s) merging with the prompt tokenized apart",
                kind.name(),
                pairs.len(),
                pairs.len() - merged
            );
        }
    }
}

#[test]
fn named_templates_need_their_special_tokens_and_model_needs_a_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    make_models(&tmp.path().join("m"));
    let chatml = tmp.path().join("m/chatml");
    let err = Template::load(TemplateKind::Llama3Chat, &chatml, &tokenizer(&chatml)).unwrap_err().to_string();
    assert!(err.contains("llama3-chat") && err.contains("<|begin_of_text|>") && err.contains("tokenizer.json"), "{err}");
    // Without a chat template in the directory, `model` is an error naming the choices.
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(chatml.join(f), plain.join(f)).unwrap();
    }
    let err = Template::load(TemplateKind::Model, &plain, &tokenizer(&plain)).unwrap_err().to_string();
    assert!(err.contains("chat_template") && err.contains("phi-qa, llama2-chat, llama3-chat, chatml"), "{err}");
    // A template that does not compile names the file.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(chatml.join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }").unwrap();
    let err = Template::load(TemplateKind::Model, &broken, &tokenizer(&broken)).unwrap_err().to_string();
    assert!(err.contains("chat_template.jinja") && err.contains("does not compile"), "{err}");
    println!("errors: {err}");
}

/// `unlearn score --template` scores exactly the answer + end-of-turn tokens transformers scores.
#[test]
fn score_with_a_template_equals_transformers_answer_nll() {
    let tmp = tempfile::tempdir().unwrap();
    make_models(&tmp.path().join("m"));
    let records: Vec<Value> = pairs().iter().map(|(q, a)| serde_json::json!({"question": q, "answer": a})).collect();
    let data = tmp.path().join("qa.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    for (name, eot, template) in [
        ("llama2", "</s>", "llama2-chat"),
        ("llama3", "<|eot_id|>", "model"),
        ("llama32", "<|eot_id|>", "model"),
        ("chatml", "<|im_end|>", "chatml"),
    ] {
        let dir = tmp.path().join("m").join(name);
        let (ours, theirs) = (tmp.path().join(format!("{name}.ours.jsonl")), tmp.path().join(format!("{name}.hf.jsonl")));
        let (ok, _, err) = run_unlearn(&[
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            ours.to_str().unwrap(),
            "--template",
            template,
            "--device",
            "cpu",
        ]);
        assert!(ok, "{err}");
        run_py(
            "template_ref.py",
            &["score", "--model", dir.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", theirs.to_str().unwrap(), "--eot", eot],
        );
        let read =
            |p: &Path| -> Vec<Value> { std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
        let (ours, theirs) = (read(&ours), read(&theirs));
        assert_eq!((ours.len(), theirs.len()), (records.len(), records.len()));
        let mut worst = 0f64;
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a["tokens"], b["tokens"], "{name}: scored token counts differ");
            let (x, y) = (a["nll"].as_f64().unwrap(), b["nll"].as_f64().unwrap());
            worst = worst.max((x - y).abs() / y.abs());
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{name}: NLL {x} vs transformers {y}");
        }
        println!("{name} --template {template}: {} answers, token counts equal, max relative NLL difference {worst:.2e}", records.len());
    }
}

/// A fake hub cache holding `dir` as `org/name`, laid out as huggingface_hub lays it out
/// (blobs, snapshot symlinks, refs/main).
fn fake_hub(cache: &Path, id: &str, dir: &Path) -> PathBuf {
    let (org, name) = id.split_once('/').unwrap();
    let repo = cache.join(format!("models--{org}--{name}"));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let blob = repo.join("blobs").join(format!("blob-{}", e.file_name().to_string_lossy()));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(blob.file_name().unwrap()), snap.join(e.file_name())).unwrap();
    }
    snap
}

#[test]
fn run_from_a_hub_id_with_a_chat_template_then_eval_uses_the_runs_template() {
    let tmp = tempfile::tempdir().unwrap();
    make_models(&tmp.path().join("m"));
    let cache = tmp.path().join("hub");
    let snap = fake_hub(&cache, "tiny-org/tiny-chatml", &tmp.path().join("m/chatml"));
    let unlearn = |args: &[&str]| {
        let out = std::process::Command::new(unlearn_bin()).args(args).env("HF_HUB_CACHE", &cache).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let tofu = shared_data().join("tofu");
    let run_dir = tmp.path().join("run");
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"tiny-org/tiny-chatml\"\ndevice = \"cpu\"\n[data]\nforget = \"{}\"\nforget_limit = 8\ntemplate = \"chatml\"\n\
             [method]\nname = \"ga\"\n[optim]\nname = \"adamw\"\nlr = 1e-4\n[train]\nsteps = 2\nbatch_size = 2\nmax_len = 128\nout_dir = \"{}\"\n",
            tofu.join("forget01.json").display(),
            run_dir.display()
        ),
    )
    .unwrap();
    let (ok, err) = unlearn(&["run", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let resolved = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
    assert!(resolved.contains("template = \"chatml\""), "{resolved}");
    assert!(resolved.contains(snap.to_str().unwrap()), "the resolved config names the snapshot: {resolved}");

    let eval_dir = tmp.path().join("eval");
    let final_dir = run_dir.join("final");
    let (ok, err) = unlearn(&[
        "eval",
        "tofu",
        "--model",
        final_dir.to_str().unwrap(),
        "--out",
        eval_dir.to_str().unwrap(),
        "--forget",
        "forget01",
        "--data",
        tofu.to_str().unwrap(),
        "--max-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(eval_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["template"]["name"], "chatml", "{}", report["template"]);
    assert!(report["template"]["source"].as_str().unwrap().contains("config.toml"), "{}", report["template"]);
    let samples = std::fs::read_to_string(eval_dir.join("samples.jsonl")).unwrap();
    assert!(samples.contains("<|im_start|>user\\n"), "eval prompts are ChatML: {}", &samples[..samples.len().min(400)]);

    // MUSE KnowMem with a chat template: the 10 ICL pairs are earlier turns of the conversation.
    let muse_dir = tmp.path().join("eval-muse");
    let (ok, err) = unlearn(&[
        "eval",
        "muse",
        "--model",
        final_dir.to_str().unwrap(),
        "--out",
        muse_dir.to_str().unwrap(),
        "--data",
        shared_data().join("muse/news").to_str().unwrap(),
        "--parts",
        "knowmem-f",
        "--max-samples",
        "2",
        "--max-new-tokens-knowmem",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let first: Value =
        serde_json::from_str(std::fs::read_to_string(muse_dir.join("samples.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let prompt = first["prompt"].as_str().unwrap();
    assert_eq!(prompt.matches("<|im_start|>assistant\n").count(), 11, "10 ICL answers and the generation prompt: {prompt}");
    assert!(prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");

    // Truth statistics of a chatml evaluation cannot serve a phi-qa one.
    let (ok, err) = unlearn(&[
        "eval",
        "tofu",
        "--model",
        final_dir.to_str().unwrap(),
        "--out",
        tmp.path().join("eval2").to_str().unwrap(),
        "--forget",
        "forget01",
        "--data",
        tofu.to_str().unwrap(),
        "--max-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--template",
        "phi-qa",
        "--retain-stats",
        eval_dir.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("`chatml` prompt template"), "{err}");

    // The hub id works for --model too, and a missing one names the cache it looked in.
    let scores = tmp.path().join("scores.jsonl");
    let data = tofu.join("forget01.json");
    let (ok, err) = unlearn(&[
        "score",
        "--model",
        "tiny-org/tiny-chatml",
        "--data",
        data.to_str().unwrap(),
        "--out",
        scores.to_str().unwrap(),
        "--limit",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let (ok, err) = unlearn(&["score", "--model", "tiny-org/absent", "--data", data.to_str().unwrap(), "--out", scores.to_str().unwrap()]);
    assert!(!ok && err.contains(cache.join("models--tiny-org--absent").to_str().unwrap()) && err.contains("HF_HUB_CACHE"), "{err}");
    println!(
        "run from tiny-org/tiny-chatml (snapshot {}), eval template {}, missing id: {}",
        snap.display(),
        report["template"],
        err.trim()
    );

    // An unknown template value is refused with the allowed values.
    let (ok, err) = unlearn(&["run", "--config", cfg.to_str().unwrap(), "--set", "data.template=llama3"]);
    assert!(!ok && err.contains("data.template") && err.contains("phi-qa, llama2-chat, llama3-chat, chatml, model"), "{err}");
}
