//! `transformers.CLIPModel`: the text and vision towers and their projections into the shared
//! embedding space, as CLIP-I and CLIP-T use them.
//!
//! Follows transformers' `models/clip/modeling_clip.py`. The vision tower: a patch embedding (a
//! stride-`p` convolution without bias), a class embedding prepended, position embeddings, the
//! `pre_layrnorm` (sic), the same pre-norm layers as the text tower without a mask, and the class
//! token's state through `post_layernorm` as the pooled output. `get_image_features` projects the
//! pooled output with `visual_projection`, `get_text_features` the text tower's pooled output with
//! `text_projection` (neither normalizes; the metrics do).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_models::clip::{Activation, ClipEncoderLayer, ClipTextConfig, ClipTextTransformer};
use imprint_models::loading::{read_json, weight_files, SafetensorsReader};
use imprint_models::tokenizer::ClipTokenizer;
use imprint_ops::{LayerNorm, Linear};
use serde::Deserialize;
use std::path::Path;

use crate::preprocess::ImageProcessor;

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
fn default_projection_dim() -> usize {
    512
}

/// `config.json` of a `CLIPModel` folder.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
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
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        Ok(self
            .post_layernorm
            .forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?)
    }
}

/// A `CLIPModel` folder: both towers, their projections, the tokenizer and the image processor.
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    pub tokenizer: ClipTokenizer,
    pub processor: ImageProcessor,
    pub config: ClipConfig,
}

impl ClipModel {
    /// Builds the towers from `vb` (the folder's weights at the root).
    pub fn new(
        vb: VarBuilder,
        cfg: &ClipConfig,
        tokenizer: ClipTokenizer,
        processor: ImageProcessor,
    ) -> Result<Self> {
        let text_model = ClipTextTransformer::new(vb.clone(), &cfg.text_config)?;
        let vision_model = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision_config)?;
        let visual_projection = Linear::new(
            vb.pp("visual_projection"),
            cfg.vision_config.hidden_size,
            cfg.projection_dim,
            false,
        )?;
        let text_projection = Linear::new(
            vb.pp("text_projection"),
            cfg.text_config.hidden_size,
            cfg.projection_dim,
            false,
        )?;
        Ok(Self {
            text_model,
            vision_model,
            visual_projection,
            text_projection,
            tokenizer,
            processor,
            config: cfg.clone(),
        })
    }

    /// Loads a transformers `CLIPModel` folder (`config.json`, `model.safetensors`, the tokenizer's
    /// `vocab.json` + `merges.txt` or `tokenizer.json`, `preprocessor_config.json`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let ctx = || format!("{}: not a usable CLIPModel folder", dir.display());
        let cfg: ClipConfig = read_json(&dir.join("config.json")).with_context(ctx)?;
        let files = weight_files(dir, "model").with_context(ctx)?;
        let reader = SafetensorsReader::open(&files).with_context(ctx)?;
        let vb = VarBuilder::from_backend(Box::new(reader), DType::F32, device.clone());
        let tokenizer = ClipTokenizer::from_dir(dir).with_context(ctx)?;
        let processor = ImageProcessor::load(&dir.join("preprocessor_config.json"))?;
        Self::new(vb, &cfg, tokenizer, processor).with_context(ctx)
    }

    /// `get_image_features`: projected pooled image states `[B, projection_dim]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pooled = self.vision_model.forward(pixel_values)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// `get_text_features` of token ids `[B, 77]`.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let out = self.text_model.forward(input_ids, 0)?;
        Ok(self.text_projection.forward(&out.pooler_output)?)
    }

    /// Tokenizes `prompts` as the reference tokenizer does (padded to the maximum length,
    /// truncated) and returns their text features. A prompt over the length limit is refused
    /// rather than silently cut, since the metric would then score another text.
    pub fn prompt_features(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::new();
        for p in prompts {
            let n = self.tokenizer.encode_unpadded(p)?.len();
            let max = self.tokenizer.model_max_length();
            if n > max {
                bail!("prompt '{p}' is {n} tokens long with its start and end tokens; CLIP reads at most {max}")
            }
            let toks = self.tokenizer.encode(p)?;
            ids.push(Tensor::new(
                toks.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                self.text_model.device(),
            )?);
        }
        let ids = Tensor::stack(&ids, 0)?;
        self.text_features(&ids)
    }
}
