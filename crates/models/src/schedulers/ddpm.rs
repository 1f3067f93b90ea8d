//! DDPM: ancestral sampling with `variance_type = "fixed_small"` (diffusers'
//! `schedulers/scheduling_ddpm.py`, `DDPMScheduler`), and [`NoiseSchedule`], the forward process
//! that training needs (`add_noise`, `get_velocity`, SNR and the loss target).

use super::betas::{self, lin2};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl DdpmScheduler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> anyhow::Result<Self> {
        let prediction = cfg.prediction()?;
        let alphas_cumprod = betas::alphas_cumprod(cfg, false)?;
        let timesteps = betas::integer_timesteps(cfg, num_inference_steps, "DDPM")?;
        Ok(Self {
            alphas_cumprod,
            timesteps,
            prediction,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range),
        })
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let t = self.timesteps[step_index] as usize;
        let alpha_t = self.alphas_cumprod[t] as f64;
        // The previous timestep is the next one in the schedule; past the end the chain reaches
        // the clean image (ᾱ = 1).
        let alpha_prev = match self.timesteps.get(step_index + 1) {
            Some(&p) => self.alphas_cumprod[p as usize] as f64,
            None => 1.0,
        };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        // The effective single-step alpha/beta between the two (possibly distant) timesteps.
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let mut x0 = match self.prediction {
            PredictionType::Epsilon => lin2(
                sample,
                1.0 / alpha_t.sqrt(),
                model_output,
                -(beta_t.sqrt()) / alpha_t.sqrt(),
            )?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                lin2(sample, alpha_t.sqrt(), model_output, -beta_t.sqrt())?
            }
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        // Mean of the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 7).
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mean = lin2(&x0, x0_coeff, sample, sample_coeff)?;
        if t == 0 {
            // diffusers adds no noise (and draws none) at timestep 0.
            return Ok(mean);
        }
        let variance = (beta_prev / beta_t * current_beta).max(1e-20);
        let eps = noise.noise_like(sample)?;
        lin2(&mean, 1.0, &eps, variance.sqrt())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let alpha = self.alphas_cumprod[self.timesteps[step_index] as usize] as f64;
        lin2(original, alpha.sqrt(), noise, (1.0 - alpha).sqrt())
    }
}

/// The training-time forward process `x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·eps`, with one timestep
/// per sample of a batch.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// ᾱ_t for every training timestep, as diffusers computes it (float32, widened).
    pub alphas_cumprod: Vec<f64>,
    /// What the model is trained to predict (`prediction_type`).
    pub prediction: PredictionType,
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        let prediction = cfg.prediction()?;
        let alphas_cumprod = betas::alphas_cumprod(cfg, false)?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Self {
            alphas_cumprod,
            prediction,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (for min-SNR loss weighting).
    pub fn snr(&self, timestep: usize) -> f64 {
        let a = self.alphas_cumprod[timestep];
        a / (1.0 - a)
    }

    /// A `[batch, 1, 1, ...]` tensor of `f(ᾱ_t)` per sample, shaped to broadcast against `like`.
    fn per_sample(
        &self,
        f: impl Fn(f64) -> f64,
        timesteps: &[usize],
        like: &Tensor,
    ) -> Result<Tensor> {
        let dims = like.dims();
        if dims.first() != Some(&timesteps.len()) {
            candle_core::bail!(
                "{} timesteps for a batch of shape {:?}",
                timesteps.len(),
                dims
            )
        }
        let mut values = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let Some(&a) = self.alphas_cumprod.get(t) else {
                candle_core::bail!(
                    "timestep {t} is outside the {}-step training schedule",
                    self.alphas_cumprod.len()
                )
            };
            values.push(f(a) as f32);
        }
        let mut shape = vec![1usize; dims.len()];
        shape[0] = timesteps.len();
        Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
    }

    /// Noises each sample `x0[i]` to timestep `timesteps[i]`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a = self.per_sample(f64::sqrt, timesteps, x0)?;
        let s = self.per_sample(|a| (1.0 - a).sqrt(), timesteps, x0)?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// The v-prediction target `sqrt(ᾱ_t)·eps - sqrt(1-ᾱ_t)·x0` (Salimans & Ho 2022).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a = self.per_sample(f64::sqrt, timesteps, x0)?;
        let s = self.per_sample(|a| (1.0 - a).sqrt(), timesteps, x0)?;
        noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
    }

    /// What the model should output for `prediction` given the clean latents and the noise used.
    pub fn target(
        &self,
        prediction: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        match prediction {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }
}
