//! Evaluation: scoring, MUSE and TOFU metrics, reports.

pub mod metrics;
pub mod score;
