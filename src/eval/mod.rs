//! Evaluation: scoring, MUSE and TOFU metrics, sharded generation and scoring, reports and plots.

pub mod data;
pub mod generate;
pub mod metrics;
pub mod muse;
pub mod plots;
pub mod report;
pub mod score;
pub mod shard;
pub mod text;
pub mod tofu;
