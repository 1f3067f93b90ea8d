//! Personalization methods. A method states what is trainable, how prompts become text states
//! through its trainable parts, and its defaults; the denoising loss and the loop are shared
//! ([`diffusion_loss`], `crate::trainer`).

pub mod textual_inversion;

use anyhow::Result;
use candle_core::{DType, Tensor};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::schedulers::PredictionType;
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::TextConditioning;

/// The latent-diffusion training loss (DDPM, Ho et al. 2020; as diffusers' training scripts):
/// noise the clean latents to per-sample `timesteps`, predict with the UNet, and take the mean
/// squared error against the target the scheduler's prediction type names (ε, v or x₀).
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    text_states: TextConditioning,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let t = Tensor::new(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        latents.device(),
    )?;
    let pred = unet.forward(&noisy, &t, text_states)?;
    let target = schedule.target(prediction, latents, noise, timesteps)?;
    Ok((pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()?)
}
