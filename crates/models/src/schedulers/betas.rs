//! Noise-schedule arithmetic shared by the schedulers: beta schedules, `alphas_cumprod`, timestep
//! spacing, sigma interpolation and Karras sigmas (diffusers' `scheduling_*.py` `__init__` and
//! `set_timesteps`, and the helpers `betas_for_alpha_bar` / `rescale_zero_terminal_snr`).
//!
//! diffusers builds the training schedule with float32 torch tensors and the inference schedule
//! with numpy on top of them; the values the UNet sees (fractional timesteps, sigmas) depend on
//! those roundings, so the schedule here reproduces them operation by operation in `f32` and keeps
//! `f64` only where numpy computes in double.

use super::SchedulerConfig;
use candle_core::{Result, Tensor};

/// The training schedule's `alphas_cumprod`, rounded as torch stores it (float32).
///
/// `terminal_floor` mirrors the Euler and DPM-Solver schedulers, which after
/// `rescale_betas_zero_snr` replace the last (zero) value by 2^-24 so that sigma stays finite;
/// DDIM and DDPM keep the exact zero.
pub(crate) fn alphas_cumprod(
    cfg: &SchedulerConfig,
    terminal_floor: bool,
) -> anyhow::Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if n < 2 {
        anyhow::bail!("scheduler_config.json: num_train_timesteps must be at least 2, got {n}");
    }
    let mut betas: Vec<f32> = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            anyhow::bail!(
                "scheduler_config.json: trained_betas has {} values but num_train_timesteps is {n}",
                trained.len()
            );
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            // Linear in sqrt(beta), squared in float32 as torch does.
            "scaled_linear" => torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => cosine_betas(n),
            other => anyhow::bail!(
                "scheduler_config.json: unsupported beta_schedule '{other}' \
                 (expected linear, scaled_linear or squaredcos_cap_v2)"
            ),
        }
    };
    if cfg.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut cumprod = cumprod_f32(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    if cfg.rescale_betas_zero_snr && terminal_floor {
        *cumprod.last_mut().expect("n >= 2") = 2f32.powi(-24);
    }
    Ok(cumprod)
}

/// `torch.linspace(start, end, n, dtype=float32)`: a float32 step, each value computed from the
/// nearer end with a single rounding (the CPU kernel fuses the multiply-add).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (a, b) = (start as f32, end as f32);
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (a as f64 + step as f64 * i as f64) as f32
            } else {
                (b as f64 - step as f64 * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// `betas_for_alpha_bar` with the cosine alpha-bar of Nichol & Dhariwal, capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` on float32: the CPU kernel accumulates in double and rounds each output.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cumprod = cumprod_f32(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    let mut sqrt_bar: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("non-empty");
    // Shift so the last value is zero, then scale so the first is back to where it was.
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The training sigmas `sqrt((1 - ᾱ) / ᾱ)` in float32, indexed by training timestep.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `np.log` of the float32 training sigmas (kept float32, as numpy does).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|s| s.ln()).collect()
}

/// `timestep_spacing`: how inference timesteps are picked among the training ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    /// The config's spacing, or `class_default` (each diffusers class has its own) when absent.
    pub(crate) fn from_config(
        cfg: &SchedulerConfig,
        class_default: Spacing,
    ) -> anyhow::Result<Self> {
        let Some(spacing) = cfg.timestep_spacing.as_deref() else {
            return Ok(class_default);
        };
        Ok(match spacing {
            "leading" => Self::Leading,
            "trailing" => Self::Trailing,
            "linspace" => Self::Linspace,
            other => anyhow::bail!(
                "scheduler_config.json: unsupported timestep_spacing '{other}' (expected leading, trailing or linspace)"
            ),
        })
    }
}

/// The integer timesteps of DDIM and DDPM (`leading` unless configured): spaced, then rounded
/// half to even as numpy does before its int64 cast.
pub(crate) fn integer_timesteps(
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
    scheduler: &str,
) -> anyhow::Result<Vec<f64>> {
    if num_inference_steps == 0 || num_inference_steps > cfg.num_train_timesteps {
        anyhow::bail!(
            "{scheduler}: {num_inference_steps} inference steps is outside 1..={} (scheduler_config.json num_train_timesteps)",
            cfg.num_train_timesteps
        );
    }
    let spacing = Spacing::from_config(cfg, Spacing::Leading)?;
    Ok(spaced_timesteps(spacing, cfg, num_inference_steps)
        .into_iter()
        .map(f64::round_ties_even)
        .collect())
}

/// `np.linspace(start, stop, n)` (float64): `i * step + start`, with the endpoint exact.
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut out: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    out[n - 1] = stop;
    out
}

/// `np.arange(start, 0, -step)` for a positive float step.
pub(crate) fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil() as usize;
    (0..len).map(|i| start + i as f64 * -step).collect()
}

/// The integer-valued timestep schedule shared by DDIM, DDPM and Euler (descending, before any
/// dtype cast): `leading` uses `T // n` strides plus `steps_offset`, `trailing` counts down from
/// `T` in `T / n` strides, `linspace` spreads `n` points over `[0, T-1]` (not rounded here, since
/// Euler keeps them fractional).
pub(crate) fn spaced_timesteps(spacing: Spacing, cfg: &SchedulerConfig, n: usize) -> Vec<f64> {
    let t = cfg.num_train_timesteps;
    match spacing {
        Spacing::Leading => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => np_arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|v| v.round_ties_even() - 1.0)
            .collect(),
        Spacing::Linspace => {
            let mut v = np_linspace(0.0, (t - 1) as f64, n);
            v.reverse();
            v
        }
    }
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` within the table.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    // numpy's form: slope * (x - x_j) + f_j, exact when x sits on a grid point.
    (hi - lo) * (x - j as f64) + lo
}

/// Karras et al. (2022) sigmas: `n` points evenly spaced in `sigma^(1/7)` from max down to min.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating linearly in
/// log-sigma between neighbouring training timesteps (diffusers' `_sigma_to_t`).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last training timestep whose log-sigma is at or below ours (0 if none), kept one short
    // of the end so that it has an upper neighbour.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The signal and noise scales `(alpha_t, sigma_t)` of a sample at noise level `sigma`
/// (x = alpha_t·x0 + sigma_t·eps with alpha_t² + sigma_t² = 1).
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `ca·a + cb·b` with scalar coefficients, in the tensors' dtype.
pub(crate) fn lin2(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    a.affine(ca, 0.0)? + b.affine(cb, 0.0)?
}

/// Guards `step`/`add_noise` against an index past the schedule.
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        candle_core::bail!("scheduler step index {step_index} is past the {len}-step schedule")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_config(spacing: &str) -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": spacing,
        }))
        .unwrap()
    }

    #[test]
    fn spacing_matches_diffusers_tables() {
        let leading = spaced_timesteps(Spacing::Leading, &sd_config("leading"), 8);
        assert_eq!(
            leading,
            [876.0, 751.0, 626.0, 501.0, 376.0, 251.0, 126.0, 1.0]
        );
        let trailing = spaced_timesteps(Spacing::Trailing, &sd_config("trailing"), 8);
        assert_eq!(
            trailing,
            [999.0, 874.0, 749.0, 624.0, 499.0, 374.0, 249.0, 124.0]
        );
        let linspace = spaced_timesteps(Spacing::Linspace, &sd_config("linspace"), 3);
        assert_eq!(linspace, [999.0, 499.5, 0.0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let sigmas = train_sigmas(&alphas_cumprod(&sd_config("leading"), true).unwrap());
        let logs = log_sigmas(&sigmas);
        for t in [0usize, 1, 17, 500, 998, 999] {
            assert!(
                (sigma_to_t(sigmas[t] as f64, &logs) - t as f64).abs() < 1e-4,
                "t = {t}"
            );
            assert_eq!(interp(t as f64, &sigmas), sigmas[t] as f64);
        }
        // Karras sigmas keep both end points.
        let k = karras_sigmas(0.03, 14.6, 5);
        assert!((k[0] - 14.6).abs() < 1e-12 && (k[4] - 0.03).abs() < 1e-12);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let mut cfg = sd_config("trailing");
        cfg.rescale_betas_zero_snr = true;
        assert_eq!(*alphas_cumprod(&cfg, false).unwrap().last().unwrap(), 0.0);
        assert_eq!(
            *alphas_cumprod(&cfg, true).unwrap().last().unwrap(),
            2f32.powi(-24)
        );
    }
}
