//! Custom Diffusion (Kumari et al. 2023, "Multi-Concept Customization of Text-to-Image
//! Diffusion"): new modifier words plus the key and value projections of every cross-attention
//! layer, as diffusers' `examples/custom_diffusion/train_custom_diffusion.py` trains them.
//!
//! * **Trainable**: each modifier token's embedding (started at its init word's, one per
//!   `--token`, trained jointly) and every `attn2.to_k` / `attn2.to_v` weight (with
//!   `--train-q-out` also `to_q` and `to_out.0`, the script's `--freeze_model crossattn`). The
//!   weights train as changes `ΔW` on the frozen base (an adapter, zero at the start), so the
//!   native file stores exactly them. The start-of-text token's keys and values are detached, as
//!   the script's processor does: they pass no gradient to the weights.
//! * **Loss**: the denoising loss with the script's resize augmentation ([`crate::data::Zoom`]:
//!   views pasted small on a mid-gray canvas or zoomed in, captions prefixed "a far away",
//!   "close up", …) and its loss normalized by the mask's area; prior preservation with class
//!   images as DreamBooth (the script doubles the learning rate then, and so does this method).
//! * **Defaults**: the script's README: 250 steps, batch 2, lr 1e-5 scaled by batch ×
//!   accumulation, gradient clipping at 1, resolution 512, flips.
//! * **Output**: the folder diffusers' script writes (`pytorch_custom_diffusion_weights.safetensors`
//!   and one `<token>.safetensors` per token) at `--out DIR`, and imprint's native file
//!   `DIR.safetensors` with the weight changes, or with `--rank R` their rank-R truncated SVD as
//!   LoRA pairs (the paper's compression).
//!
//! The optimizer decays the change `ΔW` rather than the weight (AdamW's decoupled decay, lr 1e-5
//! × 1e-2 per step): a difference from the script of about 1e-7 of the weight per step.

use super::textual_inversion::TextualInversion;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use imprint_concepts::formats::custom_diffusion::CUSTOM_DIFFUSION;
use imprint_concepts::per_layer::substitute_tokens;
use imprint_concepts::{
    Concept, LoraModule, ProjectionWeights, TokenEmbedding, TEXT_ENCODER, UNET,
};
use imprint_models::visit::{Projection, VisitProjections};
use imprint_models::TextStates;
use imprint_ops::{Adapter, ScaledAdapter};
use imprint_pipeline::StableDiffusion;
use std::path::Path;
use std::sync::Arc;

pub const DEFAULT_LR: f64 = 1e-5;
pub const DEFAULT_STEPS: usize = 250;
pub const DEFAULT_BATCH: usize = 2;
/// The script's default initializer words for `<new1>+<new2>+<new3>`.
pub const DEFAULT_INIT_WORDS: [&str; 3] = ["ktn", "pll", "ucd"];

/// A trainable change `x ↦ x ΔWᵀ (+ Δb)` on a frozen projection; with `detach_first_token` the
/// first position of each sequence (the start-of-text token) passes no gradient to `ΔW`.
#[derive(Debug)]
pub struct DeltaAdapter {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub detach_first_token: bool,
}

impl Adapter for DeltaAdapter {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Mixed precision: the f32 weights meet half-precision activations in their dtype.
        let like = |p: &Tensor| imprint_ops::cast_like(p, x);
        let y = x.broadcast_matmul(&like(&self.weight)?.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&like(b)?)?,
            None => y,
        };
        if !self.detach_first_token || y.rank() != 3 {
            return Ok(y);
        }
        // diffusers' CustomDiffusionAttnProcessor: k = detach·k + (1 − detach)·k.detach(), with
        // detach zero at position 0 only. Forward values are unchanged.
        let s = y.dim(1)?;
        let keep: Vec<f32> = (0..s).map(|i| if i == 0 { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (1, s, 1), y.device())?.to_dtype(y.dtype())?;
        let frozen = (1.0 - &keep)?;
        y.broadcast_mul(&keep)? + y.detach().broadcast_mul(&frozen)?
    }
}

/// One trained projection.
struct TrainedProjection {
    /// e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`.
    module: String,
    base_weight: Tensor,
    base_bias: Option<Tensor>,
    weight: Var,
    bias: Option<Var>,
}

/// Custom Diffusion in the shared loop.
pub struct CustomDiffusionMethod {
    pub tokens: Vec<TextualInversion>,
    pub init_words: Vec<String>,
    pub instance_prompt: Option<String>,
    projections: Vec<TrainedProjection>,
    /// Prior preservation is on: the script doubles the learning rate.
    prior: bool,
    augment: bool,
    rank: Option<usize>,
}

impl CustomDiffusionMethod {
    /// Registers the modifier tokens and attaches a zero change to every trained projection.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        sd: &mut StableDiffusion,
        tokens: &[String],
        init_words: &[String],
        instance_prompt: Option<String>,
        train_q_out: bool,
        prior: bool,
        augment: bool,
        rank: Option<usize>,
    ) -> Result<Self> {
        if tokens.is_empty() {
            bail!("--token is required (repeat it to train several concepts jointly)")
        }
        let words: Vec<String> = if init_words.is_empty() {
            if tokens.len() > DEFAULT_INIT_WORDS.len() {
                bail!("give one --init-word per --token beyond three")
            }
            DEFAULT_INIT_WORDS[..tokens.len()]
                .iter()
                .map(|w| w.to_string())
                .collect()
        } else if init_words.len() == tokens.len() {
            init_words.to_vec()
        } else {
            bail!(
                "{} --token but {} --init-word: give one init word per token",
                tokens.len(),
                init_words.len()
            )
        };
        let mut registered = vec![];
        for (t, w) in tokens.iter().zip(&words) {
            let ti = TextualInversion::new(&mut sd.tokenizer, &sd.text_encoder, t, w, 1);
            registered.push(if init_words.is_empty() {
                ti.with_context(|| {
                    format!("'{w}' is the script's default init word for {t}; give --init-word")
                })?
            } else {
                ti?
            });
        }
        let wanted = |name: &str| {
            name.contains(".attn2.")
                && (name.ends_with(".to_k")
                    || name.ends_with(".to_v")
                    || (train_q_out && (name.ends_with(".to_q") || name.ends_with(".to_out.0"))))
        };
        let mut projections = vec![];
        let mut failure: Option<candle_core::Error> = None;
        sd.unet.visit_projections(&mut |p| {
            let Projection::Linear(lin) = p else { return };
            if !wanted(&lin.name) || failure.is_some() {
                return;
            }
            let made = (|| -> candle_core::Result<TrainedProjection> {
                let weight = Var::from_tensor(&lin.weight.zeros_like()?.to_dtype(DType::F32)?)?;
                let bias = match (&lin.bias, lin.name.ends_with(".to_out.0")) {
                    (Some(b), true) => {
                        Some(Var::from_tensor(&b.zeros_like()?.to_dtype(DType::F32)?)?)
                    }
                    _ => None,
                };
                let kv = lin.name.ends_with(".to_k") || lin.name.ends_with(".to_v");
                lin.adapters.push(ScaledAdapter {
                    adapter: Arc::new(DeltaAdapter {
                        weight: weight.as_tensor().clone(),
                        bias: bias.as_ref().map(|b| b.as_tensor().clone()),
                        detach_first_token: kv,
                    }),
                    scale: 1.0,
                });
                Ok(TrainedProjection {
                    module: lin.name.clone(),
                    base_weight: lin.weight.clone(),
                    base_bias: lin.bias.clone(),
                    weight,
                    bias,
                })
            })();
            match made {
                Ok(t) => projections.push(t),
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        if projections.is_empty() {
            bail!("the UNet has no cross-attention layers to fine-tune")
        }
        Ok(Self {
            tokens: registered,
            init_words: words,
            instance_prompt,
            projections,
            prior,
            augment,
            rank,
        })
    }

    /// The concept with whole projections (`W + ΔW`, what diffusers' folder holds) or their
    /// changes.
    fn concept_with(&self, whole: bool) -> Result<Concept> {
        let cpu =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
        let mut projections = vec![];
        for p in &self.projections {
            let (w, b) = (
                cpu(p.weight.as_tensor())?,
                p.bias.as_ref().map(|b| cpu(b.as_tensor())).transpose()?,
            );
            let (w, b) = if whole {
                let bias = match (&b, &p.base_bias) {
                    (Some(d), Some(base)) => Some((d + cpu(base)?)?),
                    _ => None,
                };
                ((w + cpu(&p.base_weight)?)?, bias)
            } else {
                (w, b)
            };
            projections.push(ProjectionWeights::new(UNET, &p.module, w, b, !whole)?);
        }
        let first = &self.tokens[0];
        Ok(Concept {
            trigger: first.token.clone(),
            method: CUSTOM_DIFFUSION.to_string(),
            embeddings: vec![TokenEmbedding::new(
                TEXT_ENCODER,
                cpu(first.vectors.as_tensor())?,
            )?],
            extra_tokens: self.tokens[1..]
                .iter()
                .map(|t| Ok((t.token.clone(), cpu(t.vectors.as_tensor())?)))
                .collect::<Result<_>>()?,
            projections,
            ..Default::default()
        })
    }

    /// The changes as rank-`rank` LoRA pairs (truncated SVD), biases kept whole.
    fn compressed(&self, rank: usize) -> Result<Concept> {
        let mut c = self.concept_with(false)?;
        let mut modules = vec![];
        let mut keep = vec![];
        for p in c.projections.drain(..) {
            let (out, inp) = p.weight.dims2()?;
            let r = rank.min(out).min(inp);
            let (up, down) = crate::svd::low_rank(&p.weight, r, 0)?;
            modules.push(LoraModule::new(
                UNET, &p.module, down, up, r as f64, &p.module,
            )?);
            if let Some(b) = p.bias {
                let zero = Tensor::zeros((out, inp), DType::F32, &Device::Cpu)?;
                keep.push(ProjectionWeights::new(
                    UNET,
                    &p.module,
                    zero,
                    Some(b),
                    true,
                )?);
            }
        }
        c.projections = keep;
        c.lora.modules = modules;
        c.metadata
            .insert("custom_diffusion.rank".into(), rank.to_string());
        Ok(c)
    }

    /// Where the native file goes: `DIR.safetensors` beside the folder `DIR`.
    pub fn native_path(out: &Path) -> std::path::PathBuf {
        out.with_file_name(format!(
            "{}.safetensors",
            out.file_name().unwrap_or_default().to_string_lossy()
        ))
    }
}

impl super::Method for CustomDiffusionMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .tokens
            .iter()
            .map(|t| (format!("token.{}", t.token), t.vectors.clone()))
            .collect();
        for p in &self.projections {
            out.push((format!("delta.{}", p.module), p.weight.clone()));
            if let Some(b) = &p.bias {
                out.push((format!("delta_bias.{}", p.module), b.clone()));
            }
        }
        out
    }

    fn lr_scale(&self, _name: &str) -> f64 {
        if self.prior {
            2.0
        } else {
            1.0
        }
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        _rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        super::instance_caption(image, &self.instance_prompt)
    }

    fn resize_augmentation(&self) -> bool {
        self.augment
    }

    fn mask_normalized_loss(&self) -> bool {
        true
    }

    fn text_states(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<TextStates> {
        let ids_of: Vec<u32> = self.tokens.iter().map(|t| t.token_ids[0]).collect();
        let vectors: Vec<Tensor> = self
            .tokens
            .iter()
            .map(|t| t.vectors.as_tensor().clone())
            .collect();
        let embeds = substitute_tokens(&sd.text_encoder, ids, &ids_of, &Tensor::cat(&vectors, 0)?)?;
        Ok(TextStates::Shared(
            sd.text_encoder
                .forward_embeds(&embeds, ids, 0)?
                .last_hidden_state,
        ))
    }

    fn concept(&self, base_model: Option<String>) -> Result<Concept> {
        let mut c = self.concept_with(false)?;
        c.base_model = base_model;
        Ok(c)
    }

    fn save(&self, out: &Path, base_model: Option<String>, steps: usize) -> Result<()> {
        use imprint_concepts::formats::{save, Format};
        let mut whole = self.concept_with(true)?;
        whole.base_model = base_model.clone();
        save(&whole, out, Format::Diffusers).with_context(|| out.display().to_string())?;
        let mut native = match self.rank {
            Some(r) => self.compressed(r)?,
            None => self.concept_with(false)?,
        };
        native.base_model = base_model;
        native.metadata.insert("steps".into(), steps.to_string());
        native
            .metadata
            .insert("init_words".into(), self.init_words.join(","));
        save(&native, &Self::native_path(out), Format::Native)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_start_token_passes_no_gradient_to_the_change() {
        let dev = Device::Cpu;
        let x = imprint_ops::grad_check::rand_tensor(&[2, 5, 3], 1, &dev).unwrap();
        let w = Var::from_tensor(&imprint_ops::grad_check::rand_tensor(&[4, 3], 2, &dev).unwrap())
            .unwrap();
        let adapter = |detach| DeltaAdapter {
            weight: w.as_tensor().clone(),
            bias: None,
            detach_first_token: detach,
        };
        let y = adapter(true).forward(&x).unwrap();
        // Same values as without the detach.
        let plain = adapter(false).forward(&x).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            plain.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let got = g.get(w.as_tensor()).unwrap();
        // d/dW Σ x Wᵀ over positions 1.. only: Σ_{b, s ≥ 1} x[b, s, :] for every output row.
        let rest = x.narrow(1, 1, 4).unwrap().sum((0, 1)).unwrap();
        let want = rest.unsqueeze(0).unwrap().repeat((4, 1)).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }
}
