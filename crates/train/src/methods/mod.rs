//! Personalization methods. A method states what is trainable, how a training image is captioned,
//! how token ids become text states through its trainable parts, and what concept it produces; the
//! denoising loss ([`diffusion_loss`]) and the loop (`crate::trainer`) are shared.

pub mod custom_diffusion;
pub mod dreambooth;
pub mod encoder;
pub mod extended_textual_inversion;
pub mod inclusive_ti;
pub mod iti_gen;
pub mod lora;
pub mod perfusion;
pub mod svdiff;
pub mod textual_inversion;

use crate::data::TrainImage;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use imprint_concepts::Concept;
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::schedulers::PredictionType;
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::{TextConditioning, TextStates};
use imprint_pipeline::StableDiffusion;
use rand_chacha::ChaCha20Rng;

/// What the shared loop needs from a method.
pub trait Method {
    /// Trainable tensors with stable names (checkpoints restore them by name).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The learning rate of the trainable tensor `name` as a multiple of the run's.
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
    /// The caption of one training example.
    fn caption(&self, image: &TrainImage, rng: &mut ChaCha20Rng) -> String;
    /// A user's prompt rewritten for the method's tokens (validation).
    fn prompt(&self, prompt: &str) -> String {
        prompt.to_string()
    }
    /// Called before each forward pass: `Some(key)` for a training pass (random parts such as
    /// dropout draw from `key`, a pure function of seed, step and micro-batch, so resume is exact),
    /// `None` for validation.
    fn begin_forward(&self, _key: Option<u64>) {}
    /// Text states `[B, S, D]` for token ids (one tensor per cross-attention layer for per-layer
    /// methods), through the method's trainable parts (by default the text encoder as it is,
    /// adapters included).
    fn text_states(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<TextStates> {
        Ok(TextStates::Shared(
            sd.text_encoder.forward(ids, 0)?.last_hidden_state,
        ))
    }
    /// Custom Diffusion's resize augmentation ([`crate::data::Zoom`]) on the instance images, its
    /// caption prefixes, and its loss normalized by the mask's area.
    fn resize_augmentation(&self) -> bool {
        false
    }
    /// Custom Diffusion's loss: each sample's squared error summed over the latent channels and
    /// divided by the mask's area (an all-ones mask without one).
    fn mask_normalized_loss(&self) -> bool {
        false
    }
    /// Called after each optimizer step (moving averages a method keeps outside the optimizer).
    fn after_step(&self) -> Result<()> {
        Ok(())
    }
    /// State outside the trainable tensors that a checkpoint must keep for an exact resume.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![])
    }
    /// Restores [`Method::state`] from a checkpoint.
    fn restore_state(&self, _state: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
    /// The concept the trained tensors make.
    fn concept(&self, base_model: Option<String>) -> Result<Concept>;
    /// Writes the result to `out`: by default the concept, in imprint's native format.
    fn save(&self, out: &std::path::Path, base_model: Option<String>, steps: usize) -> Result<()> {
        let mut concept = self.concept(base_model)?;
        concept
            .metadata
            .insert("steps".to_string(), steps.to_string());
        imprint_concepts::formats::save(&concept, out, imprint_concepts::formats::Format::Native)
    }
}

/// The caption of an image for methods trained on an instance prompt: its `IMAGE.txt`, else the
/// prompt.
pub fn instance_caption(image: &TrainImage, instance_prompt: &Option<String>) -> String {
    image
        .caption
        .clone()
        .or_else(|| instance_prompt.clone())
        .unwrap_or_default()
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
    diffusion_loss_with(
        unet,
        schedule,
        prediction,
        latents,
        noise,
        timesteps,
        text_states,
        LossTerms::default(),
    )
}

/// What the loss adds to the plain denoising MSE.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossTerms<'a> {
    /// Per-pixel weights on the latent grid, `[B, 1, h, w]` (1 = subject): kohya's masked loss,
    /// which multiplies the squared error by the mask before averaging.
    pub mask: Option<&'a Tensor>,
    /// Min-SNR-γ weighting (Hang et al. 2023, as diffusers' scripts): each sample's loss is scaled
    /// by `min(SNR, γ) / SNR` for ε-prediction and `min(SNR, γ) / (SNR + 1)` for v-prediction.
    pub snr_gamma: Option<f64>,
    /// Divide each sample's masked squared error by the mask's area instead of taking the mean:
    /// Custom Diffusion's `(mse · mask).sum([1,2,3]) / mask.sum([1,2,3])` with a one-channel mask
    /// (which sums the latent channels, as the script does).
    pub normalize_by_mask: bool,
    /// Extra UNet input channels concatenated after the noisy latents (an inpainting model's
    /// mask and masked-image latents, `[B, 5, h, w]`).
    pub extra_input: Option<&'a Tensor>,
}

/// [`diffusion_loss`] with a mask and SNR weighting.
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss_with(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    text_states: TextConditioning,
    terms: LossTerms,
) -> Result<Tensor> {
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let noisy = match terms.extra_input {
        Some(extra) => Tensor::cat(&[&noisy, &extra.to_dtype(noisy.dtype())?], 1)?,
        None => noisy,
    };
    let t = Tensor::new(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        latents.device(),
    )?;
    let pred = unet.forward(&noisy, &t, text_states)?;
    let target = schedule.target(prediction, latents, noise, timesteps)?;
    let mut se = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?;
    if let Some(mask) = terms.mask {
        se = se.broadcast_mul(&mask.to_dtype(DType::F32)?)?;
    }
    let b = se.dim(0)?;
    let per_sample = match (terms.mask, terms.normalize_by_mask) {
        (Some(mask), true) => {
            let area = mask.to_dtype(DType::F32)?.reshape((b, ()))?.sum(1)?;
            (se.reshape((b, ()))?.sum(1)? / area.clamp(1e-8, f64::INFINITY)?)?
        }
        // No mask: the script's all-ones mask, whose area is one channel's.
        (None, true) => {
            let (_, _, h, w) = se.dims4()?;
            (se.reshape((b, ()))?.sum(1)? / (h * w) as f64)?
        }
        _ => se.reshape((b, ()))?.mean(1)?,
    };
    let per_sample = match terms.snr_gamma {
        None => per_sample,
        Some(gamma) => {
            let weights: Vec<f32> = timesteps
                .iter()
                .map(|&t| {
                    let snr = schedule.snr(t);
                    let clipped = snr.min(gamma);
                    (match prediction {
                        PredictionType::VPrediction => clipped / (snr + 1.0),
                        _ => clipped / snr,
                    }) as f32
                })
                .collect();
            (per_sample * Tensor::new(weights, latents.device())?)?
        }
    };
    Ok(per_sample.mean_all()?)
}
