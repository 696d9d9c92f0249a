//! Subcommands: one file each, each with its clap `Args` and a `run` function.

pub mod comm_check;
pub mod eval;
pub mod export;
pub mod import_gguf;
pub mod plan;
pub mod report;
pub mod run;
pub mod score;
pub mod verify;

/// Parser for counts that must be at least 1 (`--limit 0` would select nothing and report NaN).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 selects nothing)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
