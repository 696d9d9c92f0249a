//! Cluster-grade runs (issue 10): a failing rank ends the whole job with its error, a rank that
//! stops answering is caught by the watchdog, a signal to one rank checkpoints and requeues
//! cleanly, non-finite steps are skipped on every rank, the output directory is never clobbered,
//! a full disk leaves the previous checkpoint loadable, and SIGKILLs at random moments lose
//! nothing. Faults are injected with `UNLEARN_FAULT` (src/fault.rs) into the real binary under
//! `mpirun` on CPU; models are the tiny Llama of tests/common/tiny.rs, written in milliseconds.
//!
//! The tests of this file take turns (one lock): each measures how fast a job ends, which a
//! second job competing for the same cores would blur.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tiny::{make_tiny, write_qa};
use common::{descendants, rank_of, unlearn_bin};
use tch::Tensor;

static TURN: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The exit codes of README "Exit codes" (unlearn::error::Exit).
const RUNTIME: i32 = 1;
const BAD_INPUT: i32 = 2;
const TIMEOUT: i32 = 5;
const PREEMPTED: i32 = 75;

struct Inputs {
    tmp: tempfile::TempDir,
    model: PathBuf,
    forget: PathBuf,
    retain: PathBuf,
}

fn inputs() -> Inputs {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny(&tmp.path().join("model"), 11);
    // Short texts: the tokenizer is byte-level.
    let forget = write_qa(&tmp.path().join("forget.json"), 10, "F");
    let retain = write_qa(&tmp.path().join("retain.json"), 16, "R");
    Inputs { tmp, model, forget, retain }
}

impl Inputs {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A GradDiff run config (two objectives, SGD with momentum) writing into `out`; `extra`
    /// lines go into [train] and [dist].
    /// GradDiff on the attention and MLP matrices (the set these tests sized their disks and timings for;
    /// GradDiff's own default trains every weight).
    fn config(&self, name: &str, out: &Path, train: &str, dist: &str) -> PathBuf {
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[model]\npath = {:?}\ndevice = \"cpu\"\ntrainable = \"matrices\"\n[data]\nforget = {:?}\nretain = {:?}\n[method]\nname = \"graddiff\"\n\
                 [optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n[train]\nmax_len = 64\nseed = 4\nout_dir = {out:?}\n{train}\n[dist]\n{dist}\n",
                self.model, self.forget, self.retain
            ),
        )
        .unwrap();
        path
    }
}

/// A job whose stderr lines are collected with the time each arrived.
struct Job {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn spawn(mut cmd: Command) -> Job {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).env("OMP_NUM_THREADS", "1");
    let mut child = cmd.spawn().expect("spawn");
    let lines = Arc::new(Mutex::new(vec![]));
    let sink = lines.clone();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    Job { child, lines, reader: Some(reader) }
}

fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), "-x", "OMP_NUM_THREADS"]);
    cmd.arg(unlearn_bin()).args(args);
    cmd
}

fn direct(args: &[&str]) -> Command {
    let mut cmd = Command::new(unlearn_bin());
    cmd.args(args);
    cmd
}

impl Job {
    /// The first line containing `needle`, and when it arrived.
    fn seen(&self, needle: &str) -> Option<Instant> {
        self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t)
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Wait for the job to end (at most `limit`; a job still running then is killed with every
    /// process below it and reported); returns the status and when it ended.
    fn wait(&mut self, limit: Duration) -> (ExitStatus, Instant) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let ended = Instant::now();
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return (st, ended);
            }
            if start.elapsed() > limit {
                kill_tree(self.child.id());
                let _ = self.child.kill();
                let _ = self.child.wait();
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                panic!("still running after {limit:?}:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn code(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn kill_tree(pid: u32) {
    for p in descendants(pid) {
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

/// The `unlearn` process of rank `rank` below `pid`.
fn rank_pid(pid: u32, rank: usize) -> Option<u32> {
    descendants(pid)
        .into_iter()
        .find(|&p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "unlearn") && rank_of(p) == Some(rank))
}

fn no_rank_left() -> bool {
    // A process gone between listing and reading is not a survivor.
    descendants(std::process::id())
        .iter()
        .all(|&p| std::fs::read_to_string(format!("/proc/{p}/comm")).map_or(true, |c| c.trim() != "unlearn"))
}

fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

fn sorted_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn assert_same_tensors(a: &Path, b: &Path, what: &str) {
    let (ta, tb) = (sorted_tensors(a), sorted_tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{what}");
    for (n, x) in &ta {
        assert!(x.equal(&tb[n]), "{what}: `{n}` differs (max |diff| {})", (x - &tb[n]).abs().max().double_value(&[]));
    }
}

/// Bytes that differ between the files of two directories (missing files count in full).
fn bytes_lost(reference: &Path, got: &Path) -> u64 {
    let mut lost = 0u64;
    for e in std::fs::read_dir(reference).unwrap() {
        let e = e.unwrap();
        // record.json and the model card name the run's own command line and out_dir, which differ
        // between the reference and the killed run by design; every other file must be equal.
        if !e.file_type().unwrap().is_file() || ["record.json", "README.md"].contains(&e.file_name().to_str().unwrap_or("")) {
            continue;
        }
        let a = std::fs::read(e.path()).unwrap();
        let b = std::fs::read(got.join(e.file_name())).unwrap_or_default();
        lost += a.iter().zip(&b).filter(|(x, y)| x != y).count() as u64 + a.len().abs_diff(b.len()) as u64;
    }
    lost
}

fn latest(out: &Path) -> String {
    std::fs::read_to_string(out.join("checkpoints/latest")).unwrap_or_default().trim().to_string()
}

/// For np = 2 and 4: an error on one rank (in backward, in rank 0's metrics writing, in a
/// checkpoint shard, in the final model, in `unlearn eval`) ends the whole job within 10 s of the
/// error, with that rank's error on stderr and the runtime-failure code; a rank that stops
/// answering ends it within `dist.timeout_s` + 10 s with a message naming the collective.
#[test]
fn a_failing_or_silent_rank_ends_the_whole_job_quickly_and_says_why() {
    let _t = turn();
    let inp = inputs();
    let tofu = common::shared_data().join("tofu");
    for np in [2, 4] {
        let last = np - 1;
        // (fault, [train] lines, [dist] lines, what stderr must say)
        let cases: Vec<(String, &str, &str, String)> = vec![
            (format!("backward:{last}:3"), "steps = 6", "zero = 2", "forward/backward failed".into()),
            ("metrics:0:3".into(), "steps = 6", "zero = 0", "metrics.jsonl: write failed".into()),
            (
                format!("checkpoint:{last}:2"),
                "steps = 6\ncheckpoint_every = 2",
                "zero = 1",
                format!("shard-{last:05}-of-{np:05}.safetensors: write failed"),
            ),
            ("final:0:4".into(), "steps = 4", "zero = 3", "writing the final model failed".into()),
        ];
        for (fault, train, dist, says) in cases {
            let name = format!("np{np}-{}", fault.replace(':', "-"));
            let out = inp.path(&name);
            let cfg = inp.config(&name, &out, &format!("batch_size = {np}\n{train}"), dist);
            let mut cmd = mpirun(np, &["run", "--config", cfg.to_str().unwrap()]);
            cmd.env("UNLEARN_FAULT", &fault);
            let mut job = spawn(cmd);
            let (st, ended) = job.wait(Duration::from_secs(180));
            let text = job.text();
            let rank = fault.split(':').nth(1).unwrap();
            let error_line = format!("rank {rank}: error:");
            let at = job.seen(&error_line).unwrap_or_else(|| panic!("{name}: no `{error_line}` on stderr:\n{text}"));
            let after = ended.duration_since(at).as_secs_f64();
            println!("np={np} {fault}: exit {} {after:.2} s after `{}`", code(st), text.lines().find(|l| l.contains(&error_line)).unwrap());
            assert!(text.contains(&says), "{name}: stderr does not say `{says}`:\n{text}");
            assert_eq!(code(st), RUNTIME, "{name}:\n{text}");
            assert!(after < 10.0, "{name}: the job took {after:.1} s to end after the error");
            assert!(!out.join("final").exists(), "{name}: a final model was published");
            assert!(no_rank_left(), "{name}: a rank survived");
        }

        // The evaluation: rank `last` fails before the first gather, its peers wait in it.
        let out = inp.path(&format!("eval-np{np}"));
        let mut cmd = mpirun(
            np,
            &[
                "eval",
                "tofu",
                "--model",
                inp.model.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--data",
                tofu.to_str().unwrap(),
                "--forget",
                "forget01",
                "--max-samples",
                "6",
                "--max-new-tokens",
                "4",
                "--batch-size",
                "1",
                "--device",
                "cpu",
            ],
        );
        cmd.env("UNLEARN_FAULT", format!("eval:{last}:1"));
        let mut job = spawn(cmd);
        let (st, ended) = job.wait(Duration::from_secs(180));
        let text = job.text();
        let error_line = format!("rank {last}: error:");
        let at = job.seen(&error_line).unwrap_or_else(|| panic!("eval np={np}: no `{error_line}`:\n{text}"));
        let after = ended.duration_since(at).as_secs_f64();
        println!("np={np} eval:{last}:1: exit {} {after:.2} s after the error", code(st));
        assert!(text.contains("fault injection Eval"), "{text}");
        assert_eq!(code(st), RUNTIME, "{text}");
        assert!(after < 10.0, "eval np={np}: {after:.1} s");
        assert!(!out.exists(), "eval np={np}: an output was published");
        assert!(no_rank_left());

        // A rank that stops answering: its peers' watchdog ends the job and names the collective.
        let timeout = 4.0;
        let name = format!("hang-np{np}");
        let out = inp.path(&name);
        let cfg = inp.config(&name, &out, &format!("batch_size = {np}\nsteps = 6"), &format!("zero = 2\ntimeout_s = {timeout}"));
        let mut cmd = mpirun(np, &["run", "--config", cfg.to_str().unwrap()]);
        cmd.env("UNLEARN_FAULT", format!("hang:{last}:3"));
        let mut job = spawn(cmd);
        let (st, ended) = job.wait(Duration::from_secs(180));
        let text = job.text();
        let at = job.seen("fault injection: hanging at step 3").unwrap_or_else(|| panic!("{name}: the rank never hung:\n{text}"));
        let after = ended.duration_since(at).as_secs_f64();
        let report =
            text.lines().find(|l| l.contains("did not complete within")).unwrap_or_else(|| panic!("{name}: no watchdog report:\n{text}"));
        println!("np={np} hang:{last}:3 (timeout {timeout} s): exit {} {after:.2} s after the rank stopped; {report}", code(st));
        assert!(report.contains("step 3") && report.contains("`the step's losses and stop requests` > `mpi all_reduce_f64"), "{report}");
        assert!(report.starts_with("rank ") && !report.starts_with(&format!("rank {last}:")), "{report}");
        assert_eq!(code(st), TIMEOUT, "{text}");
        assert!(after < timeout + 10.0, "{name}: {after:.1} s");
        assert!(no_rank_left());
    }
}

/// SIGUSR1 to one rank of an np=2 run (and then SIGTERM to the other): every rank finishes the
/// step, writes a checkpoint and exits with the "preempted" code; the same command line run
/// again resumes and ends bit-identical to an uninterrupted run. The config has no
/// `checkpoint_every`, as the shipped TOFU configs.
#[test]
fn a_signal_to_one_rank_checkpoints_every_rank_and_the_same_command_resumes_bit_identically() {
    let _t = turn();
    let inp = inputs();
    let steps = 60;
    let run = |name: &str| -> (PathBuf, Vec<String>) {
        let out = inp.path(name);
        let cfg = inp.config(name, &out, &format!("batch_size = 2\nsteps = {steps}\nkeep_checkpoints = 1"), "zero = 2");
        let args = vec!["run".to_string(), "--config".into(), cfg.display().to_string(), "--resume".into(), out.display().to_string()];
        (out, args)
    };
    let (reference, args) = run("uninterrupted");
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let (st, _) = spawn(mpirun(2, &args_ref)).wait(Duration::from_secs(300));
    assert!(st.success());

    let (out, args) = run("preempted");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut stops = vec![];
    for (signal, rank, name) in [(libc::SIGUSR1, 1, "SIGUSR1"), (libc::SIGTERM, 0, "SIGTERM")] {
        let before = metrics_lines(&out);
        let mut job = spawn(mpirun(2, &args));
        let t0 = Instant::now();
        while metrics_lines(&out) < before + 5 {
            assert!(t0.elapsed() < Duration::from_secs(120), "training never got going:\n{}", job.text());
            assert!(job.child.try_wait().unwrap().is_none(), "the run ended before the signal:\n{}", job.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = rank_pid(job.child.id(), rank).expect("the rank's process");
        let sent = Instant::now();
        unsafe { libc::kill(pid as i32, signal) };
        let (st, ended) = job.wait(Duration::from_secs(120));
        let text = job.text();
        let step: u64 = latest(&out).trim_start_matches("step-").parse().unwrap_or(0);
        println!(
            "{name} to rank {rank}: exit {} after {:.2} s, checkpoint at step {step} of {steps}",
            code(st),
            ended.duration_since(sent).as_secs_f64()
        );
        assert_eq!(code(st), PREEMPTED, "{text}");
        let said = |l: &&str| l.starts_with(&format!("rank {rank}: ")) && l.contains(&format!("{name} received: writing a checkpoint"));
        assert!(text.lines().any(|l| said(&l)), "{text}");
        assert!(text.contains(&format!("after step {step}: checkpoint")) && text.contains("run the same command again"), "{text}");
        assert!(step > 0 && step < steps, "{text}");
        assert_eq!(metrics_lines(&out) as u64, step, "metrics.jsonl should end at the checkpoint");
        assert!(!out.join("final").exists());
        assert!(no_rank_left());
        stops.push(step);
    }
    assert!(stops[1] > stops[0], "the second run did not resume: {stops:?}");
    let mut job = spawn(mpirun(2, &args));
    let (st, _) = job.wait(Duration::from_secs(300));
    assert!(st.success(), "{}", job.text());
    assert!(job.text().contains(&format!("resumed from {}", out.join("checkpoints").join(format!("step-{:06}", stops[1])).display())));
    assert_same_tensors(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"), "final weights");
    for shard in ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"] {
        let dir = format!("checkpoints/step-{steps:06}");
        assert_same_tensors(&reference.join(&dir).join(shard), &out.join(&dir).join(shard), "final checkpoint");
    }
    println!("stopped at steps {stops:?}, resumed twice with the same command: final weights and optimizer state bit-identical");
}

/// A NaN loss on one rank is seen on both: the step is skipped everywhere (no update of weights
/// or optimizer state) and the run goes on; NaN in every step stops the run after
/// `train.max_skipped_steps` skips, with the last good state in the latest checkpoint.
#[test]
fn non_finite_steps_are_skipped_on_every_rank_and_too_many_stop_the_run() {
    let _t = turn();
    let inp = inputs();
    let shard = |out: &Path, step: u64, r: usize| out.join(format!("checkpoints/step-{step:06}/shard-{r:05}-of-00002.safetensors"));
    // One bad step.
    let out = inp.path("one-nan");
    let cfg = inp.config("one-nan", &out, "batch_size = 2\nsteps = 5\ncheckpoint_every = 1\nkeep_checkpoints = 10", "zero = 1");
    let mut cmd = mpirun(2, &["run", "--config", cfg.to_str().unwrap()]);
    cmd.env("UNLEARN_FAULT", "nan:1:3");
    let mut job = spawn(cmd);
    let (st, _) = job.wait(Duration::from_secs(180));
    let text = job.text();
    assert!(st.success(), "{text}");
    assert!(text.lines().any(|l| l.starts_with("rank 1: ") && l.contains("step 3: this rank's forget loss is NaN")), "{text}");
    assert!(text.contains("step 3: the forget loss is NaN; step skipped without an update (1 in a row, at most 5)"), "{text}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[2]["skipped"], true);
    assert!(lines[2]["loss_forget"].is_null() && lines.iter().filter(|l| l.get("skipped").is_some()).count() == 1);
    for r in 0..2 {
        assert_same_tensors(&shard(&out, 2, r), &shard(&out, 3, r), "the skipped step 3 changed the state");
        assert!(!sorted_tensors(&shard(&out, 3, r))["master"].equal(&sorted_tensors(&shard(&out, 4, r))["master"]), "step 4 did not train");
    }
    println!("nan:1:3 at np=2: step 3 skipped on both ranks, its checkpoint equals step 2's, training went on");

    // Every step from 3 on: two skips, then the run stops.
    let out = inp.path("nan-forever");
    let cfg = inp.config(
        "nan-forever",
        &out,
        "batch_size = 2\nsteps = 8\ncheckpoint_every = 1\nkeep_checkpoints = 10\nmax_skipped_steps = 2",
        "zero = 1",
    );
    let mut cmd = mpirun(2, &["run", "--config", cfg.to_str().unwrap()]);
    cmd.env("UNLEARN_FAULT", "nan:1:3+");
    let mut job = spawn(cmd);
    let (st, _) = job.wait(Duration::from_secs(180));
    let text = job.text();
    assert_eq!(code(st), RUNTIME, "{text}");
    assert!(text.contains("step 5: the forget loss is NaN; 3 step(s) in a row were not finite (train.max_skipped_steps = 2)"), "{text}");
    assert_eq!(latest(&out), "step-000004");
    for r in 0..2 {
        assert_same_tensors(&shard(&out, 2, r), &shard(&out, 4, r), "the latest checkpoint is not the last good state");
    }
    assert!(!out.join("final").exists());
    // The checkpoint loads and the run finishes without the fault.
    let mut job = spawn(mpirun(2, &["run", "--resume", out.to_str().unwrap()]));
    let (st, _) = job.wait(Duration::from_secs(180));
    assert!(st.success() && job.text().contains("resumed from"), "{}", job.text());
    println!(
        "nan:1:3+ with max_skipped_steps = 2: stopped at step 5 (exit {RUNTIME}), latest checkpoint = step 2's state, resumed to the end"
    );
}

/// `run` never clobbers an output directory: a user's file there is refused (and kept), an earlier
/// run is refused without --resume or --overwrite, --overwrite replaces only the run's files, and
/// only the last `train.keep_checkpoints` checkpoints stay.
#[test]
fn the_output_directory_is_never_clobbered_and_old_checkpoints_are_pruned() {
    let _t = turn();
    let inp = inputs();
    let out = inp.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let cfg = inp.config("out", &out, "batch_size = 2\nsteps = 5\ncheckpoint_every = 1\nkeep_checkpoints = 2", "");
    let c = cfg.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--config", c];
        args.extend(extra);
        let mut job = spawn(direct(&args));
        let (st, _) = job.wait(Duration::from_secs(120));
        (code(st), job.text())
    };
    let (rc, text) = run(&[]);
    assert_eq!(rc, BAD_INPUT, "{text}");
    assert!(text.contains("notes.txt") && text.contains("--overwrite"), "{text}");
    assert!(!out.join("config.toml").exists(), "a refused run wrote into the directory");
    let (rc, text) = run(&["--overwrite"]);
    assert_eq!(rc, 0, "{text}");
    let mut kept: Vec<String> =
        std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    kept.sort();
    assert_eq!(kept, ["latest", "step-000004", "step-000005"]);
    let (rc, text) = run(&[]);
    assert_eq!(rc, BAD_INPUT, "{text}");
    assert!(text.contains("already holds a run (checkpoint step-000005)"), "{text}");
    let (rc, text) = run(&["--overwrite", "--set", "train.steps=3"]);
    assert_eq!(rc, 0, "{text}");
    assert_eq!(latest(&out), "step-000003");
    assert!(!out.join("checkpoints/step-000005").exists(), "the earlier run's checkpoints were left");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert_eq!(metrics_lines(&out), 3);
    // Unlearning the run's own final/ again into the same directory would replace its input.
    let again = inp.path("again.toml");
    std::fs::write(
        &again,
        std::fs::read_to_string(&cfg).unwrap().replace(&format!("{:?}", inp.model), &format!("{:?}", out.join("final"))),
    )
    .unwrap();
    let mut job = spawn(direct(&["run", "--config", again.to_str().unwrap(), "--overwrite"]));
    let (st, _) = job.wait(Duration::from_secs(120));
    let text = job.text();
    assert_eq!(code(st), BAD_INPUT, "{text}");
    assert!(text.contains("model.path") && text.contains("which this run replaces"), "{text}");
    assert!(out.join("final/model.safetensors").exists() && latest(&out) == "step-000003", "the refused run changed the directory");
    println!("non-empty out_dir refused (exit {BAD_INPUT}), --overwrite replaced only the run's files, 2 of 5 checkpoints kept, model.path inside out_dir/final refused");
}

/// A write that fails in the middle of a checkpoint (a file-size limit: the kernel's EFBIG, as a
/// full disk's ENOSPC) and a filesystem without room for the next checkpoint (a small tmpfs, when
/// this test may mount one) both stop the run with an error naming the path, and leave the
/// previous checkpoint loadable: resuming from it ends bit-identical to an uninterrupted run.
#[test]
fn a_full_disk_names_the_path_and_keeps_the_previous_checkpoint_loadable() {
    let _t = turn();
    let inp = inputs();
    let train = "batch_size = 2\nsteps = 4\ncheckpoint_every = 2\nkeep_checkpoints = 2";
    let reference = inp.path("reference");
    let cfg = inp.config("reference", &reference, train, "");
    let (st, _) = spawn(direct(&["run", "--config", cfg.to_str().unwrap()])).wait(Duration::from_secs(120));
    assert!(st.success());

    // EFBIG in the step-4 shard: RLIMIT_FSIZE below a shard's size, SIGXFSZ ignored.
    let out = inp.path("efbig");
    let cfg = inp.config("efbig", &out, train, "");
    let (st, _) = spawn(direct(&["run", "--config", cfg.to_str().unwrap(), "--set", "train.steps=2"])).wait(Duration::from_secs(120));
    assert!(st.success());
    let resume = ["run", "--resume", out.to_str().unwrap(), "--set", "train.steps=4"];
    let mut cmd = direct(&resume);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 32 << 10, rlim_max: 32 << 10 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut job = spawn(cmd);
    let (st, _) = job.wait(Duration::from_secs(120));
    let text = job.text();
    let shard = out.join("checkpoints/step-000004.tmp/shard-00000-of-00001.safetensors");
    assert_eq!(code(st), RUNTIME, "{text}");
    assert!(text.contains(&format!("{}: File too large", shard.display())), "{text}");
    assert!(!shard.exists(), "the partial shard was left behind");
    assert_eq!(latest(&out), "step-000002");
    let (st, _) = spawn(direct(&resume)).wait(Duration::from_secs(120));
    assert!(st.success());
    assert_same_tensors(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"), "after a failed write");
    println!("EFBIG writing the step-4 shard: error names {}, step 2 resumed to a bit-identical end", shard.display());

    // A small filesystem: without room for the step-4 checkpoint (refused before writing it), and
    // with room for it but not for the final model (ENOSPC from the kernel halfway through).
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    for (size_kib, says, kept) in
        [(200, "no room for the checkpoint of step 4", "step-000002"), (320, "No space left on device", "step-000004")]
    {
        let mnt = inp.path(&format!("small-{size_kib}"));
        std::fs::create_dir_all(&mnt).unwrap();
        let mounted =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs", mnt.to_str().unwrap()]).status();
        if !mounted.is_ok_and(|s| s.success()) {
            println!("tmpfs part skipped: this test cannot mount a filesystem here (needs root)");
            return;
        }
        let _unmount = Unmount(mnt.clone());
        let out = mnt.join("run");
        let cfg = inp.config(&format!("small-{size_kib}"), &out, train, "");
        let mut job = spawn(direct(&["run", "--config", cfg.to_str().unwrap()]));
        let (st, _) = job.wait(Duration::from_secs(120));
        let text = job.text();
        assert_eq!(code(st), RUNTIME, "{text}");
        let line = text.lines().find(|l| l.contains(says)).unwrap_or_else(|| panic!("{size_kib} KiB: no `{says}`:\n{text}"));
        assert!(line.contains(&out.display().to_string()), "{line}");
        assert_eq!(latest(&out), kept, "{text}");
        let leftovers: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("final"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?} left behind");
        let copy = inp.path(&format!("copied-{size_kib}"));
        assert!(Command::new("cp").args(["-a", out.to_str().unwrap(), copy.to_str().unwrap()]).status().unwrap().success());
        let (st, _) = spawn(direct(&["run", "--resume", copy.to_str().unwrap()])).wait(Duration::from_secs(120));
        assert!(st.success());
        assert_same_tensors(&reference.join("final/model.safetensors"), &copy.join("final/model.safetensors"), "after a full disk");
        println!("{size_kib} KiB tmpfs: {line}; {kept} resumed elsewhere to a bit-identical end");
    }
}

/// Launch checks: MPI's world must be the launcher's (a Slurm step of 4 tasks that each got a
/// world of one is refused, saying how to fix the srun line), and every rank must read the same
/// data (two ranks given different forget files are refused).
#[test]
fn a_miswired_launch_and_ranks_with_different_data_are_refused() {
    let _t = turn();
    let inp = inputs();
    let out = inp.path("world");
    let cfg = inp.config("world", &out, "batch_size = 2\nsteps = 2", "");
    let mut cmd = direct(&["run", "--config", cfg.to_str().unwrap()]);
    cmd.env("SLURM_STEP_ID", "0").env("SLURM_STEP_NUM_TASKS", "4").env("SLURM_NTASKS", "4");
    let mut job = spawn(cmd);
    let (st, _) = job.wait(Duration::from_secs(60));
    let text = job.text();
    assert_eq!(code(st), BAD_INPUT, "{text}");
    assert!(text.contains("MPI sees 1 rank(s) but SLURM_STEP_NUM_TASKS=4") && text.contains("srun --mpi=pmix"), "{text}");
    assert!(!out.exists(), "a refused run wrote its output directory");

    let other = write_qa(&inp.path("other-forget.json"), 10, "G");
    let out = inp.path("data");
    let cfg = inp.config("data", &out, "batch_size = 2\nsteps = 2", "");
    let c = cfg.to_str().unwrap();
    let set = format!("data.forget={:?}", other.display().to_string());
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-np", "1"])
        .arg(unlearn_bin())
        .args(["run", "--config", c]);
    cmd.args([":", "-np", "1"]).arg(unlearn_bin()).args(["run", "--config", c, "--set", &set]);
    let mut job = spawn(cmd);
    let (st, _) = job.wait(Duration::from_secs(60));
    let text = job.text();
    assert_eq!(code(st), BAD_INPUT, "{text}");
    assert!(text.contains("data.forget") && text.contains("differs between ranks"), "{text}");
    println!("{}", text.lines().find(|l| l.contains("differs between ranks")).unwrap());
}

/// Evaluation with a batch count that does not divide by the ranks (3 ranks) gives the
/// single-process report exactly: every rank issues the same gathers whatever its share.
#[test]
fn an_uneven_evaluation_split_finishes_and_equals_one_process() {
    let _t = turn();
    let inp = inputs();
    let tofu = common::shared_data().join("tofu");
    let report = |np: usize| -> serde_json::Value {
        let out = inp.path(&format!("eval-np{np}"));
        let args = [
            "eval",
            "tofu",
            "--model",
            inp.model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--data",
            tofu.to_str().unwrap(),
            "--forget",
            "forget01",
            "--max-samples",
            "5",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "2",
            "--gen-batch-size",
            "2",
            "--device",
            "cpu",
        ];
        let mut job = spawn(mpirun(np, &args));
        let (st, _) = job.wait(Duration::from_secs(300));
        assert!(st.success(), "np={np}:\n{}", job.text());
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        v["metrics"].clone()
    };
    let (one, three) = (report(1), report(3));
    assert!(one.as_object().is_some_and(|m| !m.is_empty()), "{one}");
    assert_eq!(one, three, "np=3 differs from np=1");
    println!(
        "TOFU eval of 5 samples in batches of 2 (3 batches per split) at np=3 equals np=1: {} metrics",
        one.as_object().unwrap().len()
    );
}

/// The soak: a 500-step run killed with SIGKILL at 10 random moments (some inside checkpoint
/// writes), resumed each time with the same command, ends bit-identical to the uninterrupted run.
#[test]
fn a_run_killed_ten_times_at_random_resumes_to_the_same_bytes() {
    let _t = turn();
    let inp = inputs();
    let steps = 500;
    let train = format!("batch_size = 2\nsteps = {steps}\ncheckpoint_every = 1\nkeep_checkpoints = 2");
    let reference = inp.path("soak-reference");
    let cfg = inp.config("soak-reference", &reference, &train, "");
    let t0 = Instant::now();
    let (st, _) = spawn(direct(&["run", "--config", cfg.to_str().unwrap()])).wait(Duration::from_secs(600));
    assert!(st.success());
    let full = t0.elapsed();

    let out = inp.path("soak");
    let cfg = inp.config("soak", &out, &train, "");
    let args = ["run", "--config", cfg.to_str().unwrap(), "--resume", out.to_str().unwrap()];
    let seed = std::env::var("UNLEARN_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    let (mut kills, mut in_writes) = (0, 0);
    while kills < 10 {
        let mut job = spawn(direct(&args));
        let before = metrics_lines(&out);
        // A random moment: after 1 to 30 more steps (measured, not timed: the machine's speed
        // varies), then up to one step's time on, so that it falls anywhere in a step or in the
        // checkpoint written after it.
        let target = before + 1 + (next() * 30.0) as usize;
        let t = Instant::now();
        while metrics_lines(&out) < target && job.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(120), "the resumed run never trained:\n{}", job.text());
            std::thread::sleep(Duration::from_millis(1));
        }
        if job.child.try_wait().unwrap().is_some() {
            break; // finished before a kill: the remaining kills have nothing to hit
        }
        std::thread::sleep((full / steps as u32).mul_f64(next()));
        unsafe { libc::kill(job.child.id() as i32, libc::SIGKILL) };
        let (st, _) = job.wait(Duration::from_secs(30));
        if st.signal() != Some(libc::SIGKILL) {
            break; // it had just finished
        }
        kills += 1;
        let tmp = std::fs::read_dir(out.join("checkpoints"))
            .is_ok_and(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".tmp")));
        in_writes += tmp as usize;
        println!(
            "kill {kills}: at step {} (latest checkpoint {}){}",
            metrics_lines(&out),
            latest(&out),
            if tmp { ", inside a checkpoint write" } else { "" }
        );
    }
    let mut job = spawn(direct(&args));
    let (st, _) = job.wait(Duration::from_secs(600));
    assert!(st.success(), "{}", job.text());
    let last = format!("checkpoints/step-{steps:06}");
    let lost = bytes_lost(&reference.join("final"), &out.join("final")) + bytes_lost(&reference.join(&last), &out.join(&last));
    println!(
        "soak (seed {seed}): {steps} steps, uninterrupted {:.1} s; kills survived: {kills} ({in_writes} inside checkpoint writes), bytes lost: {lost}",
        full.as_secs_f64()
    );
    assert_eq!(kills, 10, "the run finished before 10 kills landed");
    assert_eq!(lost, 0);
    assert_same_tensors(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"), "soak");
}

/// launch/slurm.sbatch outside Slurm (its `#SBATCH` lines are comments to bash): with the job's
/// variables set, the mpirun launcher and a stand-in `scontrol` that records its arguments,
/// SIGUSR1 to the batch shell (what `--signal=B:USR1@300` sends) makes the ranks checkpoint and
/// exit 75, and the script requeue its job; the requeued start (the same script, the same
/// arguments) resumes and ends bit-identical to an uninterrupted run.
#[test]
fn the_slurm_script_forwards_the_signal_requeues_and_the_requeued_job_resumes() {
    let _t = turn();
    let inp = inputs();
    let train = "batch_size = 2\nsteps = 60";
    let reference = inp.path("sbatch-reference");
    let cfg = inp.config("sbatch-reference", &reference, train, "zero = 1");
    let (st, _) = spawn(mpirun(2, &["run", "--config", cfg.to_str().unwrap()])).wait(Duration::from_secs(300));
    assert!(st.success());

    let fake = inp.path("fakebin");
    std::fs::create_dir_all(&fake).unwrap();
    let log = inp.path("scontrol.log");
    std::fs::write(fake.join("scontrol"), format!("#!/bin/sh\necho \"$@\" >> {:?}\n", log)).unwrap();
    std::fs::set_permissions(fake.join("scontrol"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = inp.path("sbatch");
    let cfg = inp.config("sbatch", &out, train, "zero = 1");
    let script = || {
        let mut cmd = Command::new("bash");
        cmd.arg(common::repo().join("launch/slurm.sbatch")).arg(&cfg).arg(&out);
        cmd.env("PATH", format!("{}:{}", fake.display(), std::env::var("PATH").unwrap()))
            .env("SLURM_JOB_ID", "4242")
            .env("SLURM_NTASKS", "2")
            .env("SLURM_NTASKS_PER_NODE", "2")
            .env("SLURM_JOB_NUM_NODES", "1")
            .env("SLURM_SUBMIT_DIR", common::repo())
            .env("UNLEARN_LAUNCHER", "mpirun")
            .env("UNLEARN_BIN", unlearn_bin())
            // This machine is no Slurm node: Open MPI must not look for an allocation, may run as
            // root, and may put two ranks on fewer cores.
            .env("OMPI_MCA_ras", "^slurm")
            .env("OMPI_MCA_plm", "^slurm")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
        cmd
    };
    let mut job = spawn(script());
    let t0 = Instant::now();
    while metrics_lines(&out) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(120), "training never got going:\n{}", job.text());
        assert!(job.child.try_wait().unwrap().is_none(), "the job ended before the signal:\n{}", job.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc::kill(job.child.id() as i32, libc::SIGUSR1) };
    let (st, _) = job.wait(Duration::from_secs(120));
    let text = job.text();
    let stopped = latest(&out);
    assert_eq!(code(st), 0, "{text}");
    assert!(text.contains("SIGUSR1 received, asking the ranks") && text.contains("requeueing job 4242"), "{text}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "requeue 4242");
    assert!(!stopped.is_empty() && !out.join("final").exists(), "{text}");
    assert!(no_rank_left());

    let mut job = spawn(script());
    let (st, _) = job.wait(Duration::from_secs(300));
    let text = job.text();
    assert!(st.success(), "{text}");
    assert!(text.contains("resumed from") && text.contains(&stopped), "{text}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "requeue 4242", "the finished job requeued itself");
    assert_same_tensors(&reference.join("final/model.safetensors"), &out.join("final/model.safetensors"), "requeued job");
    println!("slurm.sbatch: SIGUSR1 to the batch shell -> checkpoint {stopped}, exit 75, `scontrol requeue 4242`; the requeued start resumed to a bit-identical end");
}

/// Ctrl-C: the first SIGINT checkpoints the step and exits 75 like any stop request; a second one
/// ends the process at once (130), as a user pressing it twice expects.
#[test]
fn ctrl_c_checkpoints_and_a_second_ctrl_c_stops_at_once() {
    let _t = turn();
    let inp = inputs();
    let out = inp.path("ctrl-c");
    let cfg = inp.config("ctrl-c", &out, "batch_size = 2\nsteps = 400", "");
    let args = ["run", "--config", cfg.to_str().unwrap(), "--resume", out.to_str().unwrap()];
    for presses in [1, 2] {
        let before = metrics_lines(&out);
        let mut job = spawn(direct(&args));
        let t0 = Instant::now();
        while metrics_lines(&out) < before + 3 {
            assert!(t0.elapsed() < Duration::from_secs(120) && job.child.try_wait().unwrap().is_none(), "{}", job.text());
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..presses {
            // One press at a time: a signal sent while the same one is pending is merged into it.
            let seen = job.lines.lock().unwrap().iter().filter(|(_, l)| l.contains("interrupted: finishing")).count();
            unsafe { libc::kill(job.child.id() as i32, libc::SIGINT) };
            let t = Instant::now();
            while job.lines.lock().unwrap().iter().filter(|(_, l)| l.contains("interrupted: finishing")).count() == seen
                && job.child.try_wait().unwrap().is_none()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let (st, _) = job.wait(Duration::from_secs(60));
        let text = job.text();
        println!("{presses} SIGINT: exit {}, latest checkpoint {}", code(st), latest(&out));
        if presses == 1 {
            assert_eq!(code(st), PREEMPTED, "{text}");
            assert!(text.contains("interrupted: finishing this step") && text.contains("preempted by SIGINT"), "{text}");
            assert!(!latest(&out).is_empty());
        } else {
            assert_eq!(code(st), 130, "{text}");
        }
    }
}
