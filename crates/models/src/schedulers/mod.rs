//! Noise schedulers, one per file, behind one interface (as diffusers' `schedulers/`).
//!
//! A sampling scheduler is built from the model's `scheduler/scheduler_config.json` and a step
//! count; the pipeline then loops over `step_index in begin..timesteps().len()`:
//! `scale_model_input` → UNet at `timesteps()[i]` → `step`. Stochastic schedulers draw their noise
//! from a [`NoiseSource`] so that runs are reproducible and parity tests can feed the reference's
//! noise.

use candle_core::{Result, Tensor};
use serde::Deserialize;

mod betas;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;

/// `scheduler_config.json` as diffusers writes it (fields unknown to a scheduler are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`; when absent each scheduler takes its diffusers class
    /// default (DDIM/DDPM `leading`, Euler/DPM `linspace`), as `from_config` does.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// When absent: DDIM/DDPM's class default, true.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "default_one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Every other field, kept to refuse math-changing values imprint does not implement.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Config fields that change the math, which imprint computes only at diffusers' default value:
/// `(field, default as JSON, schedulers it applies to)`.
const FIXED_FIELDS: &[(&str, &str, &[SchedulerKind])] = {
    use SchedulerKind::*;
    const ALL: &[SchedulerKind] = &[Ddim, Euler, EulerAncestral, DpmPlusPlus2M, Ddpm];
    &[
        ("thresholding", "false", ALL),
        ("use_exponential_sigmas", "false", &[Euler, DpmPlusPlus2M]),
        ("use_beta_sigmas", "false", &[Euler, DpmPlusPlus2M]),
        ("algorithm_type", "\"dpmsolver++\"", &[DpmPlusPlus2M]),
        ("solver_order", "2", &[DpmPlusPlus2M]),
        ("solver_type", "\"midpoint\"", &[DpmPlusPlus2M]),
        ("lower_order_final", "true", &[DpmPlusPlus2M]),
        ("euler_at_final", "false", &[DpmPlusPlus2M]),
        ("use_lu_lambdas", "false", &[DpmPlusPlus2M]),
        ("variance_type", "null", &[DpmPlusPlus2M]),
        ("final_sigmas_type", "\"zero\"", &[Euler, DpmPlusPlus2M]),
        ("timestep_type", "\"discrete\"", &[Euler]),
        ("interpolation_type", "\"linear\"", &[Euler]),
        ("sigma_min", "null", &[Euler]),
        ("sigma_max", "null", &[Euler]),
        ("variance_type", "\"fixed_small\"", &[Ddpm]),
    ]
};

impl SchedulerConfig {
    /// Refuses a field value `kind` would compute differently from diffusers.
    fn check_supported(&self, kind: SchedulerKind) -> anyhow::Result<()> {
        for (field, default, kinds) in FIXED_FIELDS {
            if !kinds.contains(&kind) {
                continue;
            }
            if let Some(v) = self.other.get(*field) {
                let default: serde_json::Value =
                    serde_json::from_str(default).expect("valid JSON default");
                let same =
                    v == &default || (v.as_f64().is_some() && v.as_f64() == default.as_f64());
                if !same {
                    anyhow::bail!("scheduler_config.json: unsupported {field} {v} for {kind:?} (imprint implements {default})")
                }
            }
        }
        Ok(())
    }
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}

/// What the UNet predicts, from `prediction_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl SchedulerConfig {
    pub fn prediction(&self) -> anyhow::Result<PredictionType> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            other => anyhow::bail!("scheduler_config.json: unsupported prediction_type '{other}'"),
        }
    }
}

/// Gaussian noise for stochastic steps (ancestral sampling, DDPM).
pub trait NoiseSource {
    /// Standard-normal noise shaped and placed like `like`.
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// The names `--scheduler` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPlusPlus2M,
    Ddpm,
}

impl std::str::FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler-a" => Self::EulerAncestral,
            "dpm++2m" => Self::DpmPlusPlus2M,
            "ddpm" => Self::Ddpm,
            other => anyhow::bail!(
                "unknown scheduler '{other}' (expected ddim, euler, euler-a, dpm++2m or ddpm)"
            ),
        })
    }
}

/// A sampling scheduler set to a number of inference steps.
pub trait Scheduler {
    /// The timestep passed to the UNet at each step (f64: sigma-based schedulers use fractional
    /// timesteps).
    fn timesteps(&self) -> &[f64];
    /// The scale applied to unit-variance initial noise (1 for DDIM, DDPM and DPM-Solver).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the denoising model input at step `step_index` (identity for DDIM, DDPM and
    /// DPM-Solver; sigma schedulers divide by √(σ² + 1)).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step from `sample` given the model output at `step_index`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Noises clean latents to the level of step `step_index` (img2img's starting point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;
    /// How many model evaluations each step consumes (1 for all schedulers here).
    fn order(&self) -> usize {
        1
    }
}

/// Builds the sampling scheduler `kind` for `num_inference_steps` steps. `karras` selects Karras
/// sigmas where the scheduler supports them (euler, euler-a, dpm++2m); the config's
/// `use_karras_sigmas` is honoured too.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    karras: bool,
) -> anyhow::Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        anyhow::bail!("the number of inference steps must be at least 1")
    }
    config.check_supported(kind)?;
    let karras = karras || config.use_karras_sigmas;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(
            config,
            num_inference_steps,
            karras,
        )?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestralScheduler::new(
            config,
            num_inference_steps,
            karras,
        )?),
        SchedulerKind::DpmPlusPlus2M => Box::new(dpm_solver::DpmSolverMultistepScheduler::new(
            config,
            num_inference_steps,
            karras,
        )?),
        SchedulerKind::Ddpm => Box::new(ddpm::DdpmScheduler::new(config, num_inference_steps)?),
    })
}
