//! DPM-Solver++(2M), following diffusers' `schedulers/scheduling_dpmsolver_multistep.py`
//! (`DPMSolverMultistepScheduler`) with its defaults: `algorithm_type = "dpmsolver++"`,
//! `solver_order = 2`, `solver_type = "midpoint"`, `lower_order_final = True`,
//! `euler_at_final = False`, `final_sigmas_type = "zero"`, no thresholding, no lambda clipping.
//!
//! The solver works on the data prediction x0 in log-SNR time `lambda = ln(alpha_t / sigma_t)`;
//! the first step and the last (whose target sigma is 0) are first order, the others use the
//! previous step's x0 as well.

use super::betas::{self, alpha_sigma, lin2, Spacing};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct DpmSolverMultistepScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final 0, float32-rounded as diffusers stores them.
    sigmas: Vec<f64>,
    prediction: PredictionType,
    /// The previous step's x0 prediction and the step index it was made at.
    previous: Option<(usize, Tensor)>,
}

impl DpmSolverMultistepScheduler {
    pub fn new(
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
    ) -> anyhow::Result<Self> {
        let prediction = cfg.prediction()?;
        let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
        let alphas_cumprod = betas::alphas_cumprod(cfg, true)?;
        let train_sigmas = betas::train_sigmas(&alphas_cumprod);
        let n = num_inference_steps;
        let t = cfg.num_train_timesteps;
        // Unlike DDIM/Euler, DPM-Solver spaces n+1 points and drops the last (t≈0) one.
        let timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut v = betas::np_linspace(0.0, (t - 1) as f64, n + 1);
                v.reverse();
                v.truncate(n);
                v.into_iter().map(f64::round_ties_even).collect()
            }
            Spacing::Leading => {
                let ratio = t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            Spacing::Trailing => betas::np_arange_down(t as f64, t as f64 / n as f64)
                .into_iter()
                .map(|v| v.round_ties_even() - 1.0)
                .collect(),
        };
        let (timesteps, mut sigmas) = if karras {
            // Here the Karras range is the full training range (contrast Euler).
            let sigmas =
                betas::karras_sigmas(train_sigmas[0] as f64, train_sigmas[t - 1] as f64, n);
            let log_sigmas = betas::log_sigmas(&train_sigmas);
            // diffusers rounds the matching timesteps, except when beta_schedule names the cosine
            // schedule (even alongside trained_betas), where the int64 cast truncates them.
            let cosine = cfg.beta_schedule == "squaredcos_cap_v2";
            let timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = betas::sigma_to_t(s, &log_sigmas);
                    if cosine {
                        t.trunc()
                    } else {
                        t.round_ties_even()
                    }
                })
                .collect();
            (timesteps, sigmas)
        } else {
            let sigmas = timesteps
                .iter()
                .map(|&ts| betas::interp(ts, &train_sigmas))
                .collect();
            (timesteps, sigmas)
        };
        sigmas.push(0.0);
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction,
            previous: None,
        })
    }

    /// `lambda = ln(alpha_t) - ln(sigma_t)` (+inf at sigma 0).
    fn lambda(sigma: f64) -> f64 {
        let (alpha, sigma_t) = alpha_sigma(sigma);
        alpha.ln() - sigma_t.ln()
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let i = step_index;
        let (sigma_s, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (alpha_s, sigma_s_t) = alpha_sigma(sigma_s);
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                lin2(sample, 1.0 / alpha_s, model_output, -sigma_s_t / alpha_s)?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => lin2(sample, alpha_s, model_output, -sigma_s_t)?,
        };
        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let h = Self::lambda(sigma_next) - Self::lambda(sigma_s);
        // -(alpha_t·(e^-h - 1)): the weight of x0 (e^-h is 0 when the target sigma is 0).
        let x0_weight = -alpha_t * ((-h).exp() - 1.0);
        let last = i + 1 == self.timesteps.len();
        // Second order needs the x0 of the step just before this one; the last step drops back to
        // first order (lower_order_final / final_sigmas_type "zero").
        let prev_x0 = match &self.previous {
            Some((j, m1)) if *j + 1 == i && i > 0 && !last => Some(m1.clone()),
            _ => None,
        };
        let mut out = lin2(sample, sigma_t / sigma_s_t, &x0, x0_weight)?;
        if let Some(m1) = prev_x0 {
            let h_0 = Self::lambda(sigma_s) - Self::lambda(self.sigmas[i - 1]);
            let r0 = h_0 / h;
            // Midpoint: D1 = (m0 - m1) / r0, weighted by half the x0 weight.
            let d1 = (&x0 - m1)?;
            out = lin2(&out, 1.0, &d1, 0.5 * x0_weight / r0)?;
        }
        self.previous = Some((i, x0));
        Ok(out)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let (alpha, sigma) = alpha_sigma(self.sigmas[step_index]);
        lin2(original, alpha, noise, sigma)
    }
}
