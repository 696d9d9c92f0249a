//! AutoLR: the GeN learning-rate rule (Bu & Xu, `gen-optim` 0.1.1 `lr_parabola`) as NGDiff uses it.
//!
//! Every `period` steps, after the update direction is known: take the optimizer's full step
//! `Δ = −η·d` (momentum/Adam included), evaluate the probe loss on one fresh batch at
//! `w + ηd`, `w − ηd` and `w` (three forwards, no backward), and fit `y(x) = ½A·x² − B·x` to
//! `y = L − L₀` at `x ∈ {−η, +η, 0}`. The three-point fit is exact:
//!
//!   A = (L₊ + L₋ − 2L₀)/η²,  B = (L₋ − L₊)/(2η),  η* = B/A.
//!
//! Accept when A > 0, B > 0 and R² > 0.99 (R² is 1 for an exact fit, undefined when all losses
//! are equal): `η ← s·η + (1−s)·clip(η*, η/2, 2η)` with smoothing s = 0.9. A fit that fails
//! outright (non-finite losses: GeN's `curve_fit` raising) halves η. Otherwise η is unchanged.
//!
//! Faithful quirk (algorithms.md §2.3 item 6): the probe step goes through the optimizer, so
//! momentum/Adam state is updated twice on probe steps, as in GeN.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// L(w + ηd), L(w), L(w − ηd).
    pub l_minus: f64,
    pub l_zero: f64,
    pub l_plus: f64,
    pub a: f64,
    pub b: f64,
    pub lr_star: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Accepted,
    /// A ≤ 0, B ≤ 0 or R² ≤ 0.99: the rate is kept.
    Rejected,
    /// Non-finite losses: the rate is halved.
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoLr {
    pub lr: f64,
    pub period: u64,
    pub smoothing: f64,
    pub last: Option<Fit>,
}

impl AutoLr {
    pub fn new(lr: f64, period: u64, smoothing: f64) -> Self {
        AutoLr { lr, period: period.max(1), smoothing, last: None }
    }

    /// Whether 1-based step `step` probes (GeN: `(t + 1) % lazy_freq == 0` for 0-based t).
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.period)
    }

    /// Update the rate from the probe losses at `w + ηd`, `w` and `w − ηd`.
    pub fn update(&mut self, l_minus: f64, l_zero: f64, l_plus: f64) -> Fit {
        let eta = self.lr;
        let a = (l_plus + l_minus - 2.0 * l_zero) / (eta * eta);
        let b = (l_minus - l_plus) / (2.0 * eta);
        let lr_star = b / a;
        let finite = [l_minus, l_zero, l_plus].iter().all(|v| v.is_finite());
        let outcome = if !finite {
            Outcome::Failed
        } else if a > 0.0 && b > 0.0 && r_squared(eta, l_minus - l_zero, l_plus - l_zero, a, b) > 0.99 {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        };
        match outcome {
            Outcome::Accepted => {
                let clipped = lr_star.clamp(eta / 2.0, 2.0 * eta);
                self.lr = self.smoothing * eta + (1.0 - self.smoothing) * clipped;
            }
            Outcome::Failed => self.lr = eta / 2.0,
            Outcome::Rejected => {}
        }
        let fit = Fit { l_minus, l_zero, l_plus, a, b, lr_star, outcome };
        self.last = Some(fit);
        fit
    }
}

/// R² of the parabola `½A x² − B x` on the points (−η, y₋), (η, y₊), (0, 0).
fn r_squared(eta: f64, y_minus: f64, y_plus: f64, a: f64, b: f64) -> f64 {
    let xs = [-eta, eta, 0.0];
    let ys = [y_minus, y_plus, 0.0];
    let mean = ys.iter().sum::<f64>() / 3.0;
    let ss_tot: f64 = ys.iter().map(|y| (y - mean).powi(2)).sum();
    let ss_res: f64 = xs.iter().zip(ys).map(|(x, y)| (y - (0.5 * a * x * x - b * x)).powi(2)).sum();
    if ss_tot == 0.0 {
        f64::NAN
    } else {
        1.0 - ss_res / ss_tot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Along the update direction, L(w − t·d) = q(t) = c + ½κ(t − t*)² is an exact quadratic in
    /// the step size t with minimiser t*. The probe points are t = −η, 0, +η.
    fn probe(eta: f64, t_star: f64, kappa: f64) -> (f64, f64, f64) {
        let q = |t: f64| 3.0 + 0.5 * kappa * (t - t_star).powi(2);
        (q(-eta), q(0.0), q(eta))
    }

    #[test]
    fn exact_quadratic_recovers_the_optimal_step() {
        for (eta, t_star) in [(1e-3, 1.3e-3), (0.1, 0.07), (2.0, 2.5)] {
            let mut a = AutoLr::new(eta, 1, 0.9);
            let (lm, l0, lp) = probe(eta, t_star, 4.0);
            let fit = a.update(lm, l0, lp);
            assert_eq!(fit.outcome, Outcome::Accepted);
            assert!((fit.lr_star - t_star).abs() <= 1e-9 * t_star, "η* {} vs optimum {t_star}", fit.lr_star);
            let expect = 0.9 * eta + 0.1 * t_star.clamp(eta / 2.0, 2.0 * eta);
            // a.lr inherits η*'s rounding, scaled by (1 − s).
            assert!((a.lr - expect).abs() <= 1e-9 * expect, "rate {} vs {expect}", a.lr);
        }
    }

    #[test]
    fn far_optimum_is_clipped_to_twice_and_half_the_rate() {
        let mut a = AutoLr::new(0.01, 1, 0.9);
        let (lm, l0, lp) = probe(0.01, 1.0, 1.0);
        a.update(lm, l0, lp);
        assert!((a.lr - (0.9 * 0.01 + 0.1 * 0.02)).abs() < 1e-15);
        let mut a = AutoLr::new(0.01, 1, 0.9);
        let (lm, l0, lp) = probe(0.01, 1e-4, 1.0);
        a.update(lm, l0, lp);
        assert!((a.lr - (0.9 * 0.01 + 0.1 * 0.005)).abs() < 1e-15);
    }

    #[test]
    fn failed_fit_halves_and_concave_fit_keeps_the_rate() {
        let mut a = AutoLr::new(0.02, 1, 0.9);
        assert_eq!(a.update(f64::NAN, 1.0, 1.0).outcome, Outcome::Failed);
        assert_eq!(a.lr, 0.01);
        assert_eq!(a.update(1.0, f64::INFINITY, 1.0).outcome, Outcome::Failed);
        assert_eq!(a.lr, 0.005);
        // Concave along d (A < 0): no minimum to move to.
        assert_eq!(a.update(0.5, 1.0, 0.4).outcome, Outcome::Rejected);
        assert_eq!(a.lr, 0.005);
        // Flat: R² undefined.
        assert_eq!(a.update(1.0, 1.0, 1.0).outcome, Outcome::Rejected);
        assert_eq!(a.lr, 0.005);
    }
}
