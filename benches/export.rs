//! Export and inference figures for the SmolLM2 demo model (prints numbers; asserts nothing).
//!
//! * `unlearn export` wall time and peak RSS (the child's `ru_maxrss` from `wait4`, and its
//!   anonymous / file-backed split sampled from /proc), for fp32 inline, fp32 with external
//!   data, and fp16, next to the size of the weights.
//! * `unlearn verify` on the fp32 export: max |logit difference| against the tch model.
//! * onnxruntime CPU greedy-generation throughput (cache graph, batch 1, a fixed number of new
//!   tokens) against transformers `generate` on the same prompts and thread count
//!   (tests/py/onnx_ref.py hf-bench), printed as a ratio.
//!
//! Model: `$UNLEARN_BENCH_MODEL`, default ~/.cache/unlearn/models/smollm2-135m-instruct.
//! Threads: `$UNLEARN_BENCH_THREADS`, default 2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use unlearn::data::Tokenizer;
use unlearn::export::runtime::Decoder;
use unlearn::export::verify::BUILTIN_PROMPTS;
use unlearn::model::Config;

const NEW_TOKENS: usize = 32;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_unlearn"))
}

/// What a child process cost: wall time, peak RSS (`ru_maxrss`), and the peaks of its anonymous
/// and file-backed resident memory sampled from /proc (the checkpoint is memory-mapped, so its
/// pages show up as file-backed RSS: reclaimable page cache, not memory the exporter holds).
struct Measured {
    ok: bool,
    secs: f64,
    peak_rss_mb: f64,
    peak_anon_mb: f64,
    peak_file_mb: f64,
    stdout: String,
}

/// `RssAnon` and `RssFile` of a live process, in MB.
fn rss_split(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((kb("RssAnon:")? / 1024.0, kb("RssFile:")? / 1024.0))
}

/// Run a command to completion, sampling its memory every 10 ms.
/// The child is reaped with `wait4` (for its own rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> Measured {
    let out_file = std::env::temp_dir().join(format!("unlearn-bench-{}.out", std::process::id()));
    cmd.stdout(std::fs::File::create(&out_file).expect("temp file"));
    let t0 = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let (mut anon, mut file) = (0f64, 0f64);
    let mut status = 0i32;
    // SAFETY: plain syscalls on our own child; rusage is a POD out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        if let Some((a, f)) = rss_split(pid) {
            (anon, file) = (anon.max(a), file.max(f));
        }
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid as i32 {
            break;
        }
        assert!(r == 0, "wait4 failed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let secs = t0.elapsed().as_secs_f64();
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let _ = std::fs::remove_file(&out_file);
    Measured {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        secs,
        peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
        peak_anon_mb: anon,
        peak_file_mb: file,
        stdout,
    }
}

fn dir_mb(dir: &Path) -> f64 {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum::<u64>() as f64 / 1e6).unwrap_or(0.0)
}

fn python() -> PathBuf {
    std::env::var_os("UNLEARN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/unlearn/venv/bin/python"))
}

/// CPU seconds (user + system, all threads) this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a POD struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Throughput of one side: generated tokens per wall second and per CPU second, prefill tokens
/// per wall second. CPU seconds are less disturbed than wall time on a shared machine.
struct Throughput {
    gen_per_s: f64,
    gen_per_cpu_s: f64,
    prefill_per_s: f64,
}

/// Greedy decoding of `n` tokens per prompt (batch 1, never stopping early) with onnxruntime.
fn ort_throughput(dec: &mut Decoder, prompts: &[Vec<i64>], n: usize) -> Throughput {
    let greedy = |dec: &mut Decoder, p: &[i64]| {
        let mut past = dec.empty_past(1).unwrap();
        let (mut ids, mut t) = (p.to_vec(), p.len());
        let mut pos: Vec<i64> = (0..t as i64).collect();
        for _ in 0..n {
            let mut out = dec.run(&ids, &vec![1; t], &pos, 1, past.take()).unwrap();
            past = out.present.take();
            let last = &out.logits[out.logits.len() - out.vocab..];
            let next = (0..out.vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as i64;
            ids = vec![next];
            pos = vec![t as i64];
            t += 1;
        }
    };
    greedy(dec, &prompts[0]); // warm-up
    let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for p in prompts {
            greedy(dec, p);
        }
        wall = wall.min(t0.elapsed().as_secs_f64());
        cpu = cpu.min(cpu_seconds() - c0);
    }
    let t0 = Instant::now();
    for p in prompts {
        let past = dec.empty_past(1).unwrap();
        let pos: Vec<i64> = (0..p.len() as i64).collect();
        dec.run(p, &vec![1; p.len()], &pos, 1, past).unwrap();
    }
    let prefill = t0.elapsed().as_secs_f64();
    let prefill_tokens: usize = prompts.iter().map(Vec::len).sum();
    let generated = (n * prompts.len()) as f64;
    Throughput { gen_per_s: generated / wall, gen_per_cpu_s: generated / cpu, prefill_per_s: prefill_tokens as f64 / prefill }
}

fn main() {
    let model = std::env::var_os("UNLEARN_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/unlearn/models/smollm2-135m-instruct"));
    let threads: usize = std::env::var("UNLEARN_BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    if !model.join("config.json").exists() {
        println!("export bench: no model at {} (set UNLEARN_BENCH_MODEL); nothing measured", model.display());
        return;
    }
    let tmp = std::env::temp_dir().join(format!("unlearn-export-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let weights_mb = dir_mb(&model);
    println!("model {} ({weights_mb:.0} MB on disk), {threads} threads", model.display());

    let variants: [(&str, &[&str]); 3] = [
        ("fp32 inline, kv-cache", &["--kv-cache"]),
        ("fp32 external, kv-cache", &["--kv-cache", "--external-threshold-bytes", "1000000"]),
        ("fp16 inline, kv-cache", &["--kv-cache", "--dtype", "fp16"]),
    ];
    let mut fp32_dir = None;
    for (i, (name, extra)) in variants.iter().enumerate() {
        let out = tmp.join(format!("onnx{i}"));
        let mut cmd = Command::new(bin());
        cmd.args(["export", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(*extra).env("RUST_LOG", "warn");
        let m = run_measured(&mut cmd);
        println!(
            "export {name:<24} {}: {:6.2} s, peak RSS {:5.0} MB (anonymous {:4.0} MB, file-backed {:4.0} MB), output {:.0} MB",
            if m.ok { "ok    " } else { "FAILED" },
            m.secs,
            m.peak_rss_mb,
            m.peak_anon_mb,
            m.peak_file_mb,
            dir_mb(&out)
        );
        if i == 0 && m.ok {
            fp32_dir = Some(out);
        }
    }
    let Some(onnx) = fp32_dir else { return };

    let mut cmd = Command::new(bin());
    cmd.args(["verify", "--model", model.to_str().unwrap(), "--onnx", onnx.to_str().unwrap(), "--device", "cpu"])
        .args(["--threads", &threads.to_string()])
        .env("RUST_LOG", "warn");
    let m = run_measured(&mut cmd);
    println!("verify fp32 {}: {:.1} s, peak RSS {:.0} MB", if m.ok { "passed" } else { "FAILED" }, m.secs, m.peak_rss_mb);
    for line in m.stdout.lines() {
        println!("  | {line}");
    }

    let cfg = Config::from_file(&model.join("config.json")).unwrap();
    let tok = Tokenizer::from_model_dir(&model, &cfg).unwrap();
    let prompts: Vec<Vec<i64>> = BUILTIN_PROMPTS.iter().map(|p| tok.encode(p, true).unwrap()).collect();
    let mut dec = Decoder::open(&onnx.join("model.onnx"), threads).unwrap();
    let ort = ort_throughput(&mut dec, &prompts, NEW_TOKENS);
    println!(
        "onnxruntime CPU: {:.1} generated tokens/s ({:.1} per CPU-second; batch 1, {NEW_TOKENS} new tokens x {} prompts), prefill {:.0} tokens/s",
        ort.gen_per_s,
        ort.gen_per_cpu_s,
        prompts.len(),
        ort.prefill_per_s
    );
    let pfile = tmp.join("prompts.json");
    std::fs::write(&pfile, serde_json::to_string(&prompts).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/onnx_ref.py");
    let out = Command::new(python())
        .arg(script)
        .args(["hf-bench", "--model", model.to_str().unwrap(), "--prompts", pfile.to_str().unwrap()])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string(), "--threads", &threads.to_string()])
        .output()
        .expect("spawn python");
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(hf) => {
            let get = |k: &str| hf[k].as_f64().unwrap_or(f64::NAN);
            let hf_tp = Throughput {
                gen_per_s: get("tokens_per_s"),
                gen_per_cpu_s: get("tokens_per_cpu_s"),
                prefill_per_s: get("prefill_tokens_per_s"),
            };
            println!(
                "transformers {} CPU: {:.1} generated tokens/s ({:.1} per CPU-second), prefill {:.0} tokens/s",
                hf["torch"].as_str().unwrap_or("?"),
                hf_tp.gen_per_s,
                hf_tp.gen_per_cpu_s,
                hf_tp.prefill_per_s
            );
            println!(
                "ratio onnxruntime / transformers: generation {:.2}x (per CPU-second {:.2}x), prefill {:.2}x",
                ort.gen_per_s / hf_tp.gen_per_s,
                ort.gen_per_cpu_s / hf_tp.gen_per_cpu_s,
                ort.prefill_per_s / hf_tp.prefill_per_s
            );
        }
        Err(_) => println!("transformers bench failed:\n{}", String::from_utf8_lossy(&out.stderr)),
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
