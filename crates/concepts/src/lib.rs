//! Concepts: what personalization produces, how it is stored, and how it is applied to a model.
//!
//! Every personalization method in imprint produces a [`Concept`]: a small bundle bound to a
//! trigger word. Textual Inversion learns only token embeddings: one or more vectors per text
//! encoder, held as [`TokenEmbedding`]s. LoRA learns low-rank deltas on the UNet's and text
//! encoder's projections, held as [`LoraWeights`] ([`lora`]). One concept may hold both (hybrid
//! methods); later methods (per-layer embeddings, ...) add parts to the same type rather than
//! inventing their own.
//!
//! This crate is responsible for
//!
//! - the [`Concept`] type and its small helpers (number of vectors, dimension, norms);
//! - reading and writing the files users exchange, one module per ecosystem under [`formats`]:
//!   our native `.safetensors` ([`formats::native`]), diffusers' `learned_embeds.safetensors`
//!   ([`formats::diffusers`]) and Automatic1111/kohya embeddings, `.safetensors` and pickled `.pt`
//!   ([`formats::a1111`]); kohya LoRA ([`formats::kohya`]) and diffusers/PEFT LoRA
//!   ([`formats::diffusers_lora`]). [`formats::load_any`] recognises a file by its content;
//!   [`formats::save`] writes one atomically;
//! - applying a concept to a loaded tokenizer and text encoder ([`apply`]): new tokens, new rows
//!   of the embedding table, and the prompt rewriting that multi-vector triggers need; attaching
//!   LoRA adapters to the networks' projections ([`lora::apply_lora`]) through the models'
//!   adapter hook; baking LoRA deltas into a model folder ([`merge`]).
//!
//! It delegates the networks and the tokenizer to `imprint-models`, and generation to
//! `imprint-pipeline`, which calls [`apply::apply_textual_inversion`] and
//! [`apply::expand_prompt`]. Pickled files are read by a restricted parser that interprets data
//! only and never runs code ([`formats::pt`]).
//!
//! ```no_run
//! use imprint_concepts::formats::{self, Format};
//! // A diffusers textual-inversion file, re-saved in the form A1111 loads.
//! let concept = formats::load_any("learned_embeds.safetensors".as_ref())?;
//! println!("{}: {} vectors of {}", concept.trigger, concept.num_vectors(), concept.dim());
//! formats::save(&concept, "cat-toy.safetensors".as_ref(), Format::A1111)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod apply;
pub mod formats;
pub mod lora;
pub mod merge;

pub use lora::{LoraModule, LoraWeights, LORA, UNET};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// The method name Textual Inversion concepts carry (`Concept::method`).
pub const TEXTUAL_INVERSION: &str = "textual-inversion";
/// The text encoder of SD 1.x/2.x, and SDXL's first (CLIP ViT-L).
pub const TEXT_ENCODER: &str = "text_encoder";
/// SDXL's second text encoder (OpenCLIP ViT-bigG).
pub const TEXT_ENCODER_2: &str = "text_encoder_2";

/// The learned input embeddings of one text encoder.
#[derive(Clone, Debug)]
pub struct TokenEmbedding {
    /// Which text encoder they feed: [`TEXT_ENCODER`] or [`TEXT_ENCODER_2`] (SDXL's clip_g).
    pub encoder: String,
    /// `[n, dim]`, f32, on the CPU: one row per vector of the trigger.
    pub vectors: Tensor,
}

impl TokenEmbedding {
    /// Checks and normalizes `vectors` to `[n, dim]` f32 on the CPU. A 1-D `[dim]` tensor is one
    /// vector, as diffusers' `load_textual_inversion` accepts it.
    pub fn new(encoder: &str, vectors: Tensor) -> Result<Self> {
        let vectors = match vectors.rank() {
            1 => vectors.unsqueeze(0)?,
            2 => vectors,
            _ => bail!(
                "token embeddings must be [n, dim] or [dim], got shape {:?}",
                vectors.dims()
            ),
        };
        let (n, dim) = vectors.dims2()?;
        if n == 0 || dim == 0 {
            bail!("token embeddings are empty (shape {:?})", vectors.dims())
        }
        let vectors = vectors
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let finite = vectors
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            bail!("token embeddings contain NaN or infinite values")
        }
        Ok(Self {
            encoder: encoder.to_string(),
            vectors,
        })
    }

    pub fn num_vectors(&self) -> usize {
        self.vectors.dim(0).unwrap_or(0)
    }

    pub fn dim(&self) -> usize {
        self.vectors.dim(1).unwrap_or(0)
    }

    /// The L2 norm of each vector (a trained embedding far from the vocabulary's typical norm,
    /// about 0.4 for SD 1.5, is usually overtrained).
    pub fn norms(&self) -> Result<Vec<f32>> {
        Ok(self.vectors.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?)
    }
}

/// What one personalization produced, bound to its trigger word.
#[derive(Clone, Debug)]
pub struct Concept {
    /// The word that invokes the concept in a prompt (`<cat-toy>`, `sks`, ...).
    pub trigger: String,
    /// The method that made it, e.g. [`TEXTUAL_INVERSION`].
    pub method: String,
    /// Token embeddings, at most one per text encoder.
    pub embeddings: Vec<TokenEmbedding>,
    /// Low-rank deltas on the networks' projections (LoRA); empty for Textual Inversion.
    pub lora: LoraWeights,
    /// The base model it was trained on, when known (a name or a fingerprint).
    pub base_model: Option<String>,
    /// Free-form notes carried through the native format (training steps, source file, ...).
    pub metadata: BTreeMap<String, String>,
}

impl Concept {
    /// A Textual Inversion concept with vectors for the first text encoder.
    pub fn textual_inversion(trigger: &str, vectors: Tensor) -> Result<Self> {
        Ok(Self {
            trigger: trigger.to_string(),
            method: TEXTUAL_INVERSION.to_string(),
            embeddings: vec![TokenEmbedding::new(TEXT_ENCODER, vectors)?],
            lora: LoraWeights::default(),
            base_model: None,
            metadata: BTreeMap::new(),
        })
    }

    /// The embeddings for one text encoder, if the concept has them.
    pub fn embedding(&self, encoder: &str) -> Option<&TokenEmbedding> {
        self.embeddings.iter().find(|e| e.encoder == encoder)
    }

    /// Vectors per encoder (the first encoder's; all encoders of a concept have the same count).
    pub fn num_vectors(&self) -> usize {
        self.embeddings.first().map_or(0, |e| e.num_vectors())
    }

    /// The first text encoder's embedding dimension (768 for SD 1.x, 1024 for SD 2.x).
    pub fn dim(&self) -> usize {
        self.embeddings.first().map_or(0, |e| e.dim())
    }

    /// A LoRA concept. LoRA files name no trigger: `trigger` may be empty.
    pub fn lora(trigger: &str, lora: LoraWeights) -> Self {
        Self {
            trigger: trigger.to_string(),
            method: LORA.to_string(),
            embeddings: Vec::new(),
            lora,
            base_model: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Checks what every format and the applier rely on: at least one part; token embeddings need
    /// a usable trigger, at most one per encoder, and the same vector count in each; LoRA modules
    /// appear once each.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if self.embeddings.is_empty() {
            if self.lora.is_empty() {
                bail!(
                    "concept '{}' holds neither token embeddings nor LoRA weights",
                    self.trigger
                )
            }
            if self.trigger.chars().any(char::is_whitespace) {
                bail!(
                    "trigger {:?} contains whitespace; a trigger must be one word",
                    self.trigger
                )
            }
            return Ok(());
        }
        if self.trigger.trim().is_empty() {
            bail!("the concept has an empty trigger word")
        }
        if self.trigger.chars().any(char::is_whitespace) {
            bail!(
                "trigger {:?} contains whitespace; a trigger must be one word",
                self.trigger
            )
        }
        if self.embeddings.is_empty() {
            bail!("concept '{}' holds no token embeddings", self.trigger)
        }
        for (i, e) in self.embeddings.iter().enumerate() {
            if self.embeddings[..i].iter().any(|o| o.encoder == e.encoder) {
                bail!(
                    "concept '{}' has two embeddings for {}",
                    self.trigger,
                    e.encoder
                )
            }
            if e.num_vectors() != self.num_vectors() {
                bail!(
                    "concept '{}' has {} vectors for {} but {} for {}",
                    self.trigger,
                    self.num_vectors(),
                    self.embeddings[0].encoder,
                    e.num_vectors(),
                    e.encoder
                )
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dimensional_vectors_are_one_row() {
        let t = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let c = Concept::textual_inversion("<x>", t).unwrap();
        assert_eq!((c.num_vectors(), c.dim()), (1, 2));
        assert_eq!(c.embeddings[0].norms().unwrap(), vec![5.0]);
    }

    #[test]
    fn non_finite_vectors_are_refused() {
        let t = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
        assert!(Concept::textual_inversion("<x>", t).is_err());
    }
}
