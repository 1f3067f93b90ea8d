//! Euler sampling (Karras et al. 2022, Algorithm 2 without churn), following diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`EulerDiscreteScheduler`, linear interpolation,
//! `final_sigmas_type = "zero"`).

use super::betas::{self, lin2, Spacing};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct EulerScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final 0, float32-rounded as diffusers stores them.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

/// The sigma ladder shared by Euler and Euler-ancestral: interpolated training sigmas at the
/// (possibly fractional) spaced timesteps, optionally replaced by Karras sigmas between the same
/// end points, then a final 0. Returns `(timesteps, sigmas, init_noise_sigma)`.
pub(crate) fn sigma_schedule(
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
    karras: bool,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
    let alphas_cumprod = betas::alphas_cumprod(cfg, true)?;
    let train_sigmas = betas::train_sigmas(&alphas_cumprod);
    // diffusers casts the spaced timesteps to float32 before interpolating.
    let mut timesteps: Vec<f64> = betas::spaced_timesteps(spacing, cfg, num_inference_steps)
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| betas::interp(t, &train_sigmas))
        .collect();
    if karras {
        // The Karras range is the interpolated schedule's own, not the full training range.
        let (min, max) = (sigmas[sigmas.len() - 1], sigmas[0]);
        sigmas = betas::karras_sigmas(min, max, num_inference_steps);
        let log_sigmas = betas::log_sigmas(&train_sigmas);
        timesteps = sigmas
            .iter()
            .map(|&s| betas::sigma_to_t(s, &log_sigmas) as f32 as f64)
            .collect();
    }
    sigmas.push(0.0);
    let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    let max = sigmas.iter().cloned().fold(0.0f64, f64::max) as f32;
    // With leading spacing the first timestep is below T-1, so the initial noise gets the extra
    // unit variance of the image itself; diffusers computes this in float32.
    let init_noise_sigma = match spacing {
        Spacing::Linspace | Spacing::Trailing => max as f64,
        Spacing::Leading => (max * max + 1.0).sqrt() as f64,
    };
    Ok((timesteps, sigmas, init_noise_sigma))
}

/// The denoised estimate x0 from a sigma-parameterised sample (x = x0 + sigma·eps).
pub(crate) fn predict_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => lin2(sample, 1.0, model_output, -sigma),
        PredictionType::Sample => Ok(model_output.clone()),
        // v is defined on the variance-preserving input sample / sqrt(sigma²+1).
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
    }
}

impl EulerScheduler {
    pub fn new(
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
    ) -> anyhow::Result<Self> {
        let prediction = cfg.prediction()?;
        let (timesteps, sigmas, init_noise_sigma) =
            sigma_schedule(cfg, num_inference_steps, karras)?;
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction,
        })
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let (sigma, sigma_next) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        // dx/dsigma = (x - x0) / sigma, one Euler step down to the next sigma.
        let derivative = (sample - x0)?;
        lin2(sample, 1.0, &derivative, (sigma_next - sigma) / sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        lin2(original, 1.0, noise, self.sigmas[step_index])
    }
}
