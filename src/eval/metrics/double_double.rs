//! Double-double arithmetic (about 106-bit significand), the subset that scipy's one-sided
//! Smirnov distribution needs. Each operation is the classic error-free-transformation formula
//! (Dekker, Knuth two-sum, fused multiply-add two-product; Bailey/Hida's QD package), so the
//! rounding of every step is the same as in scipy's `xsf` C++ header.

use std::ops::{Add, Div, Mul, Neg, Sub};

/// `hi + lo` with `|lo| <= ulp(hi)/2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dd {
    pub hi: f64,
    pub lo: f64,
}

/// fl(a+b) and its error, assuming |a| >= |b|.
fn quick_two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    (s, b - (s - a))
}

/// fl(a+b) and its exact error.
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let c = s - a;
    let d = b - c;
    let e = s - c;
    (s, (a - e) + d)
}

/// fl(a*b) and its exact error.
fn two_prod(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// C `frexp`: `x = m * 2^e` with `0.5 <= |m| < 1`; zero, infinities and NaN come back as (x, 0).
pub(crate) fn frexp(x: f64) -> (f64, i32) {
    if x == 0.0 || !x.is_finite() {
        return (x, 0);
    }
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: scale into the normal range first.
        let (m, e) = frexp(x * f64::from_bits(0x4350_0000_0000_0000)); // 2^54
        return (m, e - 54);
    }
    (f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52)), biased - 1022)
}

/// C `ldexp`/`scalbn`: `x * 2^n` with one correct rounding (stepwise so that no intermediate
/// overflows or rounds twice).
pub(crate) fn ldexp(x: f64, n: i32) -> f64 {
    let p1023 = f64::from_bits(0x7fe0_0000_0000_0000);
    // 2^-1022 * 2^53: stay clear of the subnormal range until the last multiplication.
    let pm969 = f64::from_bits(0x0010_0000_0000_0000) * f64::from_bits(0x4340_0000_0000_0000);
    let (mut y, mut n) = (x, n);
    if n > 1023 {
        y *= p1023;
        n -= 1023;
        if n > 1023 {
            y *= p1023;
            n -= 1023;
            n = n.min(1023);
        }
    } else if n < -1022 {
        y *= pm969;
        n += 1022 - 53;
        if n < -1022 {
            y *= pm969;
            n += 1022 - 53;
            n = n.max(-1022);
        }
    }
    y * f64::from_bits(((0x3ff + n) as u64) << 52)
}

impl Dd {
    pub fn new(hi: f64) -> Self {
        Dd { hi, lo: 0.0 }
    }

    pub fn is_zero(self) -> bool {
        self.hi == 0.0 && self.lo == 0.0
    }

    pub fn is_finite(self) -> bool {
        self.hi.is_finite()
    }

    pub fn floor(self) -> Self {
        let hi = self.hi.floor();
        if hi == self.hi {
            // The high word is an integer already: the low word decides.
            let (hi, lo) = quick_two_sum(hi, self.lo.floor());
            return Dd { hi, lo };
        }
        Dd { hi, lo: 0.0 }
    }

    /// (m, e) with `self = m * 2^e`, `0.5 <= |m.hi| < 1` (or `|m.hi| == 1` with `m.lo` of opposite sign).
    pub fn frexp(self) -> (Dd, i32) {
        let (mut man, mut e) = frexp(self.hi);
        let mut lo = ldexp(self.lo, -e);
        if man.abs() == 0.5 && man * lo < 0.0 {
            man *= 2.0;
            lo *= 2.0;
            e -= 1;
        }
        (Dd { hi: man, lo }, e)
    }

    pub fn ldexp(self, e: i32) -> Self {
        Dd { hi: ldexp(self.hi, e), lo: ldexp(self.lo, e) }
    }
}

impl Neg for Dd {
    type Output = Dd;
    fn neg(self) -> Dd {
        Dd { hi: -self.hi, lo: -self.lo }
    }
}

impl Add for Dd {
    type Output = Dd;
    fn add(self, r: Dd) -> Dd {
        let (s1, s2) = two_sum(self.hi, r.hi);
        let (t1, t2) = two_sum(self.lo, r.lo);
        let (s1, s2) = quick_two_sum(s1, s2 + t1);
        let (hi, lo) = quick_two_sum(s1, s2 + t2);
        Dd { hi, lo }
    }
}

impl Add<f64> for Dd {
    type Output = Dd;
    fn add(self, r: f64) -> Dd {
        let (s1, s2) = two_sum(self.hi, r);
        let (hi, lo) = quick_two_sum(s1, s2 + self.lo);
        Dd { hi, lo }
    }
}

impl Add<Dd> for f64 {
    type Output = Dd;
    fn add(self, r: Dd) -> Dd {
        let (s1, s2) = two_sum(self, r.hi);
        let (hi, lo) = quick_two_sum(s1, s2 + r.lo);
        Dd { hi, lo }
    }
}

impl Sub for Dd {
    type Output = Dd;
    fn sub(self, r: Dd) -> Dd {
        self + (-r)
    }
}

impl Sub<f64> for Dd {
    type Output = Dd;
    fn sub(self, r: f64) -> Dd {
        let (s1, s2) = two_sum(self.hi, -r);
        let (hi, lo) = quick_two_sum(s1, s2 + self.lo);
        Dd { hi, lo }
    }
}

impl Sub<Dd> for f64 {
    type Output = Dd;
    fn sub(self, r: Dd) -> Dd {
        let (s1, s2) = two_sum(self, -r.hi);
        let (hi, lo) = quick_two_sum(s1, s2 - r.lo);
        Dd { hi, lo }
    }
}

impl Mul for Dd {
    type Output = Dd;
    fn mul(self, r: Dd) -> Dd {
        let (p1, p2) = two_prod(self.hi, r.hi);
        let (hi, lo) = quick_two_sum(p1, p2 + (self.hi * r.lo + self.lo * r.hi));
        Dd { hi, lo }
    }
}

impl Mul<f64> for Dd {
    type Output = Dd;
    fn mul(self, r: f64) -> Dd {
        let (p1, e1) = two_prod(self.hi, r);
        let (p2, e2) = two_prod(self.lo, r);
        let (hi, lo) = quick_two_sum(p1, e2 + p2 + e1);
        Dd { hi, lo }
    }
}

impl Mul<Dd> for f64 {
    type Output = Dd;
    fn mul(self, r: Dd) -> Dd {
        r * self
    }
}

impl Div for Dd {
    type Output = Dd;
    fn div(self, r: Dd) -> Dd {
        let q1 = self.hi / r.hi;
        let rem = self - r * q1;
        let q2 = rem.hi / r.hi;
        let rem = rem - r * q2;
        let q3 = rem.hi / r.hi;
        let (q1, q2) = quick_two_sum(q1, q2);
        Dd { hi: q1, lo: q2 } + q3
    }
}

impl Div<f64> for Dd {
    type Output = Dd;
    fn div(self, r: f64) -> Dd {
        self / Dd::new(r)
    }
}

impl Div<Dd> for f64 {
    type Output = Dd;
    fn div(self, r: Dd) -> Dd {
        Dd::new(self) / r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn division_carries_the_low_word() {
        let third = Dd::new(1.0) / 3.0;
        let back = third * 3.0 - 1.0;
        assert!(back.hi.abs() < 1e-30, "{back:?}");
        assert_eq!(frexp(8.0), (0.5, 4));
        assert_eq!(ldexp(0.5, 4), 8.0);
        assert_eq!(ldexp(1.0, -1074), f64::from_bits(1));
    }
}
