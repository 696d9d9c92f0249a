//! Min-K% Prob membership score (Shi et al. 2024), as MUSE's PrivLeak uses it.

/// How many of the lowest log-probs enter the mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MinKRounding {
    /// `int(len * k)`, as MUSE's original code: short texts give no score (NaN there, `None` here).
    Floor,
    /// `max(1, int(len * k))`, as open-unlearning.
    AtLeastOne,
}

/// `-mean` of the lowest `k` fraction of token log-probs; `None` when no token is selected.
pub fn min_k_score(token_logprobs: &[f64], k: f64, rounding: MinKRounding) -> Option<f64> {
    let n = token_logprobs.len();
    // Python's int() truncates toward zero; len*k is non-negative here.
    let mut count = (n as f64 * k) as usize;
    if rounding == MinKRounding::AtLeastOne {
        count = count.max(1);
    }
    let count = count.min(n);
    if count == 0 {
        return None;
    }
    let mut sorted = token_logprobs.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Some(-sorted[..count].iter().sum::<f64>() / count as f64)
}
