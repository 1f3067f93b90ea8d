//! Textual Inversion (Gal et al. 2022, "An Image is Worth One Word"): learn the embedding of a new
//! token — or of `n` tokens standing for one word — while every network stays frozen.
//!
//! * **Trainable**: only the new token's `n` vectors (`[n, dim]`); the embedding table and every
//!   other row stay bit-identical, because they are never variables.
//! * **Loss**: the shared denoising loss ([`super::diffusion_loss`]) on captions from the paper's
//!   templates with the token in them.
//! * **Defaults**: diffusers' `examples/textual_inversion` recipe (its README's command): lr 5e-4
//!   scaled by batch × accumulation, batch 1 × accumulation 4, 3000 steps, 512 px, constant
//!   schedule, AdamW(0.9, 0.999, wd 1e-2, eps 1e-8), vectors initialized from the init word.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use imprint_concepts::per_layer::substitute_tokens;
use imprint_models::clip::ClipTextTransformer;
use imprint_models::tokenizer::ClipTokenizer;

pub const DEFAULT_LR: f64 = 5e-4;
pub const DEFAULT_STEPS: usize = 3000;
pub const DEFAULT_BATCH: usize = 1;
pub const DEFAULT_GRAD_ACCUM: usize = 4;
pub const DEFAULT_RESOLUTION: usize = 512;

/// The learned token(s) and their vectors.
pub struct TextualInversion {
    /// The trigger word as written in prompts, e.g. `<my-toy>`.
    pub token: String,
    /// The registered tokens: `token`, `token_1`, …, as diffusers names multi-vector tokens.
    pub token_names: Vec<String>,
    pub token_ids: Vec<u32>,
    /// `[n, dim]`: the only trainable tensor.
    pub vectors: Var,
}

impl TextualInversion {
    /// Registers the new token(s) and initializes every vector to the init word's embedding.
    pub fn new(
        tokenizer: &mut ClipTokenizer,
        te: &ClipTextTransformer,
        token: &str,
        init_word: &str,
        num_vectors: usize,
    ) -> Result<Self> {
        let init_ids = tokenizer.tokenize(init_word);
        if init_ids.len() != 1 {
            bail!("init word '{init_word}' is {} tokens; choose a word that is a single token (e.g. 'toy', 'dog', 'painting')", init_ids.len())
        }
        let row = te
            .token_embedding
            .get(init_ids[0] as usize)?
            .to_dtype(DType::F32)?;
        let vectors = row.unsqueeze(0)?.repeat((num_vectors.max(1), 1))?;
        Self::with_vectors(tokenizer, te, token, &vectors)
    }

    /// Registers the token(s) for given vectors `[n, dim]` (resume).
    pub fn with_vectors(
        tokenizer: &mut ClipTokenizer,
        te: &ClipTextTransformer,
        token: &str,
        vectors: &Tensor,
    ) -> Result<Self> {
        let (n, dim) = vectors.dims2()?;
        if n == 0 {
            bail!("--num-vectors must be at least 1")
        }
        let te_dim = te.token_embedding.dim(1)?;
        if dim != te_dim {
            bail!("the vectors are {dim}-dimensional; this text encoder takes {te_dim}")
        }
        let token_names: Vec<String> = (0..n)
            .map(|i| {
                if i == 0 {
                    token.to_string()
                } else {
                    format!("{token}_{i}")
                }
            })
            .collect();
        let mut token_ids = vec![];
        for name in &token_names {
            if tokenizer.token_id(name).is_some() {
                bail!("token '{name}' already exists in the vocabulary; choose a new word such as '<my-{}>'", name.trim_matches(|c| c == '<' || c == '>'))
            }
            token_ids.push(
                tokenizer
                    .add_token(name)
                    .with_context(|| format!("registering '{name}'"))?,
            );
        }
        let vectors = Var::from_tensor(&vectors.to_dtype(DType::F32)?.to_device(te.device())?)?;
        Ok(Self {
            token: token.to_string(),
            token_names,
            token_ids,
            vectors,
        })
    }

    /// What stands for the concept in captions: the registered tokens separated by spaces.
    pub fn placeholder_string(&self) -> String {
        self.token_names.join(" ")
    }

    /// Token embeddings `[B, S, D]` for `ids [B, S]`: the frozen table's rows, with the new tokens'
    /// positions taken from the trainable vectors (so the gradient reaches only them).
    pub fn token_embeddings(&self, te: &ClipTextTransformer, ids: &Tensor) -> Result<Tensor> {
        // The new ids lie past the table; their positions take the trainable rows.
        substitute_tokens(te, ids, &self.token_ids, self.vectors.as_tensor())
    }

    /// Text states `[B, S, D]` for `ids` through the frozen text encoder.
    pub fn encode(&self, te: &ClipTextTransformer, ids: &Tensor) -> Result<Tensor> {
        let embeds = self.token_embeddings(te, ids)?;
        Ok(te.forward_embeds(&embeds, ids, 0)?.last_hidden_state)
    }
}

/// Textual inversion in the shared loop: captions from the paper's templates.
pub struct TextualInversionMethod {
    pub ti: TextualInversion,
    pub templates: crate::templates::TemplateSet,
    pub init_word: String,
}

impl super::Method for TextualInversionMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("token_embeddings".to_string(), self.ti.vectors.clone())]
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        crate::templates::caption_for_image(
            self.templates,
            image.caption.as_deref(),
            &self.ti.token,
            &self.ti.placeholder_string(),
            rng,
        )
    }

    fn prompt(&self, prompt: &str) -> String {
        prompt.replace(&self.ti.token, &self.ti.placeholder_string())
    }

    fn text_states(
        &self,
        sd: &imprint_pipeline::StableDiffusion,
        ids: &Tensor,
    ) -> Result<imprint_models::TextStates> {
        Ok(imprint_models::TextStates::Shared(
            self.ti.encode(&sd.text_encoder, ids)?,
        ))
    }

    fn concept(&self, base_model: Option<String>) -> Result<imprint_concepts::Concept> {
        Ok(imprint_concepts::Concept {
            trigger: self.ti.token.clone(),
            method: imprint_concepts::TEXTUAL_INVERSION.into(),
            embeddings: vec![imprint_concepts::TokenEmbedding {
                encoder: imprint_concepts::TEXT_ENCODER.into(),
                vectors: self
                    .ti
                    .vectors
                    .as_tensor()
                    .to_device(&candle_core::Device::Cpu)?,
            }],
            base_model,
            metadata: [("init_word".to_string(), self.init_word.clone())].into(),
            ..Default::default()
        })
    }
}
