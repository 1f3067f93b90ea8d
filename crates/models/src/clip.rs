//! The CLIP text encoder (`transformers.CLIPTextModel`), as Stable Diffusion uses it.
//!
//! Follows transformers' `models/clip/modeling_clip.py`: token + position embeddings, pre-norm
//! transformer layers with a causal mask, a final layer norm, and the pooled output taken at the
//! end-of-text token exactly as transformers picks it (see [`ClipTextTransformer::pool`]).
//! [`ClipTextTransformer::forward_embeds`] takes token embeddings directly, which is how textual
//! inversion substitutes learned vectors for new tokens.

use crate::visit::{Norm, Projection, VisitProjections};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{scaled_dot_product_attention, LayerNorm, Linear};
use serde::Deserialize;

/// `text_encoder/config.json` (the fields that change the math).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
/// `CLIPTextConfig`'s default; SD 1.x/2.x configs still carry the legacy 2.
fn default_eos() -> u32 {
    49407
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    /// `hidden_act` of a transformers config.
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_in(s, "text_encoder/config.json")
    }

    /// As [`Activation::parse`], naming `config` in the error.
    pub fn parse_in(s: &str, config: &str) -> Result<Self> {
        match s {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => bail!(
                "{config}: unsupported hidden_act '{other}' (expected quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu or silu)"
            ),
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // x · σ(1.702 x), CLIP's original approximation.
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

#[derive(Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, d: usize, heads: usize) -> Result<Self> {
        if heads == 0 || d % heads != 0 {
            bail!(
                "{}: hidden_size {d} is not divisible by num_attention_heads {heads}",
                vb.prefix()
            )
        }
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads,
            head_dim: d / heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .reshape((b * self.heads, s, self.head_dim))
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = scaled_dot_product_attention(&q, &k, &v, scale, mask)?;
        let o = o
            .reshape((b, self.heads, s, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, s, d))?;
        self.out_proj.forward(&o)
    }
}

/// One pre-norm transformer layer of CLIP (`CLIPEncoderLayer`), shared by the text and vision
/// towers.
#[derive(Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    activation: Activation,
}

impl ClipEncoderLayer {
    /// `hidden`/`intermediate`/`heads`/`eps` as the tower's config names them.
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
        activation: Activation,
    ) -> Result<Self> {
        let d = hidden;
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), d, heads)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, eps)?,
            fc1: Linear::new(vb.pp("mlp").pp("fc1"), d, intermediate, true)?,
            fc2: Linear::new(vb.pp("mlp").pp("fc2"), intermediate, d, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, eps)?,
            activation,
        })
    }

    /// `x [B, S, D]`; `mask` an additive `[S, S]` attention mask (the text tower's causal one).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let m = self.fc2.forward(
            &self
                .activation
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// What the text encoder returns.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// `[B, S, D]`: final-layer-normed states of the last layer, or of an earlier one with clip skip.
    pub last_hidden_state: Tensor,
    /// `[B, D]`: the state at the end-of-text position.
    pub pooler_output: Tensor,
}

/// `text_model` of `CLIPTextModel`.
#[derive(Clone)]
pub struct ClipTextTransformer {
    /// `[vocab, D]`: the token embedding table (new tokens append rows here).
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextTransformer {
    /// Builds from the `text_encoder` weights; `vb` is the root (names start with `text_model.`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let activation = Activation::parse(&cfg.hidden_act)?;
        // transformers < 5 saves `text_model.…`; transformers 5 saves the same modules at the root.
        let unprefixed = vb.contains_tensor("embeddings.token_embedding.weight");
        let vb = if unprefixed { vb } else { vb.pp("text_model") };
        let emb = vb.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(
                    vb.pp("encoder.layers").pp(i),
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    cfg.num_attention_heads,
                    cfg.layer_norm_eps,
                    activation,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            vb.pp("final_layer_norm"),
            cfg.hidden_size,
            cfg.layer_norm_eps,
        )?;
        let mut model = Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        };
        // Adapters address projections as transformers < 5 and kohya name them, whichever layout
        // the weights came in.
        if unprefixed {
            model.visit_projections(&mut |p| match p {
                Projection::Linear(l) => l.name = format!("text_model.{}", l.name),
                Projection::Conv2d(c) => c.name = format!("text_model.{}", c.name),
            });
        }
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    /// Looks up token embeddings `[B, S, D]` for `input_ids [B, S]`.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if b == 0 || s == 0 {
            bail!(
                "text encoder: input_ids of shape {:?} hold no tokens",
                input_ids.dims()
            )
        }
        let vocab = self.token_embedding.dim(0)?;
        let flat_ids = input_ids.flatten_all()?.to_dtype(DType::I64)?;
        let (min_id, max_id) = (
            flat_ids.min(0)?.to_scalar::<i64>()?,
            flat_ids.max(0)?.to_scalar::<i64>()?,
        );
        if min_id < 0 || max_id as usize >= vocab {
            let bad = if min_id < 0 { min_id } else { max_id };
            bail!("text encoder: token id {bad} is outside the embedding table ({vocab} rows)")
        }
        let flat = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        Ok(self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((b, s, ()))?)
    }

    /// Runs the encoder on token ids.
    pub fn forward(&self, input_ids: &Tensor, clip_skip: usize) -> Result<ClipTextOutput> {
        let embeds = self.embed_tokens(input_ids)?;
        self.forward_embeds(&embeds, input_ids, clip_skip)
    }

    /// Runs the encoder on token embeddings `[B, S, D]`; `input_ids` choose the pooled position.
    ///
    /// `clip_skip = k > 0` returns the output of layer `n − k` (through the final layer norm, as
    /// diffusers does for `clip_skip`): `k = 1` is the "penultimate layer" SD 2.x-era tools use.
    pub fn forward_embeds(
        &self,
        token_embeds: &Tensor,
        input_ids: &Tensor,
        clip_skip: usize,
    ) -> Result<ClipTextOutput> {
        let (_b, s, _d) = token_embeds.dims3()?;
        if s > self.config.max_position_embeddings {
            bail!(
                "text encoder: sequence of {s} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        if clip_skip >= self.layers.len() {
            bail!(
                "clip skip {clip_skip} must be smaller than the {} text encoder layers",
                self.layers.len()
            )
        }
        let pos = self.position_embedding.narrow(0, 0, s)?;
        let mut h = token_embeds.broadcast_add(&pos)?;
        let mask = causal_mask(s, self.device())?;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            h = layer.forward(&h, Some(&mask))?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        let pooler_output = self.pool(&last_hidden_state, input_ids)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
        })
    }

    /// transformers' pooling: with the legacy `eos_token_id == 2` (SD 1.x/2.x configs) the position
    /// of the largest id (argmax, first on ties); otherwise the first position holding `eos_token_id`.
    pub fn pool(&self, hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_vec2()?;
        let eos = self.config.eos_token_id as i64;
        let mut rows = Vec::with_capacity(ids.len());
        for (i, row) in ids.iter().enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&v| v == max).unwrap_or(0)
            } else {
                row.iter().position(|&v| v == eos).unwrap_or(0)
            };
            rows.push(hidden.get(i)?.get(pos)?);
        }
        Ok(Tensor::stack(&rows, 0)?)
    }
}

impl VisitProjections for ClipAttention {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for l in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.out_proj,
        ] {
            f(Projection::Linear(l));
        }
    }
}

impl VisitProjections for ClipEncoderLayer {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        self.self_attn.visit_projections(f);
        f(Projection::Linear(&mut self.fc1));
        f(Projection::Linear(&mut self.fc2));
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        f(Norm::Layer(&mut self.layer_norm1));
        f(Norm::Layer(&mut self.layer_norm2));
    }
}

/// Every projection of the text model, named `text_model.encoder.layers.N.self_attn.q_proj`,
/// `….mlp.fc1` and so on.
impl VisitProjections for ClipTextTransformer {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        self.layers.visit_projections(f);
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        self.layers.visit_norms(f);
        f(Norm::Layer(&mut self.final_layer_norm));
    }
}

/// `[S, S]` additive mask: 0 on and below the diagonal, −inf above.
fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(v, (s, s), dev)?)
}
