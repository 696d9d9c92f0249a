//! What the program may open and what it may replace on disk.
//!
//! * Inputs: only regular files are opened (a FIFO named where a weight file should be would block
//!   `open()` forever, a device would never end), and file names taken from inside a model
//!   directory (a sharded checkpoint's index) must stay inside it.
//! * Outputs: every command that writes a directory (`export`, `eval`, `report`, `import-gguf`)
//!   fills a temporary sibling and then replaces `--out` as a whole, so `--out` is checked first by
//!   one rule, [`check_output_dir`]; commands that write one file use [`check_output_file`].

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Open `path` for reading if it is a regular file (symlinks followed). Opened non-blocking and
/// checked on the handle, so a FIFO neither hangs the open nor slips in between check and use.
pub fn open_regular(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::format(path, format!("is a {}, not a regular file", file_kind(&meta))));
    }
    Ok(file)
}

/// The whole content of a regular file.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).at(path)?;
    Ok(bytes)
}

/// A regular file's content as UTF-8 text; an invalid byte is reported with its line.
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::format(path, format!("line {line} (byte {at}): not valid UTF-8 (text files must be UTF-8)"))
    })
}

/// Whether two existing files hold the same bytes (the same file, through any path, included).
/// Sizes are compared first, so files of different lengths are never read.
pub fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ca, cb) = (std::fs::canonicalize(a).at(a)?, std::fs::canonicalize(b).at(b)?);
    if ca == cb {
        return Ok(true);
    }
    if !ca.is_file() || !cb.is_file() {
        return Ok(false); // directories of files are compared file by file by their readers, if at all
    }
    let (mut fa, mut fb) = (open_regular(a)?, open_regular(b)?);
    if fa.metadata().at(a)?.len() != fb.metadata().at(b)?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba).at(a)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n]).at(b)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "FIFO (named pipe)";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "device";
        }
    }
    if meta.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// `dir/name` for a file name read from a file inside `dir` (`listing`, for the message). Absolute
/// names and `..` are refused: a model directory must not make us read files outside it. The
/// check is on the name only, so symlinked snapshots (the Hugging Face cache) still load.
pub fn inside(dir: &Path, name: &str, listing: &Path) -> Result<PathBuf> {
    let rel = Path::new(name);
    let escapes = name.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if escapes {
        return Err(Error::format(
            listing,
            format!("entry {name:?} is not a file name inside {}; absolute paths and `..` are refused", dir.display()),
        ));
    }
    Ok(dir.join(rel))
}

/// What one command writes into its output directory.
pub struct OutputDir {
    /// The command, for messages (`export`).
    pub command: &'static str,
    /// A file only this command writes: a directory holding it is an earlier output of the command.
    /// `None` when the output cannot be told apart from the user's own (an HF model directory).
    pub marker: Option<&'static str>,
    /// Whether a file name is one the command writes (or a companion command adds, e.g. `verify`).
    pub writes: fn(&str) -> bool,
}

pub const EXPORT_OUTPUT: OutputDir = OutputDir {
    command: "export",
    marker: Some("export.json"),
    writes: |n| {
        ["model.onnx", "model.onnx.data", "export.json", "config.json", "verify.json", "genai_config.json", "record.json"].contains(&n)
            || crate::model::weights::TOKENIZER_FILES.contains(&n)
    },
};

pub const EVAL_OUTPUT: OutputDir = OutputDir {
    command: "eval",
    marker: Some("report.json"),
    writes: |n| ["report.json", "report.md", "samples.jsonl", "metrics.svg", "record.json"].contains(&n),
};

pub const REPORT_OUTPUT: OutputDir = OutputDir {
    command: "report",
    marker: Some("comparison.json"),
    writes: |n| ["comparison.json", "report.md", "metrics.svg"].contains(&n) || (n.starts_with("training_") && n.ends_with(".svg")),
};

pub const IMPORT_OUTPUT: OutputDir = OutputDir { command: "import-gguf", marker: None, writes: |_| false };

/// `run` writes into `train.out_dir` (it is not replaced as a whole: `checkpoints/` and `final/`
/// are kept across resumes), so its directory is checked by `train::out_dir::decide` with these
/// names; the temporary siblings of its files and an earlier `final/` being replaced count as its.
pub const RUN_OUTPUT: OutputDir = OutputDir {
    command: "run",
    marker: Some("config.toml"),
    writes: |n| {
        let ours = |base: &str| n == base || n.strip_prefix(base).is_some_and(|rest| rest.starts_with(".tmp-"));
        // best/ and evals/ are the in-run evaluation's (monitor/).
        ["config.toml", "metrics.jsonl", "checkpoints", "final", "best", "evals"].iter().any(|b| ours(b))
            || n.starts_with("final.old-")
            || n.starts_with("best.old-")
            || n.starts_with("events.out.tfevents.")
    },
};

/// The names of the entries of `dir`, sorted, with whether each is a directory; `None` when `dir`
/// does not exist (or lies below a file: creating it fails later with its own message).
pub fn dir_entries(dir: &Path) -> Result<Option<Vec<(String, bool)>>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = vec![];
    for entry in rd {
        let entry = entry.at(dir)?;
        let is_dir = entry.file_type().at(entry.path())?.is_dir();
        out.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
    }
    out.sort();
    Ok(Some(out))
}

/// May `out` be replaced by this command's output? The rule, for every command that writes a
/// directory:
/// * `out` must not be, contain, or lie inside any of `inputs` (or contain the current directory);
/// * if it exists it must be a directory, and if it is not empty it must be an earlier output of
///   the same command (its marker file and nothing but files the command writes), unless
///   `overwrite` is set; even then it may hold no subdirectory (none of our outputs has one), so
///   a mistyped `--out ~ --overwrite` cannot take a tree of files with it.
pub fn check_output_dir(out: &Path, spec: &OutputDir, inputs: &[&Path], overwrite: bool) -> Result<()> {
    check_disjoint(out, inputs)?;
    let meta = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        // Absent, or below a file (creating it fails later with its own message).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
        Err(e) => return Err(Error::io(out, e)),
    };
    if !meta.is_dir() {
        return Err(Error::format(out, "--out exists and is not a directory; choose another --out"));
    }
    let entries = dir_entries(out)?.unwrap_or_default();
    let names: BTreeSet<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    let subdirs: Vec<&String> = entries.iter().filter(|(_, d)| *d).map(|(n, _)| n).collect();
    if names.is_empty() {
        return Ok(());
    }
    if let Some(d) = subdirs.first() {
        return Err(Error::format(
            out,
            format!(
                "--out is not empty and holds the directory `{d}`; `{}` replaces --out as a whole, so choose a new or empty directory",
                spec.command
            ),
        ));
    }
    if overwrite {
        return Ok(());
    }
    let ours = spec.marker.is_some_and(|m| names.contains(m));
    let foreign: Vec<&String> = names.iter().filter(|n| !(spec.writes)(n)).collect();
    if ours && foreign.is_empty() {
        return Ok(());
    }
    let why = match (spec.marker, ours) {
        (Some(m), false) => format!("it is not the output of an earlier `{}` (no {m})", spec.command),
        (Some(_), true) => format!("it holds files `{}` does not write: {}", spec.command, list(&foreign)),
        (None, _) => format!("it holds {}", list(&names.iter().collect::<Vec<_>>())),
    };
    Err(Error::format(
        out,
        format!("--out is not empty and {why}; `{}` replaces --out as a whole, so choose a new or empty directory, or pass --overwrite to replace it", spec.command),
    ))
}

/// May the single file `out` be written (atomically replacing an earlier one)? It must not be a
/// directory, one of the `inputs`, or an existing file inside an input directory other than one
/// named `own` (the command's usual output there, e.g. `verify.json` in an export directory).
pub fn check_output_file(out: &Path, inputs: &[&Path], own: Option<&str>) -> Result<()> {
    if out.is_dir() {
        return Err(Error::format(out, "--out is a directory; give a file name"));
    }
    let target = resolve(out)?;
    for input in inputs {
        let Ok(inp) = std::fs::canonicalize(input) else { continue };
        if target == inp {
            return Err(Error::format(out, format!("--out is the input {}; it would be overwritten", input.display())));
        }
        let replaces = out.exists() && target.starts_with(&inp) && own.is_none_or(|o| out.file_name().is_none_or(|n| n != o));
        if replaces {
            return Err(Error::format(out, format!("--out would replace a file of the input directory {}", input.display())));
        }
    }
    Ok(())
}

/// `out` must be disjoint from every input and must not contain the current directory.
fn check_disjoint(out: &Path, inputs: &[&Path]) -> Result<()> {
    let target = resolve(out)?;
    for input in inputs {
        let Ok(inp) = std::fs::canonicalize(input) else { continue };
        let relation = if target == inp {
            "is"
        } else if inp.starts_with(&target) {
            "contains"
        } else if target.starts_with(&inp) {
            "is inside"
        } else {
            continue;
        };
        return Err(Error::format(
            out,
            format!("--out {relation} the input {}; choose an output directory apart from the inputs", input.display()),
        ));
    }
    if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) {
        if cwd.starts_with(&target) {
            return Err(Error::format(out, "--out contains the current directory; choose an output directory below it"));
        }
    }
    Ok(())
}

/// The absolute path `p` names: its nearest existing ancestor canonicalized (symlinks resolved),
/// then the rest of the components as written.
fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().at(".")?.join(p) };
    let mut rest = vec![];
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other),
                }
            }
            return Ok(out);
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

/// Up to five names, and how many more there are, for a message.
pub fn list(names: &[&String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).map(|n| n.as_str()).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escaping_the_directory_are_refused() {
        let dir = Path::new("/m");
        let listing = Path::new("/m/index.json");
        assert_eq!(inside(dir, "a.safetensors", listing).unwrap(), Path::new("/m/a.safetensors"));
        assert_eq!(inside(dir, "./sub/a.safetensors", listing).unwrap(), Path::new("/m/./sub/a.safetensors"));
        for bad in ["../a.safetensors", "/etc/passwd", "sub/../../a", ""] {
            let e = inside(dir, bad, listing).unwrap_err().to_string();
            assert!(e.contains("/m/index.json") && e.contains("refused"), "{bad}: {e}");
        }
    }

    #[test]
    fn resolve_handles_missing_tails_and_dotdot() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(resolve(&tmp.path().join("x/y")).unwrap(), base.join("x/y"));
        assert_eq!(resolve(&tmp.path().join("x/../y")).unwrap(), base.join("y"));
    }

    #[test]
    fn output_dirs_follow_the_one_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        let inputs = [model.as_path()];
        // New, empty, or an earlier export: fine.
        assert!(check_output_dir(&tmp.path().join("new"), &EXPORT_OUTPUT, &inputs, false).is_ok());
        let prev = tmp.path().join("prev");
        std::fs::create_dir_all(&prev).unwrap();
        assert!(check_output_dir(&prev, &EXPORT_OUTPUT, &inputs, false).is_ok());
        for f in ["model.onnx", "export.json", "tokenizer.json", "verify.json"] {
            std::fs::write(prev.join(f), "x").unwrap();
        }
        assert!(check_output_dir(&prev, &EXPORT_OUTPUT, &inputs, false).is_ok());
        // A user's file among them: refused, named, unless --overwrite.
        std::fs::write(prev.join("notes.txt"), "mine").unwrap();
        let e = check_output_dir(&prev, &EXPORT_OUTPUT, &inputs, false).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("--overwrite"), "{e}");
        assert!(check_output_dir(&prev, &EXPORT_OUTPUT, &inputs, true).is_ok());
        // The output of another command is not ours.
        let e = check_output_dir(&prev, &EVAL_OUTPUT, &inputs, false).unwrap_err().to_string();
        assert!(e.contains("no report.json"), "{e}");
        // Subdirectories are never replaced, even with --overwrite.
        std::fs::create_dir_all(prev.join("sub")).unwrap();
        assert!(check_output_dir(&prev, &EXPORT_OUTPUT, &inputs, true).unwrap_err().to_string().contains("`sub`"));
        // Equal to, containing, or inside the model: always refused.
        for (out, word) in
            [(model.clone(), "is the input"), (tmp.path().to_path_buf(), "contains the input"), (model.join("onnx"), "is inside")]
        {
            let e = check_output_dir(&out, &EXPORT_OUTPUT, &inputs, true).unwrap_err().to_string();
            assert!(e.contains(word), "{out:?}: {e}");
        }
        // A file where a directory should be.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(check_output_dir(&file, &EXPORT_OUTPUT, &inputs, true).unwrap_err().to_string().contains("not a directory"));
        // Report outputs include numbered training plots.
        assert!((REPORT_OUTPUT.writes)("training_0_run.svg") && !(REPORT_OUTPUT.writes)("training.txt"));
    }

    #[test]
    fn output_files_never_replace_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data.json");
        std::fs::write(&data, "[]").unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let inputs = [data.as_path(), model.as_path()];
        assert!(check_output_file(&tmp.path().join("scores.jsonl"), &inputs, None).is_ok());
        assert!(check_output_file(&data, &inputs, None).unwrap_err().to_string().contains("is the input"));
        assert!(check_output_file(&model.join("config.json"), &inputs, None).unwrap_err().to_string().contains("input directory"));
        assert!(check_output_file(&model.join("new.jsonl"), &inputs, None).is_ok());
        std::fs::write(model.join("verify.json"), "{}").unwrap();
        assert!(check_output_file(&model.join("verify.json"), &inputs, Some("verify.json")).is_ok());
        assert!(check_output_file(&model, &inputs, None).unwrap_err().to_string().contains("is a directory"));
    }
}
