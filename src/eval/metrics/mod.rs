//! Metric implementations with the exact semantics of the reference code (rouge_score, sklearn,
//! scipy, MUSE, TOFU). Each is checked against the Python reference in tests/metrics.rs.

mod double_double;
mod kolmogorov;
pub mod ks;
pub mod means;
pub mod mink;
pub mod porter;
pub mod privleak;
pub mod roc;
pub mod rouge;
mod smirnov;
pub mod tofu;

pub use ks::{ks_2samp, ks_2samp_pvalue, KsMethod, KsResult, KS_MAX_EXACT_N};
pub use means::{hmean, mean, pairwise_sum};
pub use mink::{min_k_score, MinKRounding};
pub use porter::PorterStemmer;
pub use privleak::{muse_auc, privleak, AUC_RETRAIN_BOOKS, AUC_RETRAIN_NEWS};
pub use roc::{roc_auc, roc_curve, trapezoid_area, RocCurve};
pub use rouge::{lcs_len, rouge_l, rouge_l_tokens, RougeL, RougeScorer, RougeTokenizer};
