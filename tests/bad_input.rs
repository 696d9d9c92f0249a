//! Bad input to every command: each case runs the binary and must exit non-zero (no panic, no
//! hang) with a message naming the file or field and the problem, and leave its directory exactly
//! as it was: nothing half-written, nothing of the user's deleted (the whole case directory is
//! snapshotted before and compared after). Inputs are built here in milliseconds (tests/common/tiny.rs).

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tiny::*;
use common::unlearn_bin;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

thread_local! {
    /// Cases passed by the test running on this thread (each test has its own thread).
    static CASES: Cell<usize> = const { Cell::new(0) };
}

/// A case may not take longer than this (a hang in open() or an allocation loop shows up here).
const CASE_TIMEOUT: Duration = Duration::from_secs(180);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every path under `dir` with its content (FIFOs and other special files by kind only, unread).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                stack.push(p);
            } else if meta.is_file() {
                out.insert(rel, std::fs::read(&p).unwrap());
            } else {
                out.insert(rel, b"<special>".to_vec());
            }
        }
    }
    out
}

fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, after: &BTreeMap<PathBuf, Vec<u8>>, what: &str) {
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<_> = before.iter().filter(|(k, v)| after.get(*k).is_some_and(|w| w != *v)).map(|(k, _)| k).collect();
    assert!(
        added.is_empty() && removed.is_empty() && changed.is_empty(),
        "{what}: the case directory changed: added {added:?}, removed {removed:?}, changed {changed:?}"
    );
}

/// Run the binary in `cwd`; (exit code, None when killed by a signal; stderr). Panics on a hang.
fn run_bin(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(unlearn_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unlearn");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let start = Instant::now();
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(out) => {
            let out = out.unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
        Err(_) => {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("unlearn {args:?} hung for {:.0} s", start.elapsed().as_secs_f64());
        }
    }
}

/// The command must fail cleanly with every needle in its message and change nothing in `dir`.
fn refused(dir: &Path, args: &[&str], needles: &[&str]) -> String {
    let before = snapshot(dir);
    let (code, err) = run_bin(dir, args);
    let what = format!("unlearn {}", args.join(" "));
    let message = err.lines().rfind(|l| l.contains("error")).unwrap_or_default().to_string();
    println!("{}: {message}", args[..2.min(args.len())].join(" "));
    assert!(code.is_some(), "{what}: killed by a signal:\n{err}");
    assert!(code != Some(0), "{what}: succeeded, expected a refusal:\n{err}");
    assert!(code != Some(101) && !err.contains("panicked"), "{what}: panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: the message lacks {n:?}:\n{err}");
    }
    assert_unchanged(&before, &snapshot(dir), &what);
    CASES.with(|c| c.set(c.get() + 1));
    err
}

fn succeeds(dir: &Path, args: &[&str]) -> String {
    let (code, err) = run_bin(dir, args);
    assert_eq!(code, Some(0), "unlearn {} failed:\n{err}", args.join(" "));
    err
}

fn report(test: &str) {
    println!("{test}: {} bad-input cases passed", CASES.with(Cell::get));
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// A safetensors file from a header object and its data bytes; `pad` extra spaces after the
/// header JSON (used to misalign the data section).
fn raw_safetensors(header: &Value, data: &[u8], pad: usize) -> Vec<u8> {
    let mut text = header.to_string();
    text.push_str(&" ".repeat(pad));
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Inputs shared by the cases of one test: a tiny model, forget and retain data.
type Fixture = TinyInputs;

fn fixture() -> Fixture {
    tiny_inputs()
}

/// What the cases do with the inputs.
impl Fixture {
    /// A fresh, empty directory for one case (what the case may touch and must leave alone).
    fn case(&self, name: &str) -> PathBuf {
        let d = self.root.join("cases").join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A copy of the tiny model inside `dir`.
    fn model_copy(&self, dir: &Path) -> PathBuf {
        copy_dir(&self.model, &dir.join("model"))
    }

    /// A GradDiff run config (all parameters trainable, checkpoint every 2 of 4 steps).
    fn run_config(&self, dir: &Path, model: &Path, out: &Path) -> PathBuf {
        let p = dir.join("run.toml");
        std::fs::write(
            &p,
            format!(
                "[model]\npath = {model:?}\ntrainable = \"all\"\ndevice = \"cpu\"\n[data]\nforget = {:?}\nretain = {:?}\n\
                 [method]\nname = \"graddiff\"\n[optim]\nname = \"sgd\"\nlr = 0.01\n\
                 [train]\nsteps = 4\nbatch_size = 2\nmax_len = 128\ncheckpoint_every = 2\nout_dir = {out:?}\n",
                self.forget, self.retain
            ),
        )
        .unwrap();
        p
    }

    fn score_args<'a>(&'a self, model: &'a Path, out: &'a Path) -> Vec<&'a str> {
        vec!["score", "--model", s(model), "--data", s(&self.forget), "--out", s(out), "--device", "cpu"]
    }
}

#[test]
fn run_configs_and_data_files() {
    let f = fixture();
    let d = f.case("run-config");
    let out = d.join("out");
    let cfg = f.run_config(&d, &f.model, &out);
    let run = |sets: &[&str], needles: &[&str]| {
        let mut args = vec!["run", "--config", s(&cfg)];
        for x in sets {
            args.extend(["--set", x]);
        }
        refused(&d, &args, needles)
    };
    // Out-of-range values (regressions: these were already refused).
    run(&["train.steps=-1"], &["run.toml", "train.steps", ">= 1"]);
    run(&["train.batch_size=0"], &["run.toml", "train.batch_size", ">= 1"]);
    run(&["train.max_len=0"], &["run.toml", "train.max_len", ">= 2"]);
    run(&["optim.lr=nan"], &["run.toml", "optim.lr", "finite number > 0"]);
    run(&["dist.bucket_mb=0"], &["run.toml", "dist.bucket_mb", "> 0"]);
    run(&["dist.zero=7"], &["run.toml", "dist.zero", "0, 1, 2 or 3"]);
    run(&["train.stepz=3"], &["train.stepz", "unknown key"]);
    // Regression: a billion sequences per batch grew to 15.8 GB and aborted; now refused up front.
    let t = Instant::now();
    run(&["train.batch_size=1000000000"], &["run.toml", "train.batch_size", "limit"]);
    assert!(t.elapsed() < Duration::from_secs(60), "the refusal must come before any allocation");
    run(&["train.batch_size=4096", "train.max_len=1048576"], &["train.batch_size", "2^31 tokens"]);
    run(&["train.max_len=100000000"], &["train.max_len", "limit"]);
    // Forget and retain the same set: the same file, and a copy of it.
    run(&[&format!("data.retain={:?}", s(&f.forget))], &["data.retain", "same content", "forget.json"]);
    let copy = d.join("forget-copy.json");
    std::fs::copy(&f.forget, &copy).unwrap();
    run(&[&format!("data.retain={:?}", s(&copy))], &["data.retain", "forget-copy.json", "same content"]);
    std::fs::remove_file(&copy).unwrap();
    // A TOML syntax error keeps its position.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[model\npath = 1\n").unwrap();
    refused(&d, &["run", "--config", s(&bad)], &["bad.toml", "line 1"]);
    std::fs::remove_file(&bad).unwrap();
    // A model directory that is not one.
    run(&[&format!("model.path={:?}", s(&d))], &["model.path", "no config.json"]);

    // Data files: invalid UTF-8 (named with its line), a 10 MB record, a FIFO, no records.
    let dd = f.case("run-data");
    let out = dd.join("out");
    let cfg = f.run_config(&dd, &f.model, &out);
    let with_forget = |name: &str, bytes: Option<&[u8]>, needles: &[&str]| {
        let p = dd.join(name);
        match bytes {
            Some(b) => std::fs::write(&p, b).unwrap(),
            None => mkfifo(&p),
        }
        refused(&dd, &["run", "--config", s(&cfg), "--set", &format!("data.forget={:?}", s(&p))], needles);
        std::fs::remove_file(&p).unwrap();
    };
    let mut latin1 = b"[{\"question\": \"Who?\",\n \"answer\": \"Ren".to_vec();
    latin1.extend_from_slice(&[0xe9, 0xe9]);
    latin1.extend_from_slice(b"\"}]\n");
    with_forget("latin1.json", Some(&latin1), &["latin1.json", "line 2", "not valid UTF-8"]);
    let huge = json!([{"question": "q", "answer": "a"}, {"question": "Long?", "answer": "x".repeat(10 << 20)}]).to_string();
    with_forget("huge.json", Some(huge.as_bytes()), &["huge.json", "record 1", "10.5 MB", "limit of 8 MiB"]);
    with_forget("fifo.json", None, &["fifo.json", "FIFO"]);
    with_forget("empty.json", Some(b"[]"), &["empty.json", "no records"]);
    with_forget("keys.json", Some(br#"[{"q": "x", "a": "y"}]"#), &["keys.json", "record 0", "not a known layout"]);
    report("run_configs_and_data_files");
}

#[test]
fn resume_refuses_what_it_cannot_continue() {
    let f = fixture();
    let base = f.root.join("trained");
    let cfg = f.run_config(&f.root, &f.model, &base);
    succeeds(&f.root, &["run", "--config", s(&cfg)]);
    let step4 = |run: &Path| run.join("checkpoints/step-000004");
    let shard = |run: &Path| step4(run).join("shard-00000-of-00001.safetensors");
    // Each case gets its own copy of the finished run.
    let copy = |name: &str| {
        let d = f.case(name);
        copy_tree(&base, &d.join("run"));
        (d.clone(), d.join("run"))
    };
    let resume = |d: &Path, run: &Path, sets: &[&str], needles: &[&str]| {
        let mut args = vec!["run", "--resume", s(run)];
        for x in sets {
            args.extend(["--set", x]);
        }
        refused(d, &args, needles)
    };
    let edit_shard = |run: &Path, f: &dyn Fn(Tensor) -> Tensor| {
        let p = shard(run);
        let ts: Vec<(String, Tensor)> = Tensor::read_safetensors(&p).unwrap().into_iter().map(|(n, t)| (n, f(t))).collect();
        write_tensors(&p, &ts);
    };

    // Not a run at all.
    let (d, _) = copy("not-a-run");
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    resume(&d, &empty, &[], &["empty", "not a run directory", "--config"]);

    // Shards: too short, F16, F64 (regressions: a panic, a panic and f32 garbage), missing.
    let (d, run) = copy("short-shard");
    edit_shard(&run, &|t| t.narrow(0, 0, 100));
    resume(&d, &run, &["train.steps=6"], &["shard-00000-of-00001.safetensors", "`master`", "shape [100]", "F32 of shape"]);
    let (d, run) = copy("f16-shard");
    edit_shard(&run, &|t| t.to_kind(Kind::Half));
    resume(&d, &run, &["train.steps=6"], &["shard-00000-of-00001.safetensors", "`master` is F16"]);
    let (d, run) = copy("f64-shard");
    edit_shard(&run, &|t| t.to_kind(Kind::Double));
    resume(&d, &run, &["train.steps=6"], &["shard-00000-of-00001.safetensors", "`master` is F64"]);
    let (d, run) = copy("missing-shard");
    std::fs::remove_file(shard(&run)).unwrap();
    resume(&d, &run, &["train.steps=6"], &["shard-00000-of-00001.safetensors", "missing"]);

    // meta.json: corrupt, claiming step 1e6 (inside step-000004, and as a real step-1000000),
    // an impossible layout; `latest` pointing outside the run.
    let (d, run) = copy("corrupt-meta");
    let meta = step4(&run).join("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, &text[..text.len() / 2]).unwrap();
    resume(&d, &run, &["train.steps=6"], &["step-000004/meta.json", "not a checkpoint meta file"]);
    let (d, run) = copy("meta-step-1e6");
    edit_json(&step4(&run).join("meta.json"), |v| v["step"] = json!(1_000_000));
    resume(&d, &run, &["train.steps=6"], &["meta.json", "`step` is 1000000", "step-000004"]);
    let (d, run) = copy("step-beyond-steps");
    let ck = run.join("checkpoints");
    edit_json(&step4(&run).join("meta.json"), |v| v["step"] = json!(1_000_000));
    std::fs::rename(step4(&run), ck.join("step-1000000")).unwrap();
    std::fs::write(ck.join("latest"), "step-1000000").unwrap();
    resume(&d, &run, &[], &["train.steps", "4 is below the step of the checkpoint", "1000000"]);
    let (d, run) = copy("meta-zero-shards");
    edit_json(&step4(&run).join("meta.json"), |v| v["layout"]["shards"] = json!(0));
    resume(&d, &run, &["train.steps=6"], &["meta.json", "`layout`", "`shards`"]);
    let (d, run) = copy("meta-bad-layout");
    edit_json(&step4(&run).join("meta.json"), |v| v["layout"]["params"][1]["numel"] = json!(1i64 << 40));
    resume(&d, &run, &["train.steps=6"], &["meta.json", "`layout`", "does not match its shape"]);
    let (d, run) = copy("latest-escapes");
    std::fs::write(run.join("checkpoints/latest"), "../../../etc").unwrap();
    resume(&d, &run, &["train.steps=6"], &["checkpoints/latest", "\"../../../etc\"", "refused"]);

    // What the run is asked to do does not fit the checkpoint (regressions: all exited 0).
    let (d, run) = copy("fewer-steps");
    resume(&d, &run, &["train.steps=2"], &["train.steps", "2 is below the step of the checkpoint", "(4)"]);
    let (d, run) = copy("trainable-differs");
    resume(&d, &run, &["model.trainable=\"matrices\"", "train.steps=6"], &["meta.json", "trainable parameters", "model.trainable"]);
    let (d, run) = copy("data-shrank");
    resume(&d, &run, &["data.forget_limit=2", "train.steps=6"], &["forget loader", "beyond the 2 examples"]);

    // A valid shard whose data section is not 4-byte aligned loads as the aligned one does
    // (it was viewed through an unchecked pointer cast before).
    let aligned = f.case("aligned");
    copy_tree(&base, &aligned.join("run"));
    let (_, misaligned) = copy("misaligned");
    let p = shard(&misaligned);
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_str(std::str::from_utf8(&bytes[8..8 + n]).unwrap()).unwrap();
    let pad = (0..8).find(|k| (8 + header.to_string().len() + k) % 4 == 2).unwrap();
    std::fs::write(&p, raw_safetensors(&header, &bytes[8 + n..], pad)).unwrap();
    for run in [aligned.join("run"), misaligned.clone()] {
        succeeds(&f.root, &["run", "--resume", s(&run), "--set", "train.steps=6"]);
    }
    let sorted = |p: PathBuf| {
        let mut v = Tensor::read_safetensors(p).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let a = sorted(aligned.join("run/final/model.safetensors"));
    let b = sorted(misaligned.join("final/model.safetensors"));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na}: resuming from the misaligned shard gave other weights");
    }
    println!("a misaligned shard resumes bit-identically to the aligned one");
    report("resume_refuses_what_it_cannot_continue");
}

#[test]
fn model_directories() {
    let f = fixture();
    let cfg = tiny_config();
    // Each case: a broken copy of the model, scored into a file that must not appear.
    let case = |name: &str, breakage: &dyn Fn(&Path), needles: &[&str]| {
        let d = f.case(name);
        let m = f.model_copy(&d);
        breakage(&m);
        let out = d.join("scores.jsonl");
        let t = Instant::now();
        refused(&d, &f.score_args(&m, &out), needles);
        t.elapsed()
    };
    let st = |m: &Path| m.join("model.safetensors");

    case("no-config", &|m| std::fs::remove_file(m.join("config.json")).unwrap(), &["no config.json"]);
    case("garbled-config", &|m| std::fs::write(m.join("config.json"), "{\"model_type\": ").unwrap(), &["config.json", "not valid JSON"]);
    case("mistral", &|m| edit_json(&m.join("config.json"), |v| v["model_type"] = json!("gpt2")), &["config.json", "model_type `gpt2`"]);
    case(
        "config-fifo",
        &|m| {
            std::fs::remove_file(m.join("config.json")).unwrap();
            mkfifo(&m.join("config.json"));
        },
        &["config.json", "FIFO"],
    );
    case(
        "heads",
        &|m| {
            edit_json(&m.join("config.json"), |v| {
                v["num_attention_heads"] = json!(3);
                v["num_key_value_heads"] = json!(3);
                v.as_object_mut().unwrap().remove("head_dim");
            })
        },
        &["config.json", "hidden_size (32) must be a multiple of num_attention_heads (3)"],
    );
    case(
        "vocab-vs-embedding",
        &|m| edit_json(&m.join("config.json"), |v| v["vocab_size"] = json!(300)),
        &["model.safetensors", "model.embed_tokens.weight", "[258, 32]", "[300, 32]"],
    );
    case(
        "eos-outside-vocab",
        &|m| edit_json(&m.join("config.json"), |v| v["eos_token_id"] = json!(999)),
        &["config.json", "token id 999", "outside the vocabulary"],
    );
    case(
        "absurd-sizes",
        &|m| edit_json(&m.join("config.json"), |v| v["intermediate_size"] = json!(1i64 << 40)),
        &["config.json", "2^42 parameters"],
    );
    case(
        "absurd-layers",
        &|m| edit_json(&m.join("config.json"), |v| v["num_hidden_layers"] = json!(1 << 20)),
        &["config.json", "`num_hidden_layers` is 1048576"],
    );
    case(
        "tokenizer-bigger",
        &|m| {
            let small = unlearn::model::Config { vocab_size: 100, bos_token_id: Some(1), eos_token_ids: vec![2], ..tiny_config() };
            std::fs::write(m.join("config.json"), small.to_hf_json().to_string()).unwrap();
            write_tensors(&st(m), &tiny_tensors(&small, 1));
        },
        &["tokenizer.json", "258 tokens", "vocab_size 100"],
    );
    case("no-tokenizer", &|m| std::fs::remove_file(m.join("tokenizer.json")).unwrap(), &["no tokenizer.json"]);
    case(
        "garbled-tokenizer",
        &|m| std::fs::write(m.join("tokenizer.json"), "{\"model\": 3}").unwrap(),
        &["tokenizer.json", "cannot load tokenizer"],
    );
    case(
        "truncated",
        &|m| {
            let b = std::fs::read(st(m)).unwrap();
            std::fs::write(st(m), &b[..b.len() / 2]).unwrap();
        },
        &["model.safetensors", "truncated or corrupt"],
    );
    // A header claiming a 100 GB tensor, and a header length of 2^62: refused from the file size,
    // before anything is allocated (and fast).
    let elapsed = case(
        "100gb-tensor",
        &|m| {
            let rows = 100_000_000_000u64 / (4 * 32);
            edit_json(&m.join("config.json"), |v| v["vocab_size"] = json!(rows));
            let header = json!({"model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, 32], "data_offsets": [0, rows * 32 * 4]}});
            std::fs::write(st(m), raw_safetensors(&header, &[0u8; 64], 0)).unwrap();
        },
        &["model.safetensors", "not a valid safetensors file"],
    );
    assert!(elapsed < Duration::from_secs(60), "the 100 GB claim took {elapsed:?}");
    case(
        "huge-header-length",
        &|m| {
            let mut b = std::fs::read(st(m)).unwrap();
            b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
            std::fs::write(st(m), b).unwrap();
        },
        &["model.safetensors", "not a valid safetensors file"],
    );
    case(
        "unsupported-dtype",
        &|m| {
            let ts: Vec<_> = tiny_tensors(&cfg, 1).into_iter().map(|(n, t)| (n, t.to_kind(Kind::Int64))).collect();
            write_tensors(&st(m), &ts);
        },
        &["model.safetensors", "unsupported dtype"],
    );
    // Regression: NaN weights scored "mean_nll NaN" with exit 0.
    case(
        "nan-weights",
        &|m| {
            let ts: Vec<_> = tiny_tensors(&cfg, 7)
                .into_iter()
                .map(|(n, t)| {
                    if n == "model.norm.weight" {
                        let _ = t.get(0).fill_(f64::NAN);
                    }
                    (n, t)
                })
                .collect();
            write_tensors(&st(m), &ts);
        },
        &["forget.json", "the NLL is NaN", "weight `model.norm.weight`", "nothing written"],
    );

    // PyTorch pickles are refused with the reason and the conversion.
    for (name, file) in [("pickle-bin", "pytorch_model.bin"), ("pickle-pt", "model.pt")] {
        case(
            name,
            &|m| {
                std::fs::remove_file(st(m)).unwrap();
                std::fs::write(m.join(file), b"PK\x03\x04 pickled").unwrap();
            },
            &[file, "PyTorch pickle", "execute arbitrary code", "save_pretrained"],
        );
    }

    // Sharded index entries: outside the directory, absolute, a FIFO (hung in open()), missing.
    let index = |m: &Path, target: &str| {
        std::fs::remove_file(st(m)).unwrap();
        let names: serde_json::Map<String, Value> =
            unlearn::model::param_specs(&cfg).into_iter().map(|p| (p.name, json!(target))).collect();
        std::fs::write(m.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": names}).to_string()).unwrap();
    };
    let outside = f.root.join("inputs/outside.safetensors");
    std::fs::copy(st(&f.model), &outside).unwrap();
    case(
        "index-dotdot",
        &|m| index(m, "../../../inputs/outside.safetensors"),
        &["model.safetensors.index.json", "../../../inputs/outside.safetensors", "refused"],
    );
    case("index-absolute", &|m| index(m, s(&outside)), &["model.safetensors.index.json", "outside.safetensors", "refused"]);
    case(
        "index-fifo",
        &|m| {
            index(m, "weights.safetensors");
            mkfifo(&m.join("weights.safetensors"));
        },
        &["weights.safetensors", "FIFO"],
    );
    case("index-missing-shard", &|m| index(m, "model-00001-of-00002.safetensors"), &["model-00001-of-00002.safetensors", "No such file"]);
    case(
        "index-not-names",
        &|m| {
            std::fs::write(m.join("model.safetensors.index.json"), json!({"weight_map": {"model.norm.weight": 3}}).to_string()).unwrap();
        },
        &["model.safetensors.index.json", "`model.norm.weight`", "must be a file name"],
    );
    report("model_directories");
}

#[test]
fn score_export_verify_import_report_eval_plan() {
    let f = fixture();

    // score: zero counts, an output that is an input or a directory, a broken data file.
    let d = f.case("score");
    let out = d.join("scores.jsonl");
    let score = f.score_args(&f.model, &out);
    for (flag, v) in [("--limit", "0"), ("--batch-size", "0"), ("--max-len", "0")] {
        let mut a = score.clone();
        a.extend([flag, v]);
        refused(&d, &a, &[flag, "must be at least 1"]);
    }
    let data_copy = d.join("data.json");
    std::fs::copy(&f.forget, &data_copy).unwrap();
    refused(&d, &["score", "--model", s(&f.model), "--data", s(&data_copy), "--out", s(&data_copy)], &["data.json", "is the input"]);
    refused(&d, &["score", "--model", s(&f.model), "--data", s(&data_copy), "--out", s(&d)], &["is a directory"]);
    let mine = d.join("model");
    copy_dir(&f.model, &mine);
    refused(
        &d,
        &["score", "--model", s(&mine), "--data", s(&data_copy), "--out", s(&mine.join("config.json"))],
        &["config.json", "input directory"],
    );
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, b"{\"text\": \"fine\"}\n{\"text\": \"caf\xc3\"}\n").unwrap();
    refused(&d, &["score", "--model", s(&f.model), "--data", s(&bad), "--out", s(&out)], &["bad.jsonl", "line 2", "UTF-8"]);

    // export: the --out rule (regressions: the parent of the model and a user's directory were
    // replaced, deleting the model and the user's files).
    let d = f.case("export");
    let par = d.join("out/par");
    copy_dir(&f.model, &par.join("model"));
    refused(&d, &["export", "--model", s(&par.join("model")), "--out", s(&par)], &["--out contains the input", "model"]);
    refused(&d, &["export", "--model", s(&par.join("model")), "--out", s(&par.join("model"))], &["--out is the input"]);
    refused(&d, &["export", "--model", s(&par.join("model")), "--out", s(&par.join("model/onnx"))], &["--out is inside the input"]);
    let user = d.join("userdir");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "precious").unwrap();
    refused(
        &d,
        &["export", "--model", s(&f.model), "--out", s(&user)],
        &["userdir", "not the output of an earlier `export`", "--overwrite"],
    );
    std::fs::write(user.join("export.json"), "{}").unwrap();
    refused(&d, &["export", "--model", s(&f.model), "--out", s(&user)], &["userdir", "holds files `export` does not write: notes.txt"]);
    std::fs::create_dir_all(user.join("sub")).unwrap();
    refused(&d, &["export", "--model", s(&f.model), "--out", s(&user), "--overwrite"], &["userdir", "directory `sub`"]);
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    refused(&d, &["export", "--model", s(&f.model), "--out", s(&file)], &["a-file", "not a directory"]);
    refused(&d, &["export", "--model", s(&f.model), "--out", s(&d.join("o")), "--opset", "99"], &["--opset 99"]);
    let pickle = d.join("pickle");
    copy_dir(&f.model, &pickle);
    std::fs::remove_file(pickle.join("model.safetensors")).unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), "x").unwrap();
    refused(&d, &["export", "--model", s(&pickle), "--out", s(&d.join("o"))], &["pytorch_model.bin", "pickle"]);
    // What the rule allows: a new directory, an earlier export, and --overwrite of plain files.
    let onnx = f.root.join("onnx");
    succeeds(&f.root, &["export", "--model", s(&f.model), "--out", s(&onnx)]);
    succeeds(&f.root, &["export", "--model", s(&f.model), "--out", s(&onnx)]);
    let user2 = f.root.join("userdir2");
    std::fs::create_dir_all(&user2).unwrap();
    std::fs::write(user2.join("notes.txt"), "replace me").unwrap();
    succeeds(&f.root, &["export", "--model", s(&f.model), "--out", s(&user2), "--overwrite"]);
    assert!(user2.join("model.onnx").exists() && !user2.join("notes.txt").exists());

    // verify: its report must not replace an input; zero prompts; a missing export.
    let d = f.case("verify");
    let export = d.join("onnx");
    copy_dir(&onnx, &export);
    let verify = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["verify", "--model", s(&f.model), "--onnx", s(&export), "--device", "cpu"];
        a.extend(extra);
        refused(&d, &a, needles)
    };
    verify(&["--out", s(&export.join("model.onnx"))], &["model.onnx", "input directory"]);
    verify(&["--prompts", s(&f.forget), "--out", s(&f.forget)], &["forget.json", "is the input"]);
    verify(&["--limit", "0"], &["--limit", "must be at least 1"]);
    refused(&d, &["verify", "--model", s(&f.model), "--onnx", s(&d.join("nothing")), "--device", "cpu"], &["nothing"]);

    // import-gguf: a non-empty --out is never replaced without --overwrite; a file that is not GGUF.
    let d = f.case("import");
    let gguf = d.join("garbage.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00 not really").unwrap();
    let user = d.join("mymodel");
    copy_dir(&f.model, &user);
    refused(&d, &["import-gguf", "--gguf", s(&gguf), "--out", s(&user)], &["mymodel", "--out is not empty", "--overwrite"]);
    refused(&d, &["import-gguf", "--gguf", s(&gguf), "--out", s(&d.join("new"))], &["garbage.gguf"]);
    let fifo = d.join("fifo.gguf");
    mkfifo(&fifo);
    refused(&d, &["import-gguf", "--gguf", s(&fifo), "--out", s(&d.join("new"))], &["fifo.gguf", "FIFO"]);

    // report: missing reports, a user's directory, an --out that holds an input.
    let d = f.case("report");
    let ev = d.join("eval-a");
    std::fs::create_dir_all(&ev).unwrap();
    std::fs::write(ev.join("report.json"), "{\"benchmark\": \"tofu\"}").unwrap();
    refused(&d, &["report", "--reports", s(&d.join("missing")), "--out", s(&d.join("r"))], &["missing", "file not found"]);
    refused(&d, &["report", "--reports", s(&ev), "--out", s(&d.join("r"))], &["eval-a/report.json", "not an `unlearn eval` report"]);
    refused(&d, &["report", "--reports", s(&ev), "--out", s(&d)], &["--out contains the input"]);
    let user = d.join("mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("report.md"), "my notes").unwrap();
    refused(&d, &["report", "--reports", s(&ev), "--out", s(&user)], &["mine", "no comparison.json", "--overwrite"]);
    refused(&d, &["report", "--reports", s(&ev), "--names", "a", "b", "--out", s(&d.join("r"))], &["--names has 2 labels for 1 --reports"]);

    // eval: zero samples, a MUSE directory without any part, the --out rule, a missing split.
    let d = f.case("eval");
    let muse = d.join("muse-empty");
    std::fs::create_dir_all(&muse).unwrap();
    let common = |bench: &'static str, out: &Path| -> Vec<String> {
        ["eval", bench, "--model", s(&f.model), "--out", s(out), "--device", "cpu", "--dist", "none"]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    let eval = |mut a: Vec<String>, extra: &[&str], needles: &[&str]| {
        a.extend(extra.iter().map(|x| x.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&d, &a, needles)
    };
    // Regression: no part at all gave an empty report and exit 0.
    eval(common("muse", &d.join("o")), &["--data", s(&muse)], &["muse-empty", "no MUSE part", "verbmem"]);
    eval(common("muse", &d.join("o")), &["--data", s(&muse), "--max-samples", "0"], &["--max-samples", "must be at least 1"]);
    eval(common("muse", &d.join("o")), &["--data", s(&muse), "--parts", "verbmem"], &["verbmem/forget.json", "requested part `verbmem`"]);
    let tofu = d.join("tofu");
    std::fs::create_dir_all(&tofu).unwrap();
    eval(
        common("tofu", &d.join("o")),
        &["--data", s(&tofu), "--forget", "forget01", "--max-samples", "0"],
        &["--max-samples", "must be at least 1"],
    );
    eval(common("tofu", &d.join("o")), &["--data", s(&tofu), "--forget", "forget01"], &["tofu/forget01"]);
    let user = d.join("mine");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("results.csv"), "1,2").unwrap();
    eval(common("tofu", &user), &["--data", s(&tofu), "--forget", "forget01"], &["mine", "no report.json", "--overwrite"]);
    eval(common("tofu", &f.model), &["--data", s(&tofu), "--forget", "forget01"], &["--out is the input"]);
    eval(common("muse", &muse.join("out")), &["--data", s(&muse)], &["--out is inside the input", "muse-empty"]);

    // plan: the same config checks as run.
    let d = f.case("plan");
    let cfg = f.run_config(&d, &f.model, &d.join("out"));
    refused(
        &d,
        &["plan", "--config", s(&cfg), "--world-size", "2", "--set", "train.batch_size=1000000000"],
        &["train.batch_size", "limit"],
    );
    refused(&d, &["plan", "--config", s(&cfg), "--world-size", "2", "--set", "dist.zero=7"], &["dist.zero"]);
    report("score_export_verify_import_report_eval_plan");
}
