//! Branch-free `exp` and `erf` for f32 that the compiler can vectorize over a slice, for the hot
//! element-wise loops (attention probabilities, SiLU, GELU). libm's versions are scalar calls and
//! were 3–5 % of a training step. f64 keeps libm: the finite-difference tests run in f64.

/// `eˣ` within 2 ulp (Cephes `expf`: Cody–Waite reduction by ln 2, degree-6 polynomial).
/// Below −87 it returns 0 (the true value is subnormal); arguments above 88 are clamped.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// `erf(x)` within 7e-7 absolute: Abramowitz & Stegun 7.1.26 (1.5e-7 in exact arithmetic, plus f32
/// rounding), the formula PyTorch's vectorized CPU `erf`, and so diffusers' exact GELU on the
/// CPU, evaluates. Inside GELU, `0.5·x·(1 + erf)`, that is a relative error below 7e-7.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut r = 1.061_405_4_f32;
    r = r * t - 1.453_152_1;
    r = r * t + 1.421_413_7;
    r = r * t - 0.284_496_74;
    r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp_f32(-a * a);
    y.copysign(x)
}

/// Exponential in the kernels' scalar type: the vectorizable one for f32, libm's for f64.
pub(crate) trait FastExp: Copy {
    fn fast_exp(self) -> Self;
}

impl FastExp for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}

impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_7e7_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -6.0 + 12.0 * i as f32 / 200_000.0;
            worst = worst.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
        }
        assert!(worst < 7e-7, "worst absolute error {worst:e}");
        assert!(erf_f32(0.0).abs() < 2e-7);
        assert_eq!(erf_f32(10.0), 1.0);
        assert_eq!(erf_f32(-10.0), -1.0);
    }
}
