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
