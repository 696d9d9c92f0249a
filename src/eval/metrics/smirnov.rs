//! Survival function of the one-sided Kolmogorov-Smirnov statistic D+_n (`scipy.special.smirnov`),
//! which scipy's two-sided `kstwo.sf` uses for its tail (`2 * smirnov(n, d)`).
//!
//! Birnbaum-Tingey / Smirnov sum (van Mulbregt, arXiv 1802.06966), as in scipy's xsf:
//!   P(D+_n > x) = x * sum_{v=0}^{floor(n(1-x))} C(n,v) (x + v/n)^(v-1) (1 - x - v/n)^(n-v)
//! evaluated in double-double with separately tracked binary exponents (binomials overflow f64),
//! or, for small x and large n, through the few-term upper sum. Only the survival function is
//! computed here; scipy computes the CDF and PDF alongside with the same terms.

use super::double_double::{ldexp, Dd};

/// n above which scipy approximates instead of summing.
const SMIRNOV_MAX_COMPUTE_N: i64 = 1_000_000;
/// The upper sum is used with at most this many terms and for n at least SM_UPPERSUM_MIN_N.
const SM_UPPER_MAX_TERMS: i64 = 3;
const SM_UPPERSUM_MIN_N: i64 = 10;
/// Keep both words of a double-double normal when raising to a power.
const SM_MAX_EXPONENT: i64 = 960;
/// cephes MINLOG = log(2^-1075): exp of anything below is 0.
#[allow(clippy::excessive_precision)] // the digits of scipy's source
const MINLOG: f64 = -7.451332191019412076235245305675398106812E2;

/// `a^m` in double-double: libm `pow` on the high word, first-order correction for the low word.
fn pow_dd(a: Dd, m: i64) -> Dd {
    if m <= 0 {
        if m == 0 {
            return Dd::new(1.0);
        }
        return 1.0 / pow_dd(a, -m);
    }
    if a.is_zero() {
        return Dd::new(0.0);
    }
    let ans = a.hi.powf(m as f64);
    let r = a.lo / a.hi;
    let mut adj = m as f64 * r;
    if adj.abs() > 1e-8 {
        if adj.abs() < 1e-4 {
            // First two terms of the Taylor series of (1+r)^m.
            adj += (m as f64 * r) * ((m - 1) as f64 / 2.0 * r);
        } else {
            adj = (m as f64 * r.ln_1p()).exp_m1();
        }
    }
    Dd::new(ans) + ans * adj
}

fn pow2(a: f64, b: f64, m: i64) -> f64 {
    pow_dd(Dd::new(a) + b, m).hi
}

/// scipy's `nextPowerOf2` (despite the name: |x + x*2^-52|, an integer when that is exact).
fn next_power_of_2(x: f64) -> f64 {
    let q = ldexp(x, 1 - f64::MANTISSA_DIGITS as i32);
    let l = (q + x).abs();
    if l == 0.0 {
        x.abs()
    } else {
        l
    }
}

/// `a^m` as (significand, binary exponent), splitting large powers so nothing underflows.
fn pow2_scaled(a: Dd, m: i64) -> (Dd, i64) {
    if m <= 0 {
        if m == 0 {
            return (Dd::new(1.0), 0);
        }
        let (ans, e1) = pow2_scaled(a, -m);
        let (ans, e2) = (1.0 / ans).frexp();
        return (ans, -e1 + e2 as i64);
    }
    let (y, ye) = a.frexp();
    let ye = ye as i64;
    if m == 1 {
        return (y, ye);
    }
    let mut max_expt = SM_MAX_EXPONENT;
    // Quick test whether y^m might drop below 2^-960; if so, find how far one power may go.
    if m as f64 * (y.hi - 1.0) / y.hi < -(SM_MAX_EXPONENT as f64) * std::f64::consts::LN_2 {
        let lg2y = y.hi.ln() / std::f64::consts::LN_2;
        let lg_ans = m as f64 * lg2y;
        if lg_ans <= -(SM_MAX_EXPONENT as f64) {
            max_expt = (next_power_of_2(-(SM_MAX_EXPONENT as f64) / lg2y + 1.0) / 2.0) as i64;
        }
    }
    if m <= max_expt {
        let (ans, e) = pow_dd(y, m).frexp();
        return (ans, e as i64 + m * ye);
    }
    let (q, r) = (m / max_expt, m % max_expt);
    // y^m = (y^max_expt)^q * y^r
    let (y2r, y2r_e) = pow2_scaled(y, r);
    let (y2m, y2m_e) = pow2_scaled(y, max_expt);
    let (y2mq, y2mq_e) = pow2_scaled(y2m, q);
    let (ans, e) = (y2r * y2mq).frexp();
    (ans, e as i64 + y2mq_e + y2m_e * q + y2r_e + m * ye)
}

/// ((a+b)/(c+d))^m in double-double.
fn pow4(a: f64, b: f64, c: f64, d: f64, m: i64) -> Dd {
    if m <= 0 {
        if m == 0 {
            return Dd::new(1.0);
        }
        return pow4(c, d, a, b, -m);
    }
    let num = Dd::new(a) + b;
    let den = Dd::new(c) + d;
    if num.is_zero() {
        return if den.is_zero() { Dd { hi: f64::NAN, lo: f64::NAN } } else { Dd::new(0.0) };
    }
    if den.is_zero() {
        let inf = if num.hi < 0.0 || (num.hi == 0.0 && num.lo < 0.0) { f64::NEG_INFINITY } else { f64::INFINITY };
        return Dd { hi: inf, lo: inf };
    }
    pow_dd(num / den, m)
}

/// floor(n*x) and the fractional part, exactly (double-double product).
fn mod_nx(n: i64, x: f64) -> (f64, i64) {
    let nx = n as f64 * Dd::new(x);
    let nx_floor = nx.floor();
    let mut alpha = (nx - nx_floor).hi;
    let mut floor = nx_floor.hi as i64;
    if alpha == 1.0 {
        floor += 1;
        alpha = 0.0;
    }
    (alpha, floor)
}

/// Binomial C(n, j+1) from C(n, j), kept as (significand in [0.5, 1), exponent).
fn update_binomial(c_man: &mut Dd, c_exp: &mut i64, n: i64, j: i64) {
    let rat = Dd::new((n - j) as f64) / (j as f64 + 1.0);
    let (man, e) = (*c_man * rat).frexp();
    *c_exp += e as i64;
    *c_man = man;
}

/// One term A_v = C(n,v) (1 - x - v/n)^(n-v) (x + v/n)^(v-1).
fn term(n: i64, x: f64, v: i64, c_man: Dd, c_exp: i64) -> Dd {
    let t2x = Dd::new((n - v) as f64) / n as f64 - x;
    let (t2, t2e) = pow2_scaled(t2x, n - v);
    let t1x = Dd::new(v as f64) / n as f64 + x;
    let (t1, t1e) = pow2_scaled(t1x, v - 1);
    let ans = (t1 * t2) * c_man;
    let e = (c_exp + t1e + t2e).clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    ans.ldexp(e)
}

/// `scipy.special.smirnov(n, x)` = P(D+_n > x).
pub fn smirnov_sf(n: i64, x: f64) -> f64 {
    if !(n > 0 && (0.0..=1.0).contains(&x)) {
        return f64::NAN;
    }
    if n == 1 {
        return 1.0 - x;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x == 1.0 {
        return 0.0;
    }
    let (alpha, nxfl) = mod_nx(n, x);
    let mut n1mxfl = n - nxfl - if alpha == 0.0 { 0 } else { 1 };
    let mut n1mxceil = n - nxfl;
    // With alpha == 0 the last term belongs to neither sum.
    if alpha == 0.0 {
        n1mxfl -= 1;
        n1mxceil += 1;
    }
    // x <= 1/n
    if nxfl == 0 || (nxfl == 1 && alpha == 0.0) {
        let t = pow2(1.0, x, n - 1);
        return 1.0 - x * t;
    }
    // The survival function underflows.
    if -2.0 * n as f64 * x * x < MINLOG {
        return 0.0;
    }
    // x >= 1 - 1/n
    if nxfl >= n - 1 {
        return pow2(1.0, -x, n);
    }
    if n > SMIRNOV_MAX_COMPUTE_N {
        // p ~ exp(-(6nx+1)^2 / 18n)
        let logp = -(6.0 * n as f64 * x + 1.0).powi(2) / 18.0 / n as f64;
        return if logp < -std::f64::consts::LN_2 { logp.exp() } else { 1.0 - -logp.exp_m1() };
    }
    let n_upper_terms = n - n1mxceil + 1;
    let use_upper =
        (n_upper_terms <= 1 && x < 0.5) || (n >= SM_UPPERSUM_MIN_N && n_upper_terms <= SM_UPPER_MAX_TERMS && x <= 0.5 / (n as f64).sqrt());

    let (start, step, n_terms, first) = if use_upper {
        (n, -1, n - n1mxceil + 1, pow4(1.0, x, 1.0, 0.0, n - 1))
    } else {
        (0, 1, n1mxfl + 1, pow4(1.0, -x, 1.0, 0.0, n) / x)
    };
    let mut sum = Dd::new(0.0) + first;
    let (mut c_man, mut c_exp) = (Dd::new(1.0), 0i64);
    update_binomial(&mut c_man, &mut c_exp, n, 0);
    let vmid = n / 2;
    for j in 1..n_terms {
        let v = start + j * step;
        let aj = term(n, x, v, c_man, c_exp);
        if aj.is_finite() && !aj.is_zero() {
            sum = sum + aj;
        }
        if !aj.is_zero() {
            // Stop once the remaining terms cannot move the sum.
            if (4 * (n_terms - j)) as f64 * aj.hi.abs() < f64::EPSILON * sum.hi && j != n_terms - 1 {
                break;
            }
        } else if j > vmid {
            break;
        }
        update_binomial(&mut c_man, &mut c_exp, n, j);
    }
    let prob = (x * sum).hi;
    let sf = if step < 0 { 1.0 - prob } else { prob };
    sf.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_at_the_edges() {
        // n = 2: P(D+ > x) for 1/2 <= x < 1 is (1-x)^2.
        assert!((smirnov_sf(2, 0.75) - 0.0625).abs() < 1e-16);
        // x <= 1/n: 1 - x (1+x)^(n-1)
        assert!((smirnov_sf(10, 0.05) - (1.0 - 0.05 * 1.05f64.powi(9))).abs() < 1e-15);
    }
}
