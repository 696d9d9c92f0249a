//! Evaluation: scoring, MUSE and TOFU metrics, reports.

pub mod generate;
pub mod metrics;
pub mod score;
