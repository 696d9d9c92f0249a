//! TOFU aggregates (Maini et al. 2024) as the legacy `locuslab/tofu` `aggregate_eval_stat.py`
//! computes them from per-question mean token losses (mean NLL over the answer tokens).
//!
//! Truth ratio direction. With length-normalized probabilities P(a|q)^(1/|a|) = exp(-L_a), the
//! paper's truth ratio is R = GM_j P(pert_j) / P(para) = exp(L_para - mean_j L_pert_j) (low R =
//! the model prefers the correct answer). The legacy code stores its inverse,
//! `stat = exp(mean_j L_pert_j - L_para)` = 1/R, and aggregates
//! forget: `mean(min(stat, 1/stat))`, other sets: `mean(max(0, 1 - 1/stat))` = mean(max(0, 1-R));
//! Forget Quality is `ks_2samp(stat_unlearned, stat_retain).pvalue`. The functions below take the
//! legacy `stat` values and repeat those operations in that order, so results match bit for bit.

use super::ks::ks_2samp_pvalue;
use super::means::{hmean, mean};
use crate::error::Result;

/// Length-normalized answer probability exp(-mean token NLL).
pub fn answer_prob(mean_loss: f64) -> f64 {
    (-mean_loss).exp()
}

/// Legacy TOFU's per-question truth statistic `exp(mean_j L_pert_j - L_para)` = 1/R
/// (`para_loss`: the paraphrased answer for forget/retain sets, the true answer for real authors
/// and world facts). `pert_losses` must not be empty (the mean of none is NaN).
pub fn truth_stat(para_loss: f64, pert_losses: &[f64]) -> f64 {
    // numpy's mean over the last axis: a plain left-to-right sum for the 3-5 perturbations.
    (mean(pert_losses) - para_loss).exp()
}

/// The paper's truth ratio R = GM_j P(pert_j) / P(para), computed as legacy does (1 / stat).
pub fn truth_ratio(para_loss: f64, pert_losses: &[f64]) -> f64 {
    1.0 / truth_stat(para_loss, pert_losses)
}

/// Forget-set "Truth Ratio": mean(min(stat, 1/stat)) = mean(min(R, 1/R)).
pub fn forget_truth_ratio(stats: &[f64]) -> f64 {
    // np.minimum propagates NaN, f64::min would drop it.
    let v: Vec<f64> = stats.iter().map(|&s| if s.is_nan() { s } else { s.min(1.0 / s) }).collect();
    mean(&v)
}

/// Retain / real-authors / world-facts "Truth Ratio": mean(max(0, 1 - 1/stat)) = mean(max(0, 1 - R)).
pub fn utility_truth_ratio(stats: &[f64]) -> f64 {
    let v: Vec<f64> = stats.iter().map(|&s| if s.is_nan() { s } else { (1.0 - 1.0 / s).max(0.0) }).collect();
    mean(&v)
}

/// Retain/forget-set "Prob.": mean of exp(-L) over the questions.
pub fn mean_answer_prob(losses: &[f64]) -> f64 {
    let p: Vec<f64> = losses.iter().map(|&l| answer_prob(l)).collect();
    mean(&p)
}

/// Per-question P_true / (P_true + sum_j P_pert_j), all length-normalized (real authors, world facts).
pub fn normalized_true_prob(true_loss: f64, pert_losses: &[f64]) -> f64 {
    let p_true = answer_prob(true_loss);
    // numpy sums the row [P_true, P_pert...] left to right (fewer than 8 entries).
    let all = pert_losses.iter().fold(0.0 + p_true, |acc, &l| acc + answer_prob(l));
    p_true / all
}

/// Real-authors / world-facts "Prob.": mean over questions of [`normalized_true_prob`].
/// `questions`: (true-answer loss, perturbed-answer losses) per question.
pub fn mean_normalized_true_prob(questions: &[(f64, Vec<f64>)]) -> f64 {
    let p: Vec<f64> = questions.iter().map(|(t, pert)| normalized_true_prob(*t, pert)).collect();
    mean(&p)
}

/// Forget Quality: KS two-sample p-value between the unlearned and the retain model's forget-set
/// truth statistics (either [`truth_stat`] or [`truth_ratio`] values, the same on both sides).
pub fn forget_quality(unlearned_stats: &[f64], retain_stats: &[f64]) -> Result<f64> {
    ks_2samp_pvalue(unlearned_stats, retain_stats)
}

/// The three numbers TOFU's Model Utility takes from one evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UtilityTriple {
    /// Mean ROUGE-L recall of greedy answers vs the gold answer (stemmer on).
    pub rouge: f64,
    pub prob: f64,
    /// [`utility_truth_ratio`].
    pub truth_ratio: f64,
}

/// Model Utility = harmonic mean of 9 numbers, fed to hmean in the legacy order
/// (real authors, world facts, retain; each ROUGE, Prob., Truth Ratio).
pub fn model_utility(real_authors: UtilityTriple, world_facts: UtilityTriple, retain: UtilityTriple) -> f64 {
    let v: Vec<f64> = [real_authors, world_facts, retain].iter().flat_map(|t| [t.rouge, t.prob, t.truth_ratio]).collect();
    hmean(&v)
}
