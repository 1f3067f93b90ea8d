//! Ancestral Euler sampling, following diffusers'
//! `schedulers/scheduling_euler_ancestral_discrete.py` (`EulerAncestralDiscreteScheduler`).
//! Each step goes deterministically down to `sigma_down` and adds fresh noise of size
//! `sigma_up`, with `sigma_down² + sigma_up² = sigma_next²`.

use super::betas::lin2;
use super::euler::{predict_x0, sigma_schedule, SigmaLadder};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig};
use candle_core::{Result, Tensor};

pub struct EulerAncestralScheduler {
    ladder: SigmaLadder,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    pub fn new(
        cfg: &SchedulerConfig,
        num_inference_steps: usize,
        karras: bool,
    ) -> anyhow::Result<Self> {
        // diffusers' EulerAncestralDiscreteScheduler has no use_karras_sigmas option.
        if karras {
            anyhow::bail!(
                "euler-a does not support Karras sigmas (diffusers' EulerAncestralDiscreteScheduler has none); \
                 drop --karras or use_karras_sigmas in scheduler_config.json"
            );
        }
        let prediction = cfg.prediction()?;
        if prediction == PredictionType::Sample {
            anyhow::bail!("euler-a: scheduler_config.json prediction_type 'sample' is not supported (as in diffusers)");
        }
        Ok(Self {
            ladder: sigma_schedule(cfg, num_inference_steps, false)?,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.ladder.at(step_index)?;
        let x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
            / (sigma * sigma))
            .sqrt();
        let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
        let derivative = (sample - x0)?;
        let prev = lin2(sample, 1.0, &derivative, (sigma_down - sigma) / sigma)?;
        // diffusers draws noise at every step, the last included (where sigma_up is 0).
        let eps = noise.noise_like(sample)?;
        lin2(&prev, 1.0, &eps, sigma_up)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.ladder.add_noise(original, noise, step_index)
    }
}
