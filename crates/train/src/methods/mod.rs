//! Personalization methods. A method states what is trainable, how a training image is captioned,
//! how token ids become text states through its trainable parts, and what concept it produces; the
//! denoising loss ([`diffusion_loss`]) and the loop (`crate::trainer`) are shared.

pub mod lora;
pub mod textual_inversion;

use crate::data::TrainImage;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use imprint_concepts::Concept;
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::schedulers::PredictionType;
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::TextConditioning;
use imprint_pipeline::StableDiffusion;
use rand_chacha::ChaCha20Rng;

/// What the shared loop needs from a method.
pub trait Method {
    /// Trainable tensors with stable names (checkpoints restore them by name).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The caption of one training example.
    fn caption(&self, image: &TrainImage, rng: &mut ChaCha20Rng) -> String;
    /// A user's prompt rewritten for the method's tokens (validation).
    fn prompt(&self, prompt: &str) -> String {
        prompt.to_string()
    }
    /// Text states `[B, S, D]` for token ids, through the method's trainable parts.
    fn text_states(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<Tensor>;
    /// The concept the trained tensors make.
    fn concept(&self, base_model: Option<String>) -> Result<Concept>;
}

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
