//! Checkpoints survive a crash mid-write, and `--resume` reproduces the uninterrupted run bit for
//! bit on CPU.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tch::Tensor;

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(path).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_config(dir: &Path, model: &Path, out: &Path, method: &str) -> std::path::PathBuf {
    let cfg = dir.join(format!("{method}.toml"));
    let forget = shared_data().join("tofu/forget01.json");
    let retain = shared_data().join("tofu/retain_perturbed.json");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {model:?}\n[data]\nforget = {forget:?}\nretain = {retain:?}\nretain_limit = 40\n\
             [method]\nname = \"{method}\"\n[optim]\nname = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
             [train]\nsteps = 8\nbatch_size = 4\nmax_len = 256\nseed = 3\ncheckpoint_every = 2\nkeep_checkpoints = 3\nout_dir = {out:?}\n"
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn sigkill_during_checkpoint_write_keeps_previous_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = make_tiny_model(&tmp.path().join("model"), "{}", 21, "bytebpe");
    for method in ["mean-teacher", "ngdiff"] {
        // Reference: the uninterrupted run.
        let full = tmp.path().join(format!("{method}-full"));
        let cfg = write_config(tmp.path(), &model, &full, method);
        let (ok, _, err) = run_unlearn(&["run", "--config", cfg.to_str().unwrap()]);
        assert!(ok, "{err}");

        // The same run, killed with SIGKILL while writing the step-6 checkpoint.
        let out = tmp.path().join(format!("{method}-killed"));
        let cfg = write_config(tmp.path(), &model, &out, method);
        let mut child = Command::new(unlearn_bin())
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("UNLEARN_FAULT_STALL_CHECKPOINT", "6")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = false;
        for line in stderr.lines() {
            if line.unwrap().contains("stalled mid-write") {
                seen = true;
                break;
            }
        }
        assert!(seen, "the run never reached the stalled checkpoint");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let ckpts = out.join("checkpoints");
        assert!(ckpts.join("step-000006.tmp").exists(), "the interrupted write should have left its temporary directory");
        assert!(!ckpts.join("step-000006").exists(), "a half-written checkpoint was published");
        assert_eq!(std::fs::read_to_string(ckpts.join("latest")).unwrap().trim(), "step-000004");
        assert!(!out.join("final").exists());

        // Resume continues from step 4 and ends exactly where the uninterrupted run ended.
        let (ok, _, err) = run_unlearn(&["run", "--resume", out.to_str().unwrap()]);
        assert!(ok, "resume failed: {err}");
        assert!(err.contains("resumed from") && err.contains("step-000004"), "resume did not start at step 4:\n{err}");
        let a = tensors(&full.join("final/model.safetensors"));
        let b = tensors(&out.join("final/model.safetensors"));
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{method}: `{na}` differs after resume (max |diff| {})", (ta - tb).abs().max().double_value(&[]));
        }
        // The optimizer, teacher and loader states in the final checkpoint agree too.
        let sa = tensors(&full.join("checkpoints/step-000008/shard-00000-of-00001.safetensors"));
        let sb = tensors(&out.join("checkpoints/step-000008/shard-00000-of-00001.safetensors"));
        assert_eq!(sa.len(), sb.len(), "{method}: the checkpoints hold different numbers of states");
        for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{method}: checkpoint state `{na}` differs after resume");
        }
        println!("{method}: killed at step-6 checkpoint, resumed from step 4, final weights and states bit-identical");
    }
}
