//! Concepts: what personalization produces, how it is stored, and how it is applied to a model.
//!
//! Every personalization method in imprint produces a [`Concept`]: a small bundle bound to a
//! trigger word. Textual Inversion learns only token embeddings: one or more vectors per text
//! encoder, held as [`TokenEmbedding`]s. LoRA learns low-rank deltas on the UNet's and text
//! encoder's projections, held as [`LoraWeights`] ([`lora`]). P+ holds one embedding per UNet
//! cross-attention layer ([`LayerEmbedding`], applied by [`per_layer`]); Perfusion a gated rank-1
//! edit of every cross-attention key and value ([`perfusion`]); Custom Diffusion whole projection
//! weights or their changes ([`weights`], merged in closed form by [`closed_form`]); the LyCORIS
//! files users exchange their LoHa, LoKr, (IA)³ and OFT modules ([`lycoris`]). One concept may
//! hold several parts (hybrid methods); new methods add parts to the same type rather than
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
pub mod closed_form;
pub mod formats;
pub mod inclusive;
pub mod lora;
pub mod lycoris;
pub mod merge;
pub mod per_layer;
pub mod perfusion;
pub mod spectral;
pub mod weights;

pub use lora::{LoraModule, LoraWeights, LORA, UNET};
pub use perfusion::{PerfusionEdit, PerfusionLayer, PERFUSION};
pub use weights::ProjectionWeights;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// The method name Textual Inversion concepts carry (`Concept::method`).
pub const TEXTUAL_INVERSION: &str = "textual-inversion";
/// The method name of Extended Textual Inversion (P+) concepts: per-layer token embeddings.
pub const EXTENDED_TEXTUAL_INVERSION: &str = "extended-textual-inversion";
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

/// The trigger's vectors for one UNet cross-attention layer (Extended Textual Inversion, P+:
/// Voynov et al. 2023): that layer's text states come from the text encoder run with them.
#[derive(Clone, Debug)]
pub struct LayerEmbedding {
    /// The layer's key: the diffusers path of its transformer, e.g. `down_blocks.0.attentions.1`
    /// or `mid_block.attentions.0` (see `UNet2DConditionModel::embedding_keys`).
    pub layer: String,
    /// `[n, dim]`, f32, on the CPU.
    pub vectors: Tensor,
}

impl LayerEmbedding {
    pub fn new(layer: &str, vectors: Tensor) -> Result<Self> {
        let e = TokenEmbedding::new(TEXT_ENCODER, vectors)
            .map_err(|e| anyhow::anyhow!("layer {layer}: {e}"))?;
        Ok(Self {
            layer: layer.to_string(),
            vectors: e.vectors,
        })
    }
}

/// What one personalization produced, bound to its trigger word.
#[derive(Clone, Debug, Default)]
pub struct Concept {
    /// The word that invokes the concept in a prompt (`<cat-toy>`, `sks`, ...).
    pub trigger: String,
    /// The method that made it, e.g. [`TEXTUAL_INVERSION`].
    pub method: String,
    /// Token embeddings, at most one per text encoder.
    pub embeddings: Vec<TokenEmbedding>,
    /// Low-rank deltas on the networks' projections (LoRA); empty for Textual Inversion.
    pub lora: LoraWeights,
    /// Per-layer token embeddings (P+), in the UNet's forward order; empty for other methods.
    pub layer_embeddings: Vec<LayerEmbedding>,
    /// Perfusion's key-locked rank-1 edits of the cross-attention keys and values.
    pub perfusion: Option<PerfusionEdit>,
    /// LyCORIS weight changes (LoHa, LoKr, (IA)³, diag-OFT) read from the files users exchange.
    pub lycoris: Vec<lycoris::LycorisModule>,
    /// Whole projection weights or their changes (Custom Diffusion's cross-attention K/V).
    pub projections: Vec<ProjectionWeights>,
    /// SVDiff's spectral shifts of the networks' weights.
    pub spectral_shifts: Vec<spectral::SpectralShift>,
    /// Further words trained with this one (Custom Diffusion's joint modifier tokens): `(trigger,
    /// [n, dim])` for the first text encoder.
    pub extra_tokens: Vec<(String, Tensor)>,
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
            ..Default::default()
        })
    }

    /// An Extended Textual Inversion concept: `[n, dim]` vectors per layer key.
    pub fn extended_textual_inversion(trigger: &str, layers: Vec<LayerEmbedding>) -> Self {
        Self {
            trigger: trigger.to_string(),
            method: EXTENDED_TEXTUAL_INVERSION.to_string(),
            layer_embeddings: layers,
            ..Default::default()
        }
    }

    /// The embeddings for one text encoder, if the concept has them.
    pub fn embedding(&self, encoder: &str) -> Option<&TokenEmbedding> {
        self.embeddings.iter().find(|e| e.encoder == encoder)
    }

    /// Vectors per encoder (the first encoder's, or the first layer's for per-layer embeddings;
    /// all encoders and layers of a concept have the same count).
    pub fn num_vectors(&self) -> usize {
        match (self.embeddings.first(), self.layer_embeddings.first()) {
            (Some(e), _) => e.num_vectors(),
            (None, Some(l)) => l.vectors.dim(0).unwrap_or(0),
            (None, None) => 0,
        }
    }

    /// The first text encoder's embedding dimension (768 for SD 1.x, 1024 for SD 2.x).
    pub fn dim(&self) -> usize {
        match (self.embeddings.first(), self.layer_embeddings.first()) {
            (Some(e), _) => e.dim(),
            (None, Some(l)) => l.vectors.dim(1).unwrap_or(0),
            (None, None) => 0,
        }
    }

    /// Whether the concept brings new words (token embeddings, shared or per layer).
    pub fn has_tokens(&self) -> bool {
        !self.embeddings.is_empty() || !self.layer_embeddings.is_empty()
    }

    /// A LoRA concept. LoRA files name no trigger: `trigger` may be empty.
    pub fn lora(trigger: &str, lora: LoraWeights) -> Self {
        Self {
            trigger: trigger.to_string(),
            method: LORA.to_string(),
            embeddings: Vec::new(),
            lora,
            ..Default::default()
        }
    }

    /// Checks what every format and the applier rely on: at least one part; token embeddings need
    /// a usable trigger, at most one per encoder, and the same vector count in each; LoRA modules
    /// appear once each.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if self.trigger.chars().any(char::is_whitespace) {
            bail!(
                "trigger {:?} contains whitespace; a trigger must be one word",
                self.trigger
            )
        }
        if !self.has_tokens() {
            if self.lora.is_empty()
                && self.lycoris.is_empty()
                && self.projections.is_empty()
                && self.spectral_shifts.is_empty()
            {
                bail!(
                    "concept '{}' holds neither token embeddings nor LoRA weights",
                    self.trigger
                )
            }
            if self.perfusion.is_some() {
                bail!(
                    "Perfusion concept '{}' has no token embedding",
                    self.trigger
                )
            }
            return Ok(());
        }
        if self.trigger.trim().is_empty() {
            bail!("the concept has an empty trigger word")
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
        if !self.layer_embeddings.is_empty() && !self.embeddings.is_empty() {
            bail!(
                "concept '{}' has both shared and per-layer token embeddings",
                self.trigger
            )
        }
        let first = self.layer_embeddings.first().map(|l| l.vectors.dims());
        for (i, l) in self.layer_embeddings.iter().enumerate() {
            if self.layer_embeddings[..i]
                .iter()
                .any(|o| o.layer == l.layer)
            {
                bail!(
                    "concept '{}' has two embeddings for layer {}",
                    self.trigger,
                    l.layer
                )
            }
            if Some(l.vectors.dims()) != first {
                bail!(
                    "concept '{}': layer {} has vectors of shape {:?}, layer {} {:?}; every layer needs the same [n, dim]",
                    self.trigger,
                    l.layer,
                    l.vectors.dims(),
                    self.layer_embeddings[0].layer,
                    first.unwrap_or(&[])
                )
            }
        }
        if let Some(p) = &self.perfusion {
            if self.num_vectors() != 1 || self.embedding(TEXT_ENCODER).is_none() {
                bail!(
                    "Perfusion concept '{}' needs exactly one token vector for {TEXT_ENCODER}",
                    self.trigger
                )
            }
            p.validate(self.dim())
                .map_err(|e| anyhow::anyhow!("Perfusion concept '{}': {e}", self.trigger))?;
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
