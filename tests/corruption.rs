//! Randomized corruption of every input the program parses: safetensors files (header length,
//! header JSON, data), config.json, tokenizer.json, run TOML, data files (JSON, JSON lines, text)
//! and checkpoints (meta.json, shard files). Each mutated input goes through the library's own
//! loading functions in-process; a sample goes through the binary under a 1 GiB address-space
//! limit. Every input must give `Ok` or an error, never a panic, never a hang (a watchdog aborts
//! a case that runs longer than `CASE_LIMIT`, printing its seed) and never a large allocation (a
//! counting allocator refuses any thread's allocation that would bring it above `ALLOC_LIMIT`
//! during a case, so a parser sizing memory from a corrupted number fails the test instead of
//! the machine).
//!
//! Seeded and reproducible: `UNLEARN_CORRUPTION_SEED` (default below) and
//! `UNLEARN_CORRUPTION_CASES` (inputs per family, default 600). A failing case prints its family,
//! index and seed; rerun it alone with `UNLEARN_CORRUPTION_ONLY=<family>:<index>`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tiny::*;
use common::unlearn_bin;
use tch::{Device, Kind, Tensor};
use unlearn::data::loader::SplitMix64;

const DEFAULT_SEED: u64 = 0x5eed_c0de;
const DEFAULT_CASES: usize = 600;
/// Longest a single in-process case may run.
const CASE_LIMIT: Duration = Duration::from_secs(30);
/// Most a thread may hold, above what it held when the case began (inputs here are < 1 MiB;
/// the largest legitimate allocation is a tokenized 8 MiB record).
const ALLOC_LIMIT: usize = 512 << 20;

// ---------------------------------------------------------------------------------------------
// A counting allocator: per-thread bytes held while a case runs, and a refusal above the limit.

struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// `Some(base)` while a case runs on this thread: allocations beyond base + limit fail.
    static GUARD: Cell<Option<isize>> = const { Cell::new(None) };
    /// Whether an allocation was refused on this thread since the flag was last cleared.
    static REFUSED: Cell<bool> = const { Cell::new(false) };
}

fn account(delta: isize) -> bool {
    HELD.with(|h| {
        let now = h.get() + delta;
        if delta > 0 {
            if let Some(base) = GUARD.with(Cell::get) {
                if now - base > ALLOC_LIMIT as isize {
                    REFUSED.with(|r| r.set(true));
                    say_refused(delta as u64);
                    return false;
                }
            }
        }
        h.set(now);
        PEAK.with(|p| p.set(p.get().max(now)));
        true
    })
}

/// Name the refused allocation and the case on stderr without allocating (the process may abort
/// right after, in `handle_alloc_error`).
fn say_refused(size: u64) {
    fn hex(mut v: u64, out: &mut [u8; 16]) {
        for i in (0..16).rev() {
            out[i] = b"0123456789abcdef"[(v & 15) as usize];
            v >>= 4;
        }
    }
    let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
    hex(size, &mut a);
    hex(CURRENT_SEED.load(Ordering::SeqCst), &mut b);
    for part in [&b"corruption: refused an allocation of 0x"[..], &a, b" bytes in the case of seed 0x", &b, b"\n"] {
        // SAFETY: writing a valid buffer to stderr.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size() as isize) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !account(layout.size() as isize) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !account(new_size as isize - layout.size() as isize) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The case currently running on some thread, for the allocation-failure and hang messages.
static CURRENT_SEED: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------------
// Mutations.

const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"-1",
    b"0",
    b"1e308",
    b"-1e308",
    b"99999999999999999999",
    b"18446744073709551615",
    b"9223372036854775807",
    b"null",
    b"true",
    b"NaN",
    b"inf",
    b"\\u0000",
    b"\\ud800",
    b"\xff\xfe",
    b"\x00",
    b"\n",
    b"\"__metadata__\"",
    b"\"F16\"",
    b"\"F64\"",
    b"\"I64\"",
    b"\"BOOL\"",
    b"[]",
    b"{}",
    b"..",
    b"/",
    b"=",
    b"[[a]]",
    b"'''",
    b"\"\"\"",
];

fn below(rng: &mut SplitMix64, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        rng.below(n)
    }
}

/// 1 to 4 random edits (one, half of the time): bit flips, byte sets, truncation, splices, deletions, token insertions,
/// numbers made huge or negative, deep nesting, duplication.
fn mutate(rng: &mut SplitMix64, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    // One edit half of the time, so that many inputs stay close to valid and reach deeper checks.
    let edits = if rng.below(2) == 0 { 1 } else { 2 + rng.below(3) };
    for _ in 0..edits {
        let pos = below(rng, b.len() + 1);
        match rng.below(10) {
            0 => {
                if !b.is_empty() {
                    let i = below(rng, b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                if !b.is_empty() {
                    let i = below(rng, b.len());
                    b[i] = rng.next_u64() as u8;
                }
            }
            2 => b.truncate(pos),
            3 => {
                let a = below(rng, input.len());
                let len = below(rng, (input.len() - a).min(4096) + 1);
                let chunk = input[a..a + len].to_vec();
                b.splice(pos..pos, chunk);
            }
            4 => {
                let len = below(rng, (b.len() - pos).min(256) + 1);
                b.drain(pos..pos + len);
            }
            5 | 6 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                b.splice(pos..pos, t.iter().copied());
            }
            7 => {
                // Replace the next run of digits with a huge, negative or fractional number.
                if let Some(start) = b[pos.min(b.len())..].iter().position(u8::is_ascii_digit).map(|i| i + pos) {
                    let end = b[start..].iter().position(|c| !c.is_ascii_digit()).map_or(b.len(), |i| i + start);
                    let with: &[u8] = [&b"99999999999999999999"[..], b"-7", b"4294967296", b"1.5", b"0", b"1e100"][rng.below(6)];
                    b.splice(start..end, with.iter().copied());
                }
            }
            8 => {
                let depth = [10, 200, 5000, 100_000][rng.below(4)];
                let (open, close) = if rng.below(2) == 0 { (b'[', b']') } else { (b'{', b'}') };
                let mut nest = vec![open; depth];
                if close == b'}' {
                    nest = b"{\"a\":".repeat(depth);
                }
                nest.extend(std::iter::repeat_n(close, depth));
                b.splice(pos..pos, nest);
            }
            _ => {
                if b.len() < 1 << 20 {
                    let copy = b.clone();
                    b.extend_from_slice(&copy);
                }
            }
        }
    }
    b
}

/// A safetensors file mutated where it matters: the length prefix (huge, off by a few, zero),
/// the header JSON (with the prefix kept consistent, so the parser sees the edited header), or
/// anywhere in the raw bytes.
fn mutate_safetensors(rng: &mut SplitMix64, input: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(input[..8].try_into().unwrap()) as usize;
    match rng.below(4) {
        0 => {
            let mut b = input.to_vec();
            let len = input.len() as u64;
            let v = [0, 1, n as u64 + 1, n as u64 - 1, len, len - 8, 1 << 62, u64::MAX, 100_000_001, rng.next_u64()][rng.below(10)];
            b[..8].copy_from_slice(&v.to_le_bytes());
            b
        }
        1 | 2 => {
            let header = mutate(rng, &input[8..8 + n]);
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(&header);
            b.extend_from_slice(&input[8 + n..]);
            b
        }
        _ => mutate(rng, input),
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: seeds, panics, the allocation guard, the watchdog, throughput.

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn case_seed(family: &str, i: usize) -> u64 {
    let mut h = env_u64("UNLEARN_CORRUPTION_SEED", DEFAULT_SEED);
    for c in family.bytes() {
        h = SplitMix64::new(h ^ c as u64).next_u64();
    }
    SplitMix64::new(h ^ i as u64).next_u64()
}

/// Outcome counts of one family.
#[derive(Default)]
struct Tally {
    ok: usize,
    errors: usize,
    failures: Vec<String>,
}

/// Run `cases` mutated inputs of `family`; `case(rng)` builds its input from the rng and runs it,
/// returning whether it was accepted (`Ok`) or refused (`Err`).
fn fuzz(totals: &mut Totals, family: &str, cases: usize, mut case: impl FnMut(&mut SplitMix64) -> Result<(), String>) {
    let only = std::env::var("UNLEARN_CORRUPTION_ONLY").ok();
    let running: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (running, done) = (running.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some((t, what)) = running.lock().unwrap().as_ref() {
                    if t.elapsed() > CASE_LIMIT {
                        eprintln!("corruption: {what} hung for more than {CASE_LIMIT:?}; aborting");
                        std::process::abort();
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut ran = 0;
    let mut slowest = (Duration::ZERO, String::new());
    let mut peak = 0isize;
    REFUSED.with(|r| r.set(false));
    for i in 0..cases {
        if only.as_deref().is_some_and(|o| o != format!("{family}:{i}")) {
            continue;
        }
        let seed = case_seed(family, i);
        let what = format!("{family} case {i} (seed {seed:#x}; rerun with UNLEARN_CORRUPTION_ONLY={family}:{i})");
        *running.lock().unwrap() = Some((Instant::now(), what.clone()));
        CURRENT_SEED.store(seed, Ordering::SeqCst);
        let mut rng = SplitMix64::new(seed);
        let base = HELD.with(Cell::get);
        PEAK.with(|p| p.set(base));
        GUARD.with(|g| g.set(Some(base)));
        let t = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut rng)));
        GUARD.with(|g| g.set(None));
        peak = peak.max(PEAK.with(Cell::get) - base);
        if t.elapsed() > slowest.0 {
            slowest = (t.elapsed(), format!("{i}"));
        }
        *running.lock().unwrap() = None;
        ran += 1;
        match result {
            Ok(Ok(())) => tally.ok += 1,
            Ok(Err(_)) => tally.errors += 1,
            Err(p) => {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                tally.failures.push(format!("{what}: panicked: {msg}"));
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{family}: {ran} inputs in {secs:.1} s ({:.0}/s): {} accepted, {} refused with an error, {} panics; slowest {family}:{} {:.2} s; most held by a case {:.1} MiB",
        ran as f64 / secs.max(1e-9),
        tally.ok,
        tally.errors,
        tally.failures.len(),
        slowest.1,
        slowest.0.as_secs_f64(),
        peak as f64 / (1 << 20) as f64
    );
    assert!(tally.failures.is_empty(), "{family}:\n{}", tally.failures.join("\n"));
    assert!(!REFUSED.with(Cell::get), "{family}: a case tried to hold more than {ALLOC_LIMIT} bytes");
    totals.inputs += ran;
    totals.secs += secs;
}

/// Inputs and seconds over the families of one test.
#[derive(Default)]
struct Totals {
    inputs: usize,
    secs: f64,
}

impl Totals {
    fn print(&self, what: &str) {
        println!("{what}: {} inputs in {:.1} s ({:.0} inputs/s)", self.inputs, self.secs, self.inputs as f64 / self.secs.max(1e-9));
    }
}

fn cases() -> usize {
    env_u64("UNLEARN_CORRUPTION_CASES", DEFAULT_CASES as u64) as usize
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The guard itself: a case that asks for more than the limit is refused (and seen as refused),
/// while the same request outside a case is not checked.
#[test]
fn the_allocation_guard_refuses_what_is_above_the_limit() {
    GUARD.with(|g| g.set(Some(HELD.with(Cell::get))));
    let (mut big, mut small) = (Vec::<u8>::new(), Vec::<u8>::new());
    let big_ok = big.try_reserve(ALLOC_LIMIT + 1).is_ok();
    let small_ok = small.try_reserve(1 << 20).is_ok();
    GUARD.with(|g| g.set(None));
    assert!(!big_ok, "an allocation above the limit went through");
    assert!(small_ok);
    assert!(REFUSED.with(Cell::get));
    REFUSED.with(|r| r.set(false));
}

// ---------------------------------------------------------------------------------------------
// The inputs.

type Inputs = TinyInputs;

fn inputs() -> Inputs {
    tiny_inputs()
}

/// A scratch copy of the tiny model (rewritten in place by each case).
fn scratch_model(inp: &Inputs, name: &str) -> PathBuf {
    copy_dir(&inp.model, &inp.root.join(name))
}

fn run_toml(inp: &Inputs, out: &Path) -> String {
    format!(
        "# a run\n[model]\npath = {:?}\ntrainable = \"all\"\ndevice = \"cpu\"\ndtype = \"fp32\"\n\
         [data]\nforget = {:?}\nretain = [{:?}]\nforget_limit = 4\n\
         [method]\nname = \"ngdiff\"\neps = 1e-8\nautolr = true\n\
         [optim]\nname = \"adamw\"\nlr = 1e-5\nbetas = [0.9, 0.999]\nschedule = \"cosine\"\nwarmup_steps = 2\n\
         [train]\nsteps = 4\nbatch_size = 2\nmax_len = 128\nseed = 3\ncheckpoint_every = 2\nout_dir = {out:?}\n\
         [dist]\nzero = 1\nbucket_mb = 0.5\n",
        inp.model, inp.forget, inp.retain
    )
}

// ---------------------------------------------------------------------------------------------
// The families, in-process.

#[test]
fn model_files_in_process() {
    let inp = inputs();
    let n = cases();
    let mut totals = Totals::default();
    let good_st = std::fs::read(inp.model.join("model.safetensors")).unwrap();
    let good_cfg = std::fs::read(inp.model.join("config.json")).unwrap();
    let good_tok = std::fs::read(inp.model.join("tokenizer.json")).unwrap();
    let dir = scratch_model(&inp, "m");
    let cfg = tiny_config();
    let reset = |dir: &Path| {
        std::fs::write(dir.join("model.safetensors"), &good_st).unwrap();
        std::fs::write(dir.join("config.json"), &good_cfg).unwrap();
        std::fs::write(dir.join("tokenizer.json"), &good_tok).unwrap();
    };

    // safetensors: open, copy every tensor out; one case in ten loads the whole model.
    fuzz(&mut totals, "safetensors", n, |rng| {
        reset(&dir);
        std::fs::write(dir.join("model.safetensors"), mutate_safetensors(rng, &good_st)).unwrap();
        if rng.below(10) == 0 {
            return unlearn::model::load_model(&dir, Kind::Float, Device::Cpu).map(|_| ()).map_err(err);
        }
        let ck = unlearn::model::weights::Checkpoint::open(&dir).map_err(err)?;
        let names: Vec<String> = ck.names().map(str::to_string).collect();
        for name in names {
            let _ = ck.tensor(&name, None).map_err(err)?;
        }
        Ok(())
    });

    // config.json: parse, and load the model it describes from the (good) weights.
    fuzz(&mut totals, "config.json", n, |rng| {
        reset(&dir);
        std::fs::write(dir.join("config.json"), mutate(rng, &good_cfg)).unwrap();
        let c = unlearn::model::Config::from_file(&dir.join("config.json")).map_err(err)?;
        let params: i64 = unlearn::model::param_specs(&c).iter().map(|p| p.numel()).sum();
        assert!(params > 0, "a validated config has parameters");
        unlearn::model::load_model(&dir, Kind::Float, Device::Cpu).map(|_| ()).map_err(err)
    });

    // tokenizer.json: load, then encode and decode a sample.
    fuzz(&mut totals, "tokenizer.json", n, |rng| {
        reset(&dir);
        std::fs::write(dir.join("tokenizer.json"), mutate(rng, &good_tok)).unwrap();
        let tok = unlearn::data::Tokenizer::from_model_dir(&dir, &cfg).map_err(err)?;
        let ids = tok.encode("Question: Who wrote it?\nAnswer: Ren\u{e9}e, in 1984.", true).map_err(err)?;
        tok.decode(&ids, false).map_err(err)?;
        Ok(())
    });
    totals.print("model files");
}

#[test]
fn configs_and_data_in_process() {
    let inp = inputs();
    let n = cases();
    let mut totals = Totals::default();
    let toml_path = inp.root.join("run.toml");
    let good_toml = run_toml(&inp, &inp.root.join("out")).into_bytes();
    fuzz(&mut totals, "run.toml", n, |rng| {
        std::fs::write(&toml_path, mutate(rng, &good_toml)).unwrap();
        let cfg = unlearn::config::RunConfig::load(&toml_path, &[]).map_err(err)?;
        // What `run` writes next (config.toml) must parse back, as `--resume` reads it.
        let table = cfg.to_toml().parse::<toml::Table>().map_err(err)?;
        unlearn::config::RunConfig::from_table(&table, "resolved", false).map_err(err)?;
        Ok(())
    });

    // Data files in the three layouts: read, then tokenize as training does.
    let tok = unlearn::data::Tokenizer::from_model_dir(&inp.model, &tiny_config()).unwrap();
    let template = unlearn::data::Template::phi_qa(); // the default of data.template
    let json_array = std::fs::read(&inp.forget).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_slice(&json_array).unwrap();
    let json_lines: Vec<u8> = records.iter().flat_map(|r| format!("{r}\n").into_bytes()).collect();
    let text: Vec<u8> = records.iter().flat_map(|r| format!("{}\n\n", r["answer"]).into_bytes()).collect();
    for (family, ext, good) in [("data.json", "json", &json_array), ("data.jsonl", "jsonl", &json_lines), ("data.txt", "txt", &text)] {
        let path = inp.root.join(format!("data.{ext}"));
        fuzz(&mut totals, family, n, |rng| {
            let mut bytes = mutate(rng, good);
            if rng.below(100) == 0 {
                // Now and then a record far beyond the size limit.
                let at = below(rng, bytes.len());
                bytes.splice(at..at, std::iter::repeat_n(b'x', 9 << 20));
            }
            std::fs::write(&path, bytes).unwrap();
            let recs = unlearn::data::read_records(&path).map_err(err)?;
            unlearn::data::tokenize_all(&tok, &template, &recs, 64, unlearn::data::Overflow::Chunk).map_err(err)?;
            Ok(())
        });
    }
    totals.print("configs and data");
}

#[test]
fn checkpoints_in_process() {
    let inp = inputs();
    let n = cases();
    // A real checkpoint of an NGDiff run with AdamW (master and two optimizer states).
    let out = inp.root.join("run");
    let toml = inp.root.join("run.toml");
    std::fs::write(&toml, run_toml(&inp, &out)).unwrap();
    let o = std::process::Command::new(unlearn_bin()).args(["run", "--config", toml.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let step = out.join("checkpoints/step-000004");
    let meta_good = std::fs::read(step.join("meta.json")).unwrap();
    let shard_name = "shard-00000-of-00001.safetensors";
    let shard_good = std::fs::read(step.join(shard_name)).unwrap();
    let good = unlearn::checkpoint::Loaded::open(&step).unwrap();
    let layout = good.meta.layout.clone();
    let names = good.tensor_names();
    drop(good);
    let mut t = Tensor::zeros([layout.shard_len()], (Kind::Float, Device::Cpu));
    let mut read_all = |dir: &Path| -> Result<(), String> {
        let ck = unlearn::checkpoint::Loaded::open(dir).map_err(err)?;
        for name in &names {
            ck.read_shard(name, &layout, 0, &mut t).map_err(err)?;
        }
        Ok(())
    };
    let mut totals = Totals::default();
    fuzz(&mut totals, "checkpoint meta.json", n, |rng| {
        std::fs::write(step.join(shard_name), &shard_good).unwrap();
        std::fs::write(step.join("meta.json"), mutate(rng, &meta_good)).unwrap();
        read_all(&step)
    });
    fuzz(&mut totals, "checkpoint shard", n, |rng| {
        std::fs::write(step.join("meta.json"), &meta_good).unwrap();
        std::fs::write(step.join(shard_name), mutate_safetensors(rng, &shard_good)).unwrap();
        read_all(&step)
    });
    totals.print("checkpoints");
}

// ---------------------------------------------------------------------------------------------
// A sample through the binary, under an address-space limit.

/// Run the binary with `RLIMIT_AS` = 1 GiB and a timeout; (exit code, stderr). A signal (an
/// abort from a failed allocation included) and a timeout fail the test.
fn run_limited(args: &[&str], what: &str) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(unlearn_bin());
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe, called in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 1 << 30, rlim_max: 1 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what}: the binary hung");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or_else(|| panic!("{what}: killed by a signal (an allocation failure aborts):\n{stderr}"));
    assert!(code != 101 && !stderr.contains("panicked"), "{what}: panicked:\n{stderr}");
    (code, stderr)
}

#[test]
fn binary_sample_under_a_memory_limit() {
    let inp = inputs();
    let n = (cases() / 50).max(4);
    let good_st = std::fs::read(inp.model.join("model.safetensors")).unwrap();
    let good_cfg = std::fs::read(inp.model.join("config.json")).unwrap();
    let good_tok = std::fs::read(inp.model.join("tokenizer.json")).unwrap();
    let good_toml = run_toml(&inp, &inp.root.join("out")).into_bytes();
    let start = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for i in 0..n {
        let seed = case_seed("binary", i);
        let mut rng = SplitMix64::new(seed);
        let dir = scratch_model(&inp, &format!("b{i}"));
        let what = format!("binary case {i} (seed {seed:#x})");
        let (code, stderr) = match i % 4 {
            0 => {
                std::fs::write(dir.join("model.safetensors"), mutate_safetensors(&mut rng, &good_st)).unwrap();
                score(&inp, &dir, &what)
            }
            1 => {
                std::fs::write(dir.join("config.json"), mutate(&mut rng, &good_cfg)).unwrap();
                score(&inp, &dir, &what)
            }
            2 => {
                std::fs::write(dir.join("tokenizer.json"), mutate(&mut rng, &good_tok)).unwrap();
                score(&inp, &dir, &what)
            }
            _ => {
                let toml = dir.join("run.toml");
                std::fs::write(&toml, mutate(&mut rng, &good_toml)).unwrap();
                run_limited(&["plan", "--config", toml.to_str().unwrap(), "--world-size", "4"], &what)
            }
        };
        if code == 0 {
            ok += 1;
        } else {
            refused += 1;
            assert!(stderr.contains("error"), "{what}: exit {code} without an error message:\n{stderr}");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "binary sample: {n} inputs in {secs:.1} s ({:.1}/s) under a 1 GiB address-space limit: {ok} accepted, {refused} refused",
        n as f64 / secs
    );
}

fn score(inp: &Inputs, model: &Path, what: &str) -> (i32, String) {
    let out = model.join("scores.jsonl");
    run_limited(
        &[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            inp.forget.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--limit",
            "2",
        ],
        what,
    )
}
