//! Metric implementations with the exact semantics of the reference code (rouge_score, sklearn,
//! scipy, MUSE, TOFU). Each is checked against the Python reference in tests/.

pub mod mink;

pub use mink::{min_k_score, MinKRounding};
