//! Metric implementations with the exact semantics of the reference code (rouge_score, sklearn,
//! scipy, MUSE, TOFU). Each is checked against the Python reference in tests/metrics.rs.

pub mod mink;
pub mod porter;
pub mod rouge;

pub use mink::{min_k_score, MinKRounding};
pub use porter::PorterStemmer;
pub use rouge::{lcs_len, rouge_l, rouge_l_tokens, RougeL, RougeScorer, RougeTokenizer};
