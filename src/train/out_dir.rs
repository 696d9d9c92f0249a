//! What `unlearn run` may find in `train.out_dir`, and what it may replace there.
//!
//! A run writes `config.toml`, `metrics.jsonl`, TensorBoard event files, `checkpoints/` and
//! `final/` (and their temporary siblings while writing). The rule:
//! * an absent or empty directory starts a fresh run;
//! * a directory holding a checkpoint is continued with `--resume DIR`; without it the run is
//!   refused, unless `--overwrite` asks to start over;
//! * `--resume DIR` on a directory without a checkpoint starts fresh (a job requeued before its
//!   first checkpoint runs the same command line again), replacing the earlier attempt's files;
//! * any other non-empty directory is refused unless `--overwrite`;
//! * a model or data file inside the run's `final/` or `checkpoints/` is refused in every case.
//!
//! Starting over replaces only what a run writes; every other file in the directory is left alone,
//! and a directory holding files a run does not write is refused without `--overwrite`.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::error::IoContext;
use crate::files::{self, RUN_OUTPUT};
use crate::Result;

/// How a run begins in its output directory.
#[derive(Debug, PartialEq)]
pub enum Start {
    /// From the model, replacing an earlier run's files if there are any.
    Fresh,
    /// From this checkpoint.
    Resume(PathBuf),
}

/// The top-level entries of `dir` (none if it does not exist).
fn entries(dir: &Path) -> Result<Vec<String>> {
    Ok(files::dir_entries(dir)?.unwrap_or_default().into_iter().map(|(n, _)| n).collect())
}

/// Decide how the run starts in `out` (reads only; every rank may call it).
pub fn decide(out: &Path, resume: bool, overwrite: bool) -> Result<Start> {
    if out.exists() && !out.is_dir() {
        return Err(crate::input!("train.out_dir {} exists and is not a directory", out.display()));
    }
    if resume && overwrite {
        return Err(crate::input!("--resume continues the run in {} and --overwrite starts it over: give one of them", out.display()));
    }
    let latest = checkpoint::latest(&out.join("checkpoints"))?;
    let names = entries(out)?;
    let foreign: Vec<&String> = names.iter().filter(|n| !(RUN_OUTPUT.writes)(n)).collect();
    let d = out.display();
    match latest {
        Some(dir) if resume => Ok(Start::Resume(dir)),
        Some(dir) if !overwrite => Err(crate::input!(
            "train.out_dir {d} already holds a run (checkpoint {}); pass --resume {d} to continue it, --overwrite to start it over \
             (replacing the run's files there), or choose another train.out_dir",
            dir.file_name().unwrap_or_default().to_string_lossy()
        )),
        _ if !foreign.is_empty() && !overwrite => Err(crate::input!(
            "train.out_dir {d} is not empty and holds files a run does not write ({}); choose a new or empty directory, \
             or pass --overwrite to write the run there anyway (those files are kept)",
            files::list(&foreign)
        )),
        _ if !names.is_empty() && !resume && !overwrite => Err(crate::input!(
            "train.out_dir {d} holds the files of an earlier run without a checkpoint ({}); pass --resume {d} to start over in it \
             (the pattern for jobs that may be requeued), --overwrite to replace them, or choose another train.out_dir",
            files::list(&names.iter().collect::<Vec<_>>())
        )),
        _ => Ok(Start::Fresh),
    }
}

/// Refuse inputs that this run would replace: the model (or a data file) inside `out`'s `final/`
/// or `checkpoints/`, e.g. an earlier run's `final/` unlearned again into the same directory.
/// `final/` is replaced at the end, and frozen weights are read from `model.path` on every resume.
pub fn check_inputs_outside(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    for sub in ["final", "checkpoints", "best", "evals"] {
        let Ok(dir) = std::fs::canonicalize(out.join(sub)) else { continue };
        for (key, input) in inputs {
            let Ok(p) = std::fs::canonicalize(input) else { continue }; // a hub id, or missing: its loader says
            if p.starts_with(&dir) {
                return Err(crate::input!(
                    "{key} {} lies inside {}, which this run replaces; copy it elsewhere or choose another train.out_dir",
                    input.display(),
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// Remove an earlier run's files from `out` before a fresh start (rank 0): its checkpoints,
/// metrics, TensorBoard events, best/ and evals/step-N/; `final/` is replaced when the new run writes its own, and
/// `config.toml` is rewritten. Nothing a run does not write is touched.
pub fn clear_earlier_run(out: &Path) -> Result<()> {
    let ckpts = out.join("checkpoints");
    for name in entries(&ckpts)? {
        let p = ckpts.join(&name);
        let is_ours = name == "latest" || name.starts_with("latest.tmp-") || name.starts_with("step-");
        if !is_ours {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).at(&p)?;
        } else {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    for name in entries(out)? {
        if name == "metrics.jsonl" || name.starts_with("events.out.tfevents.") {
            let p = out.join(&name);
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    // The in-run evaluation's model directories describe the earlier run's states.
    let best = out.join("best");
    if best.join("config.json").is_file() {
        std::fs::remove_dir_all(&best).at(&best)?;
    }
    let evals = out.join("evals");
    for name in entries(&evals)?.into_iter().filter(|n| n.starts_with("step-")) {
        let p = evals.join(&name);
        std::fs::remove_dir_all(&p).at(&p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "x").unwrap();
    }

    /// A directory with a complete checkpoint of step 4.
    fn with_checkpoint(out: &Path) {
        let step = out.join("checkpoints/step-000004");
        touch(&step.join("meta.json"));
        std::fs::write(out.join("checkpoints/latest"), "step-000004").unwrap();
        touch(&out.join("metrics.jsonl"));
        touch(&out.join("config.toml"));
    }

    #[test]
    fn the_output_directory_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        // Absent or empty: fresh, with or without --resume.
        assert_eq!(decide(&out, false, false).unwrap(), Start::Fresh);
        assert_eq!(decide(&out, true, false).unwrap(), Start::Fresh);
        std::fs::create_dir_all(&out).unwrap();
        assert_eq!(decide(&out, false, false).unwrap(), Start::Fresh);
        // An earlier attempt that never checkpointed: refused without a flag, fresh with --resume.
        touch(&out.join("metrics.jsonl"));
        touch(&out.join("config.toml"));
        std::fs::create_dir_all(out.join("checkpoints/step-000002.tmp")).unwrap();
        let e = decide(&out, false, false).unwrap_err();
        assert!(e.to_string().contains("--resume") && e.exit() == crate::error::Exit::BadInput, "{e}");
        assert_eq!(decide(&out, true, false).unwrap(), Start::Fresh);
        assert_eq!(decide(&out, false, true).unwrap(), Start::Fresh);
        // A user's file: refused, named, unless --overwrite (and never removed).
        touch(&out.join("notes.txt"));
        let e = decide(&out, true, false).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("--overwrite"), "{e}");
        assert_eq!(decide(&out, false, true).unwrap(), Start::Fresh);
        clear_earlier_run(&out).unwrap();
        assert!(out.join("notes.txt").exists() && !out.join("metrics.jsonl").exists());
        assert!(!out.join("checkpoints/step-000002.tmp").exists());
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        // A checkpoint: --resume continues, nothing else may start there without --overwrite.
        with_checkpoint(&out);
        assert_eq!(decide(&out, true, false).unwrap(), Start::Resume(out.join("checkpoints/step-000004")));
        let e = decide(&out, false, false).unwrap_err().to_string();
        assert!(e.contains("already holds a run") && e.contains("step-000004"), "{e}");
        assert_eq!(decide(&out, false, true).unwrap(), Start::Fresh);
        assert!(decide(&out, true, true).is_err());
        // A file where the directory should be.
        let file = tmp.path().join("file");
        touch(&file);
        assert!(decide(&file, false, false).unwrap_err().to_string().contains("not a directory"));
    }
}
