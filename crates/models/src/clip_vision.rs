//! CLIP's vision tower (`transformers.CLIPVisionModel` / `CLIPVisionModelWithProjection`): the
//! image side of CLIP-I and the image encoder of IP-Adapter.
//!
//! Follows transformers' `models/clip/modeling_clip.py`: a patch embedding (a stride-`p`
//! convolution without bias), a class embedding prepended, position embeddings, the
//! `pre_layrnorm` (sic), the text tower's pre-norm layers without a mask, and the class token's
//! state through `post_layernorm` as the pooled output; `visual_projection` maps it to
//! `image_embeds`.

use crate::clip::{Activation, ClipEncoderLayer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{LayerNorm, Linear};
use serde::Deserialize;
use std::path::Path;

/// `vision_config` of a `CLIPConfig` (the fields that change the math).
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_channels() -> usize {
    3
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
/// Splits `[B, C, H, W]` into `[B, (H/p)·(W/p), C·p·p]` patches, row-major over the patch grid and
/// `(c, y, x)` within a patch: the order of a stride-`p` convolution weight `[D, C, p, p]`
/// flattened, so the patch embedding is one matmul (and trains as one).
pub fn patchify(x: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / p, p, w / p, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / p) * (w / p), c * p * p))
}

/// `vision_model` of `CLIPModel` (`CLIPVisionTransformer`).
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    /// `[D, C·p·p]`: the patch convolution's weight, flattened.
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `vb` at `vision_model`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let what = "config.json vision_config";
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
            bail!(
                "{what}: image_size {} is not a multiple of patch_size {}",
                cfg.image_size,
                cfg.patch_size
            )
        }
        let activation = Activation::parse_in(&cfg.hidden_act, what)?;
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let patches = (cfg.image_size / p).pow(2);
        let emb = vb.pp("embeddings");
        let class_embedding = emb.get(d, "class_embedding")?;
        let patch_embedding = emb
            .pp("patch_embedding")
            .get((d, cfg.num_channels, p, p), "weight")?
            .reshape((d, cfg.num_channels * p * p))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((patches + 1, d), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(
                    vb.pp("encoder.layers").pp(i),
                    d,
                    cfg.intermediate_size,
                    cfg.num_attention_heads,
                    cfg.layer_norm_eps,
                    activation,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// `pixel_values [B, C, S, S]` (preprocessed) → the pooled output `[B, D]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(pixel_values)?.pooled)
    }

    /// The pooled output and every layer's hidden states.
    pub fn forward_all(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if c != self.config.num_channels || h != s || w != s {
            bail!(
                "CLIP vision tower: pixel values of shape {:?}, expected [B, {}, {s}, {s}]",
                pixel_values.dims(),
                self.config.num_channels
            )
        }
        let d = self.config.hidden_size;
        let patches = patchify(pixel_values, self.config.patch_size)?
            .broadcast_matmul(&self.patch_embedding.t()?)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .to_dtype(patches.dtype())?;
        let mut h = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        h = self.pre_layrnorm.forward(&h)?;
        let mut hidden_states = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
            hidden_states.push(h.clone());
        }
        let pooled = self
            .post_layernorm
            .forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(ClipVisionOutput {
            pooled,
            hidden_states,
        })
    }
}

/// The outputs of the vision tower.
pub struct ClipVisionOutput {
    /// `[B, D]`: the class token through `post_layernorm`.
    pub pooled: Tensor,
    /// The input to each layer and the last layer's output (`hidden_states` of transformers,
    /// `num_hidden_layers + 1` entries, before `post_layernorm`).
    pub hidden_states: Vec<Tensor>,
}

/// `transformers.CLIPVisionModelWithProjection` (an IP-Adapter `image_encoder/` folder).
pub struct ClipVisionModelWithProjection {
    pub vision_model: ClipVisionTransformer,
    pub visual_projection: Linear,
    pub projection_dim: usize,
}

/// `config.json` of a `CLIPVisionModelWithProjection` folder: the vision config at the top level.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionWithProjectionConfig {
    #[serde(flatten)]
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipVisionModelWithProjection {
    pub fn new(vb: VarBuilder, cfg: &ClipVisionWithProjectionConfig) -> Result<Self> {
        Ok(Self {
            vision_model: ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision)?,
            visual_projection: Linear::new(
                vb.pp("visual_projection"),
                cfg.vision.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            projection_dim: cfg.projection_dim,
        })
    }

    /// Loads an `image_encoder/` folder (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let ctx = || {
            format!(
                "{}: not a usable CLIPVisionModelWithProjection folder",
                dir.display()
            )
        };
        let cfg: ClipVisionWithProjectionConfig =
            crate::loading::read_json(&dir.join("config.json")).with_context(ctx)?;
        let files = crate::loading::weight_files(dir, "model").with_context(ctx)?;
        let reader = crate::loading::SafetensorsReader::open(&files).with_context(ctx)?;
        let vb = VarBuilder::from_backend(Box::new(reader), dtype, device.clone());
        Self::new(vb, &cfg).with_context(ctx)
    }

    /// `image_embeds [B, projection_dim]` and the tower's outputs.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<(Tensor, ClipVisionOutput)> {
        let out = self.vision_model.forward_all(pixel_values)?;
        Ok((self.visual_projection.forward(&out.pooled)?, out))
    }
}
