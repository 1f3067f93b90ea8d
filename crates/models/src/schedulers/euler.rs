//! Euler sampling (Karras et al. 2022, Algorithm 2 without churn), following diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`EulerDiscreteScheduler`, linear interpolation,
//! `final_sigmas_type = "zero"`).

use super::betas::{self, lin2, Spacing};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct EulerScheduler {
    ladder: SigmaLadder,
    prediction: PredictionType,
}

/// The sigma schedule of Euler-type samplers and what follows from it alone: input scaling and
/// img2img noising.
pub(crate) struct SigmaLadder {
    pub timesteps: Vec<f64>,
    /// One sigma per timestep plus the final 0, float32-rounded as diffusers stores them.
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

impl SigmaLadder {
    /// `(sigma, next sigma)` at a step.
    pub fn at(&self, step_index: usize) -> Result<(f64, f64)> {
        betas::check_index(step_index, self.timesteps.len())?;
        Ok((self.sigmas[step_index], self.sigmas[step_index + 1]))
    }

    /// The sample divided by √(σ² + 1), the variance the UNet was trained on.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.at(step_index)?;
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    /// `x0 + σ·noise` at a step (img2img's start).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (sigma, _) = self.at(step_index)?;
        lin2(original, 1.0, noise, sigma)
    }
}

/// The sigma ladder shared by Euler and Euler-ancestral: interpolated training sigmas at the
/// (possibly fractional) spaced timesteps, optionally replaced by Karras sigmas between the same
/// end points, then a final 0.
pub(crate) fn sigma_schedule(
    cfg: &SchedulerConfig,
    num_inference_steps: usize,
    karras: bool,
) -> anyhow::Result<SigmaLadder> {
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
    Ok(SigmaLadder {
        timesteps,
        sigmas,
        init_noise_sigma,
    })
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
        Ok(Self {
            ladder: sigma_schedule(cfg, num_inference_steps, karras)?,
            prediction,
        })
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.ladder.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.ladder.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.ladder.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.ladder.at(step_index)?;
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        // dx/dsigma = (x - x0) / sigma, one Euler step down to the next sigma.
        let derivative = (sample - x0)?;
        lin2(sample, 1.0, &derivative, (sigma_next - sigma) / sigma)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.ladder.add_noise(original, noise, step_index)
    }
}
