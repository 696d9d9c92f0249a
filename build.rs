//! Build-time settings.
//!
//! * rpath to `$LIBTORCH/lib`, so the binary finds libtorch without LD_LIBRARY_PATH.
//! * With the `cuda` feature, force `libtorch_cuda.so` into the binary's NEEDED list: nothing in
//!   our code references its symbols, so the default `--as-needed` linker drops it and libtorch
//!   then silently reports no GPU.
//! * The git commit of the checkout (`UNLEARN_GIT_COMMIT`, "unknown" outside git) and whether the
//!   files that compile into the binary have uncommitted changes (`UNLEARN_GIT_DIRTY`: true, false
//!   or unknown), for the reproduction record.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    git_info();
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = format!("{libtorch}/lib");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::env::var("CARGO_FEATURE_CUDA").is_ok() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}

/// Output of `git args...` in the crate directory, if git runs and succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The sources whose changes make the binary differ from the commit.
const BUILD_INPUTS: [&str; 4] = ["src", "build.rs", "Cargo.toml", "Cargo.lock"];

fn git_info() {
    let commit = git(&["rev-parse", "HEAD"]).filter(|c| !c.is_empty());
    let dirty = commit.as_ref().and_then(|_| {
        let mut args = vec!["status", "--porcelain", "--untracked-files=no", "--"];
        args.extend(BUILD_INPUTS);
        git(&args).map(|s| !s.is_empty())
    });
    println!("cargo:rustc-env=UNLEARN_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
    println!("cargo:rustc-env=UNLEARN_GIT_DIRTY={}", dirty.map_or("unknown".to_string(), |d| d.to_string()));
    // Re-run when HEAD moves (checkout, commit) or a build input changes. These paths exist in a
    // plain checkout and in a worktree alike (`--git-path` resolves both).
    if commit.is_some() {
        let mut watched: Vec<String> = vec![];
        if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
            watched.push(head);
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
            watched.push(r);
        }
        if let Some(p) = git(&["rev-parse", "--git-path", "packed-refs"]) {
            watched.push(p);
        }
        watched.extend(BUILD_INPUTS.iter().map(|s| s.to_string()));
        // A watched path that does not exist would make cargo re-run this script on every build.
        for p in watched.into_iter().filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
