//! Subcommands: one file each, each with its clap `Args` and a `run` function.

pub mod run;
pub mod score;
