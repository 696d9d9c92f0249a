//! Survival function of the two-sided one-sample Kolmogorov-Smirnov statistic D_n,
//! `scipy.stats.kstwo.sf(d, n)` (scipy 1.17 `_ksstats._kolmogn`, Simard & L'Ecuyer 2011).
//! `ks_2samp` uses it as its asymptotic p-value with n = round(n1*n2/(n1+n2)).
//!
//! The method depends on n and n*d^2 exactly as scipy chooses: Ruben-Gambino closed forms at
//! the extremes, twice the one-sided Smirnov tail for large deviations, the Durbin matrix
//! (Marsaglia-Tsang-Wang) or Pomeranz recursion for small n*d^2, the Pelz-Good series otherwise.

use std::f64::consts::PI;

use super::double_double::ldexp;
use super::means::pairwise_sum;
use super::smirnov::smirnov_sf;

/// Rescaling step (2^128) that keeps the matrix powers and recursions inside f64's range.
const E128: i32 = 128;

fn clip01(p: f64) -> f64 {
    p.clamp(0.0, 1.0)
}

/// log(n! / n^n) by Stirling's series (scipy's `_log_nfactorial_div_n_pow_n`).
fn log_nfactorial_div_n_pow_n(n: f64) -> f64 {
    #[allow(clippy::excessive_precision)] // the digits of scipy's source
    const COEFFS: [f64; 8] = [
        -2.955065359477124183e-2,
        6.4102564102564102564e-3,
        -1.9175269175269175269e-3,
        8.4175084175084175084e-4,
        -5.952380952380952381e-4,
        7.9365079365079365079e-4,
        -2.7777777777777777778e-3,
        8.3333333333333333333e-2,
    ];
    let rn = 1.0 / n;
    let x = rn / n;
    let poly = COEFFS.iter().fold(0.0, |acc, &c| acc * x + c);
    n.ln() / 2.0 - n + (2.0 * PI).ln() / 2.0 + rn * poly
}

fn matmul(a: &[f64], b: &[f64], m: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * m];
    for i in 0..m {
        for k in 0..m {
            let aik = a[i * m + k];
            for j in 0..m {
                c[i * m + j] += aik * b[k * m + j];
            }
        }
    }
    c
}

/// P(D_n <= d) by the Durbin matrix: the (k,k) entry of H^n, times n!/n^n.
fn cdf_durbin_matrix(n: u64, d: f64) -> f64 {
    if d >= 1.0 {
        return 1.0;
    }
    let nd = n as f64 * d;
    if nd <= 0.5 {
        return 0.0;
    }
    let k = nd.ceil() as usize;
    let h = k as f64 - nd;
    let m = 2 * k - 1;

    let mut v: Vec<f64> = (1..=m).map(|j| 1.0 - h.powf(j as f64)).collect();
    let mut w = vec![0.0; m];
    let mut fac = 1.0;
    for j in 1..=m {
        w[j - 1] = fac;
        fac /= j as f64;
        v[j - 1] *= fac;
    }
    let tt = (2.0 * h - 1.0).max(0.0).powf(m as f64) - 2.0 * h.powf(m as f64);
    v[m - 1] = (1.0 + tt) * fac;

    let mut hm = vec![0.0; m * m];
    for i in 1..m {
        for r in (i - 1)..m {
            hm[r * m + i] = w[r - (i - 1)];
        }
    }
    for r in 0..m {
        hm[r * m] = v[r];
    }
    for j in 0..m {
        hm[(m - 1) * m + j] = v[m - 1 - j];
    }

    let mut pwr: Vec<f64> = (0..m * m).map(|i| if i / m == i % m { 1.0 } else { 0.0 }).collect();
    let (mut nn, mut expnt, mut h_expnt) = (n, 0i64, 0i64);
    let big = ldexp(1.0, E128);
    while nn > 0 {
        if nn % 2 == 1 {
            pwr = matmul(&pwr, &hm, m);
            expnt += h_expnt;
        }
        nn /= 2;
        if nn == 0 {
            break; // scipy squares once more here, but never uses the result
        }
        hm = matmul(&hm, &hm, m);
        h_expnt *= 2;
        if hm[(k - 1) * m + (k - 1)].abs() > big {
            hm.iter_mut().for_each(|x| *x /= big);
            h_expnt += E128 as i64;
        }
    }
    let mut p = pwr[(k - 1) * m + (k - 1)];
    let small = ldexp(1.0, -E128);
    for i in 1..=n {
        p = i as f64 * p / n as f64;
        if p.abs() < small {
            p *= big;
            expnt -= E128 as i64;
        }
    }
    if expnt != 0 {
        p = ldexp(p, expnt.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
    }
    clip01(p)
}

/// Interval of non-zero entries of row i of the Pomeranz recursion.
fn pomeranz_j1j2(i: i64, n: i64, ll: i64, ceilf: i64, roundf: i64) -> (i64, i64) {
    let (j1, j2) = if i == 0 {
        (-ll - ceilf - 1, ll + ceilf - 1)
    } else {
        let (ip1div2, ip1mod2) = ((i + 1).div_euclid(2), (i + 1).rem_euclid(2));
        if ip1mod2 == 0 {
            if ip1div2 == n + 1 {
                (n - ll - ceilf - 1, n + ll + ceilf - 1)
            } else {
                (ip1div2 - 1 - ll - roundf - 1, ip1div2 + ll - 1 + ceilf - 1)
            }
        } else {
            (ip1div2 - 1 - ll - 1, ip1div2 + ll + roundf - 1)
        }
    };
    ((j1 + 2).max(0), j2.min(n))
}

/// P(D_n <= d) by the Pomeranz (1974) recursion (scipy uses it for n <= 140).
fn cdf_pomeranz(n: u64, d: f64) -> f64 {
    let ni = n as i64;
    let t = n as f64 * d;
    let ll = t.floor() as i64;
    let f = t - ll as f64;
    let g = f.min(1.0 - f);
    let ceilf = i64::from(f > 0.0);
    let roundf = i64::from(f > 0.5);
    let npwrs = (2 * (ll + 1)) as usize;
    let (mut gp, mut twogp, mut onem2gp) = (vec![1.0; npwrs], vec![1.0; npwrs], vec![1.0; npwrs]);
    let (g_n, two_g_n, one_m2g_n) = (g / n as f64, 2.0 * g / n as f64, (1.0 - 2.0 * g) / n as f64);
    for m in 1..npwrs {
        gp[m] = gp[m - 1] * g_n / m as f64;
        twogp[m] = twogp[m - 1] * two_g_n / m as f64;
        onem2gp[m] = onem2gp[m - 1] * one_m2g_n / m as f64;
    }
    let small = ldexp(1.0, -E128);
    let big = ldexp(1.0, E128);
    let mut v0 = vec![0.0; npwrs];
    let mut v1 = vec![0.0; npwrs];
    v1[0] = 1.0;
    let (mut v0s, mut v1s) = (0i64, 0i64);
    let mut expnt = 0i64;
    let (mut j1, _) = pomeranz_j1j2(0, ni, ll, ceilf, roundf);
    for i in 1..(2 * ni + 2) {
        let k1 = j1;
        std::mem::swap(&mut v0, &mut v1);
        std::mem::swap(&mut v0s, &mut v1s);
        v1.iter_mut().for_each(|x| *x = 0.0);
        let j2;
        (j1, j2) = pomeranz_j1j2(i, ni, ll, ceilf, roundf);
        let pwrs = if i == 1 || i == 2 * ni + 1 {
            &gp
        } else if i % 2 == 1 {
            &twogp
        } else {
            &onem2gp
        };
        let ln2 = j2 - k1 + 1;
        if ln2 > 0 {
            // Full convolution of V0[k1-V0s ..][..ln2] with pwrs[..ln2]; keep entries j1-k1 ..= j2-k1.
            let base = (k1 - v0s) as usize;
            let ln2 = ln2 as usize;
            let conv_start = (j1 - k1) as usize;
            let conv_len = (j2 - j1 + 1).max(0) as usize;
            // numpy slicing clips at the array end.
            let a_len = ln2.min(npwrs - base.min(npwrs));
            let b_len = ln2.min(npwrs);
            for (out, idx) in (conv_start..conv_start + conv_len).enumerate() {
                let mut s = 0.0;
                for a in 0..a_len.min(idx + 1) {
                    let b = idx - a;
                    if b < b_len {
                        s += v0[base + a] * pwrs[b];
                    }
                }
                v1[out] = s;
            }
            let vmax = v1.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if 0.0 < vmax && vmax < small {
                v1.iter_mut().for_each(|x| *x *= big);
                expnt -= E128 as i64;
            }
            v1s = v0s + j1 - k1;
        }
    }
    let mut ans = v1[(ni - v1s) as usize];
    for m in 1..=n {
        if ans.abs() > big {
            ans *= small;
            expnt += E128 as i64;
        }
        ans *= m as f64;
    }
    if expnt != 0 {
        ans = ldexp(ans, expnt.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
    }
    clip01(ans)
}

/// Pelz-Good asymptotic series for P(D_n <= d).
fn cdf_pelz_good(n: u64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let nf = n as f64;
    let z = nf.sqrt() * x;
    // Powers through libm pow, as numpy's `**` on float64 scalars.
    let zp = |e: f64| z.powf(e);
    let (z2, z3, z4, z6) = (zp(2.0), zp(3.0), zp(4.0), zp(6.0));
    let (pi2, pi4, pi6) = (PI.powf(2.0), PI.powf(4.0), PI.powf(6.0));
    let qlog = -pi2 / 8.0 / z2;
    if qlog < -708.0 {
        return 0.0;
    }
    let q = qlog.exp();
    let (k1a, k1b) = (-z2, pi2 / 4.0);
    let k2a = 6.0 * z6 + 2.0 * z4;
    let k2b = (2.0 * z4 - 5.0 * z2) * pi2 / 4.0;
    let k2c = pi4 * (1.0 - 2.0 * z2) / 16.0;
    let k3d = pi6 * (5.0 - 30.0 * z2) / 64.0;
    let k3c = pi4 * (-60.0 * z2 + 212.0 * z4) / 16.0;
    let k3b = pi2 * (135.0 * z4 - 96.0 * z6) / 4.0;
    let k3a = -30.0 * z6 - 90.0 * zp(8.0);

    let mut kk = [0.0f64; 4];
    let maxk = (16.0 * z / PI).ceil() as i64;
    for k in (1..=maxk).rev() {
        let m = (2 * k - 1) as f64;
        let (m2, m4, m6) = (m * m, m * m * m * m, m * m * m * m * m * m); // exact small integers
        let qpower = q.powf((8 * k) as f64);
        let coeffs = [1.0, k1a + k1b * m2, k2a + k2b * m2 + k2c * m4, k3a + k3b * m2 + k3c * m4 + k3d * m6];
        for (acc, c) in kk.iter_mut().zip(coeffs) {
            *acc = *acc * qpower + c;
        }
    }
    let sqrt2pi = (2.0 * PI).sqrt();
    let denom = [z, 6.0 * z4, 72.0 * zp(7.0), 6480.0 * zp(10.0)];
    for (acc, den) in kk.iter_mut().zip(denom) {
        *acc = *acc * q * sqrt2pi / den;
    }
    let q = (-pi2 / 2.0 / z2).exp();
    let sqrt3z = 3f64.sqrt() * z;
    let (mut k2terms, mut k3terms) = (Vec::new(), Vec::new());
    for k in (1..=maxk).rev() {
        let ksq = (k * k) as f64;
        let qp = q.powf(ksq);
        let kspi = PI * k as f64;
        k2terms.push(ksq * qp);
        k3terms.push((sqrt3z + kspi) * (sqrt3z - kspi) * ksq * qp);
    }
    kk[2] += pairwise_sum(&k2terms) * (pi2 * sqrt2pi / (-36.0 * z3));
    kk[3] += pairwise_sum(&k3terms) * (pi2 * sqrt2pi / (216.0 * z6));
    for (i, acc) in kk.iter_mut().enumerate() {
        *acc /= nf.powf(i as f64 / 2.0);
    }
    kk.iter().sum()
}

/// `scipy.stats.kstwo.sf(d, n)` = P(D_n > d) for the two-sided one-sample statistic.
pub fn kstwo_sf(d: f64, n: u64) -> f64 {
    if d.is_nan() || n == 0 {
        return f64::NAN;
    }
    if d >= 1.0 {
        return 0.0;
    }
    if d <= 0.0 {
        return 1.0;
    }
    let nf = n as f64;
    let t = nf * d;
    if t <= 1.0 {
        // Ruben-Gambino: 1/(2n) <= d <= 1/n
        if t <= 0.5 {
            return 1.0;
        }
        let cdf = if n <= 140 {
            (1..=n).map(|i| i as f64 * (1.0 / nf) * (2.0 * t - 1.0)).fold(1.0, |p, x| p * x)
        } else {
            (log_nfactorial_div_n_pow_n(nf) + nf * (2.0 * t - 1.0).ln()).exp()
        };
        return clip01(1.0 - cdf);
    }
    if t >= nf - 1.0 {
        return clip01(2.0 * (1.0 - d).powf(nf));
    }
    let n_i = n as i64;
    if d >= 0.5 {
        return clip01(2.0 * smirnov_sf(n_i, d));
    }
    let nxsquared = t * d;
    if n <= 140 {
        if nxsquared <= 0.754693 {
            return clip01(1.0 - cdf_durbin_matrix(n, d));
        }
        if nxsquared <= 4.0 {
            return clip01(1.0 - cdf_pomeranz(n, d));
        }
        return clip01(2.0 * smirnov_sf(n_i, d));
    }
    if nxsquared >= 370.0 {
        return 0.0;
    }
    if nxsquared >= 2.2 {
        return clip01(2.0 * smirnov_sf(n_i, d));
    }
    let cdf = if n <= 100_000 && nf * d.powf(1.5) <= 1.4 { cdf_durbin_matrix(n, d) } else { cdf_pelz_good(n, d) };
    clip01(1.0 - cdf)
}
