//! Extended Textual Inversion, P+ (Voynov et al. 2023, "P+: Extended Textual Conditioning in
//! Text-to-Image Generation"): the new word gets its own vectors in every UNet cross-attention
//! layer.
//!
//! * **Trainable**: one `[n, dim]` vector set per cross-attention layer (`[layers, n, dim]`, 16 ×
//!   768 floats for SD 1.5), all initialized from the init word; every network stays frozen.
//! * **Text states**: each layer's states come from the frozen text encoder run with that layer's
//!   vectors; the layers are batched, one encoder pass of `layers × B` prompts.
//! * **Loss**: Textual Inversion's (the shared denoising loss on the paper's caption templates).
//! * **Defaults**: the paper's: 500 steps, lr 5e-3 (not scaled), batch 8 as batch 1 × accumulation
//!   8, constant schedule.

use super::textual_inversion::TextualInversion;
use anyhow::Result;
use candle_core::{Tensor, Var};
use imprint_concepts::per_layer::substitute_tokens;
use imprint_concepts::{Concept, LayerEmbedding};
use imprint_models::TextStates;
use imprint_pipeline::StableDiffusion;

pub const DEFAULT_LR: f64 = 5e-3;
pub const DEFAULT_STEPS: usize = 500;
pub const DEFAULT_BATCH: usize = 1;
pub const DEFAULT_GRAD_ACCUM: usize = 8;

/// The new word's per-layer vectors.
pub struct ExtendedTextualInversion {
    /// The registered tokens (as Textual Inversion registers them); its `vectors` are unused.
    pub tokens: TextualInversion,
    /// The UNet's layer keys in forward order.
    pub layer_keys: Vec<String>,
    /// `[layers, n, dim]`: the only trainable tensor.
    pub vectors: Var,
}

impl ExtendedTextualInversion {
    /// Registers the token(s) and starts every layer's vectors at the init word's embedding.
    pub fn new(sd: &mut StableDiffusion, token: &str, init_word: &str, n: usize) -> Result<Self> {
        let tokens =
            TextualInversion::new(&mut sd.tokenizer, &sd.text_encoder, token, init_word, n)?;
        let layer_keys = sd.unet.embedding_keys();
        let start = tokens.vectors.as_tensor().unsqueeze(0)?;
        let vectors = Var::from_tensor(&start.repeat((layer_keys.len(), 1, 1))?)?;
        Ok(Self {
            tokens,
            layer_keys,
            vectors,
        })
    }

    /// Per-layer text states for `ids [B, S]`: one encoder pass over `layers × B` prompts. Ids
    /// without the new word give shared states.
    pub fn encode(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<TextStates> {
        let te = &sd.text_encoder;
        let flat = ids
            .flatten_all()?
            .to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?;
        if !self
            .tokens
            .token_ids
            .iter()
            .any(|&t| flat.contains(&(t as i64)))
        {
            return Ok(TextStates::Shared(te.forward(ids, 0)?.last_hidden_state));
        }
        let layers = self.layer_keys.len();
        let embeds = (0..layers)
            .map(|l| {
                substitute_tokens(
                    te,
                    ids,
                    &self.tokens.token_ids,
                    &self.vectors.as_tensor().get(l)?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let b = ids.dim(0)?;
        let all_ids = Tensor::cat(&vec![ids.clone(); layers], 0)?;
        let states = te
            .forward_embeds(&Tensor::cat(&embeds, 0)?, &all_ids, 0)?
            .last_hidden_state;
        Ok(TextStates::PerLayer(
            (0..layers)
                .map(|l| states.narrow(0, l * b, b))
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// The concept: the vectors of each layer under its key.
    pub fn concept(&self) -> Result<Concept> {
        let v = self
            .vectors
            .as_tensor()
            .to_device(&candle_core::Device::Cpu)?;
        let layers = self
            .layer_keys
            .iter()
            .enumerate()
            .map(|(i, k)| LayerEmbedding::new(k, v.get(i)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Concept::extended_textual_inversion(
            &self.tokens.token,
            layers,
        ))
    }
}

/// P+ in the shared loop: Textual Inversion's captions, per-layer text states.
pub struct ExtendedTextualInversionMethod {
    pub xti: ExtendedTextualInversion,
    pub templates: crate::templates::TemplateSet,
    pub init_word: String,
}

impl super::Method for ExtendedTextualInversionMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![(
            "layer_token_embeddings".to_string(),
            self.xti.vectors.clone(),
        )]
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        crate::templates::caption_for_image(
            self.templates,
            image.caption.as_deref(),
            &self.xti.tokens.token,
            &self.xti.tokens.placeholder_string(),
            rng,
        )
    }

    fn prompt(&self, prompt: &str) -> String {
        prompt.replace(
            &self.xti.tokens.token,
            &self.xti.tokens.placeholder_string(),
        )
    }

    fn text_states(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<TextStates> {
        self.xti.encode(sd, ids)
    }

    fn concept(&self, base_model: Option<String>) -> Result<Concept> {
        let mut c = self.xti.concept()?;
        c.base_model = base_model;
        c.metadata
            .insert("init_word".to_string(), self.init_word.clone());
        Ok(c)
    }
}
