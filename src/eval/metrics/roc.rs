//! ROC curve and its area, as `sklearn.metrics.roc_curve` / `roc_auc_score` (binary labels,
//! no sample weights, `drop_intermediate=True`). Tied scores form one threshold, so a tie between
//! a positive and a negative counts 1/2, as in the Mann-Whitney statistic.
//!
//! The operations follow sklearn's order (stable descending sort, cumulative counts at the last
//! index of each distinct score, collinear points dropped, rates divided by the final counts,
//! `scipy.integrate.trapezoid` with numpy's pairwise sum), so the area matches to the last bit.

use super::means::pairwise_sum;
use crate::error::{Error, Result};

/// Points of the ROC curve, starting at (0, 0) with threshold +inf, as sklearn returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct RocCurve {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

fn check_inputs(what: &str, labels: &[bool], scores: &[f64]) -> Result<()> {
    if labels.len() != scores.len() {
        return Err(Error::Other(format!("{what}: {} labels but {} scores", labels.len(), scores.len())));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Other(format!("{what}: score {i} is {} (sklearn rejects non-finite scores)", scores[i])));
    }
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 || positives == labels.len() {
        return Err(Error::Other(format!(
            "{what}: only one class present in the {} labels ({}); ROC AUC is not defined",
            labels.len(),
            if positives == 0 { "all negative" } else { "all positive" }
        )));
    }
    Ok(())
}

/// `sklearn.metrics.roc_curve(labels, scores)`. Errors when the lengths differ, a score is not
/// finite, or only one class is present (sklearn warns and returns NaN rates there).
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Result<RocCurve> {
    check_inputs("roc_curve", labels, scores)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable sort, descending; the order inside a tie does not change counts at tie ends.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let sorted: Vec<f64> = order.iter().map(|&i| scores[i]).collect();

    // Cumulative true/false positives at the last index of each run of equal scores.
    let (mut fps, mut tps, mut thr) = (Vec::new(), Vec::new(), Vec::new());
    let mut tp = 0.0;
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        }
        // `!=` rather than total order: -0.0 and 0.0 are one threshold, as np.diff sees them.
        let run_ends = k + 1 == sorted.len() || sorted[k + 1] != sorted[k];
        if run_ends {
            tps.push(tp);
            fps.push((k + 1) as f64 - tp);
            thr.push(sorted[k]);
        }
    }

    // drop_intermediate: keep the ends and every point where the second difference is non-zero.
    if fps.len() > 2 {
        let keep: Vec<usize> = (0..fps.len())
            .filter(|&i| {
                i == 0 || i + 1 == fps.len() || {
                    let d2 = |v: &[f64]| (v[i + 1] - v[i]) - (v[i] - v[i - 1]);
                    d2(&fps) != 0.0 || d2(&tps) != 0.0
                }
            })
            .collect();
        fps = keep.iter().map(|&i| fps[i]).collect();
        tps = keep.iter().map(|&i| tps[i]).collect();
        thr = keep.iter().map(|&i| thr[i]).collect();
    }

    fps.insert(0, 0.0);
    tps.insert(0, 0.0);
    thr.insert(0, f64::INFINITY);
    let (fp_all, tp_all) = (fps[fps.len() - 1], tps[tps.len() - 1]);
    Ok(RocCurve { fpr: fps.iter().map(|f| f / fp_all).collect(), tpr: tps.iter().map(|t| t / tp_all).collect(), thresholds: thr })
}

/// `sklearn.metrics.auc(x, y)` for non-decreasing `x`: trapezoid area with numpy's summation.
pub fn trapezoid_area(x: &[f64], y: &[f64]) -> f64 {
    let terms: Vec<f64> = (1..x.len()).map(|i| (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2.0).collect();
    pairwise_sum(&terms)
}

/// `sklearn.metrics.roc_auc_score(labels, scores)` = `auc(*roc_curve(labels, scores)[:2])`:
/// P(score of a positive > score of a negative), ties counting 1/2. Errors where [`roc_curve`] does.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64> {
    let curve = roc_curve(labels, scores)?;
    Ok(trapezoid_area(&curve.fpr, &curve.tpr))
}
