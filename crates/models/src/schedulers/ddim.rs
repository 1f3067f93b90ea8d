//! DDIM sampling with eta = 0 (deterministic), following diffusers'
//! `schedulers/scheduling_ddim.py` (`DDIMScheduler`).

use super::betas::{self, lin2};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    /// ᾱ used after the last step: 1 with `set_alpha_to_one`, else ᾱ at timestep 0 (SD's choice).
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    /// diffusers steps back by a fixed `T // n` whatever the spacing.
    stride: usize,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl DdimScheduler {
    pub fn new(cfg: &SchedulerConfig, num_inference_steps: usize) -> anyhow::Result<Self> {
        let prediction = cfg.prediction()?;
        let alphas_cumprod = betas::alphas_cumprod(cfg, false)?;
        let timesteps = betas::integer_timesteps(cfg, num_inference_steps, "DDIM")?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            stride: cfg.num_train_timesteps / num_inference_steps,
            prediction,
            clip: cfg
                .clip_sample
                .unwrap_or(true)
                .then_some(cfg.clip_sample_range),
        })
    }

    fn alpha_at(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DdimScheduler {
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
        let t = self.timesteps[step_index] as i64;
        let alpha_t = self.alpha_at(t);
        let alpha_prev = self.alpha_at(t - self.stride as i64);
        let (a, b) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                lin2(sample, 1.0 / a, model_output, -b / a)?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                lin2(sample, 1.0 / b, model_output, -a / b)?,
            ),
            PredictionType::VPrediction => (
                lin2(sample, a, model_output, -b)?,
                lin2(model_output, a, sample, b)?,
            ),
        };
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        // eta = 0: no fresh noise, the direction term carries all of the remaining variance.
        lin2(&x0, alpha_prev.sqrt(), &eps, (1.0 - alpha_prev).sqrt())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        betas::check_index(step_index, self.timesteps.len())?;
        let alpha = self.alphas_cumprod[self.timesteps[step_index] as usize] as f64;
        lin2(original, alpha.sqrt(), noise, (1.0 - alpha).sqrt())
    }
}
