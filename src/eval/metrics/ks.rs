//! Two-sample Kolmogorov-Smirnov test, `scipy.stats.ks_2samp(a, b)` with the defaults
//! `alternative='two-sided', method='auto'` (scipy 1.17). TOFU's Forget Quality is its p-value.
//!
//! 'auto' means: the exact null distribution when max(n1, n2) <= 10000 (lattice-path counting,
//! Hodges 1958; for n1 != n2 the "1 - p" recursion of Viehmann, arXiv 2102.08037), falling back
//! to the asymptotic `kstwo.sf(D, round(n1*n2/(n1+n2)))` when the exact value is not a valid
//! probability; the asymptotic method directly for larger samples. The float operations follow
//! scipy's order so the exact p-values agree to the last few bits.

pub use super::kolmogorov::kstwo_sf;
pub use super::smirnov::smirnov_sf;
use crate::error::{Error, Result};

/// scipy's `MAX_AUTO_N`: 'auto' tries the exact distribution up to this sample size.
pub const KS_MAX_EXACT_N: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KsMethod {
    Exact,
    Asymptotic,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KsResult {
    /// D = sup |F1 - F2| (on the exact path rounded to the lattice, h / lcm(n1, n2), as scipy).
    pub statistic: f64,
    pub pvalue: f64,
    pub method: KsMethod,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The two-sided D (before lattice rounding): max of sup(F1-F2) and sup(F2-F1), both
/// right-continuous ECDFs evaluated at every observation (ties handled as scipy's searchsorted).
fn ks_statistic(sorted1: &[f64], sorted2: &[f64]) -> f64 {
    let (n1, n2) = (sorted1.len() as f64, sorted2.len() as f64);
    let (mut max_diff, mut min_diff) = (f64::NEG_INFINITY, f64::INFINITY);
    for &v in sorted1.iter().chain(sorted2) {
        let c1 = sorted1.partition_point(|&x| x <= v) as f64 / n1;
        let c2 = sorted2.partition_point(|&x| x <= v) as f64 / n2;
        let diff = c1 - c2;
        max_diff = max_diff.max(diff);
        min_diff = min_diff.min(diff);
    }
    let min_s = (-min_diff).clamp(0.0, 1.0);
    if min_s > max_diff {
        min_s
    } else {
        max_diff
    }
}

/// P(D_{n,n} >= h/n) for equal sample sizes: alternating binomial sum in Horner form.
fn prob_outside_square(n: u64, h: u64) -> f64 {
    let (n, h) = (n as i64, h as i64);
    let mut p = 0.0;
    let mut k = (n as f64 / h as f64).floor() as i64;
    while k >= 0 {
        let mut p1 = 1.0;
        for j in 0..h {
            p1 = (n - k * h - j) as f64 * p1 / (n + k * h + j + 1) as f64;
        }
        p = p1 * (1.0 - p);
        k -= 1;
    }
    2.0 * p
}

/// 1 - (fraction of lattice paths from (0,0) to (m,n) staying strictly inside |x/m - y/n| < h/lcm),
/// i.e. P(D >= h/lcm), computed column by column on a sliding window, directly as "1 - p".
fn prob_outside_inside_method(m: u64, n: u64, g: u64, h: u64) -> f64 {
    let (m, n) = if m < n { (n, m) } else { (m, n) };
    let (m, n, g, h) = (m as i64, n as i64, g as i64, h as i64);
    let (mg, ng) = (m / g, n / g);
    let mut minj: i64 = 0;
    let mut maxj: i64 = ((h as f64 / mg as f64).ceil() as i64).min(n + 1);
    let mut curlen = maxj - minj;
    let len_a = (2 * maxj + 2).min(n + 1) as usize;
    let mut a = vec![1.0f64; len_a];
    a[minj as usize..maxj as usize].iter_mut().for_each(|x| *x = 0.0);
    for i in 1..=m {
        let (lastminj, lastlen) = (minj, curlen);
        minj = ((((ng * i - h) as f64 / mg as f64).floor() as i64) + 1).max(0).min(n);
        maxj = (((ng * i + h) as f64 / mg as f64).ceil() as i64).min(n + 1);
        if maxj <= minj {
            return 1.0;
        }
        let mut val = if minj == 0 { 0.0 } else { 1.0 };
        for jj in 0..(maxj - minj) {
            let j = jj + minj;
            val = (a[(jj + minj - lastminj) as usize] * i as f64 + val * j as f64) / (i + j) as f64;
            a[jj as usize] = val;
        }
        curlen = maxj - minj;
        if lastlen > curlen {
            // Cells that left the window count as "already outside".
            let lo = (maxj - minj) as usize;
            let hi = (lo + (lastlen - curlen) as usize).min(len_a);
            a[lo.min(len_a)..hi].iter_mut().for_each(|x| *x = 1.0);
        }
    }
    a[(maxj - minj - 1) as usize]
}

/// scipy's `_attempt_exact_2kssamp` (two-sided): Some((D on the lattice, p)) or None when the
/// result is not a probability (scipy then warns and switches to the asymptotic method).
fn exact_pvalue(n1: u64, n2: u64, g: u64, d: f64) -> (f64, Option<f64>) {
    let lcm = (n1 / g) * n2;
    let h = (d * lcm as f64).round_ties_even() as u64;
    let d = h as f64 / lcm as f64;
    if h == 0 {
        return (d, Some(1.0));
    }
    let p = if n1 == n2 { prob_outside_square(n1, h) } else { prob_outside_inside_method(n1, n2, g, h) };
    (d, (0.0..=1.0).contains(&p).then_some(p))
}

/// `scipy.stats.ks_2samp(a, b)` (two-sided, method='auto'). NaN in either sample gives NaN
/// statistic and p-value (scipy's nan_policy='propagate'); an empty sample is an error.
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Result<KsResult> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::Other(format!("ks_2samp: samples must not be empty (got {} and {} values)", a.len(), b.len())));
    }
    if a.iter().chain(b).any(|x| x.is_nan()) {
        let method = if a.len().max(b.len()) <= KS_MAX_EXACT_N { KsMethod::Exact } else { KsMethod::Asymptotic };
        return Ok(KsResult { statistic: f64::NAN, pvalue: f64::NAN, method });
    }
    let sort = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s
    };
    let (s1, s2) = (sort(a), sort(b));
    let (n1, n2) = (s1.len() as u64, s2.len() as u64);
    let mut d = ks_statistic(&s1, &s2);
    if s1.len().max(s2.len()) <= KS_MAX_EXACT_N {
        let (d_lattice, p) = exact_pvalue(n1, n2, gcd(n1, n2), d);
        if let Some(p) = p {
            return Ok(KsResult { statistic: d_lattice, pvalue: p.clamp(0.0, 1.0), method: KsMethod::Exact });
        }
        tracing::warn!("ks_2samp: exact calculation unsuccessful for n = {n1}, {n2}; switching to the asymptotic method");
        d = d_lattice;
    }
    let (big, small) = (n1.max(n2) as f64, n1.min(n2) as f64);
    let en = big * small / (big + small);
    let p = kstwo_sf(d, en.round_ties_even() as u64);
    Ok(KsResult { statistic: d, pvalue: p.clamp(0.0, 1.0), method: KsMethod::Asymptotic })
}

/// The p-value of [`ks_2samp`].
pub fn ks_2samp_pvalue(a: &[f64], b: &[f64]) -> Result<f64> {
    Ok(ks_2samp(a, b)?.pvalue)
}
