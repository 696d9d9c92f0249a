//! Sums and means with numpy's exact summation order, and `scipy.stats.hmean`.
//!
//! numpy adds float64 arrays pairwise (blocks of 128 folded with 8 partial sums), not left to
//! right. Reproducing the order makes our aggregates bit-identical to the reference scripts, so
//! tests can compare them exactly and report numbers do not drift in the last digit.

/// `np.sum` of a contiguous float64 array (numpy's `pairwise_sum`).
pub fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &x in &a[i..] {
            res += x;
        }
        res
    } else {
        // Split in two halves, the first a multiple of the unroll factor.
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `np.mean`: NaN for an empty slice (numpy warns and returns nan).
pub fn mean(a: &[f64]) -> f64 {
    if a.is_empty() {
        return f64::NAN;
    }
    pairwise_sum(a) / a.len() as f64
}

/// `scipy.stats.hmean(values)` (scipy 1.17): `1 / mean(1 / a)`. A zero gives 0 (1/0 = inf, as
/// scipy with its divide warning silenced); a negative value or NaN gives NaN (scipy warns);
/// an empty slice gives NaN.
pub fn hmean(values: &[f64]) -> f64 {
    let inv: Vec<f64> = values.iter().map(|&v| if v < 0.0 { f64::NAN } else { 1.0 / v }).collect();
    1.0 / mean(&inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_is_exact_on_integers_and_hmean_handles_zero() {
        let a: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(pairwise_sum(&a), 500500.0);
        assert_eq!(hmean(&[1.0, 0.0, 2.0]), 0.0);
        assert!(hmean(&[1.0, -1.0]).is_nan());
        assert!((hmean(&[1.0, 2.0, 4.0]) - 3.0 / 1.75).abs() < 1e-15);
    }
}
