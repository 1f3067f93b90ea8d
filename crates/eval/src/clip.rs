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
use imprint_models::clip::{ClipTextConfig, ClipTextTransformer};
use imprint_models::loading::{read_json, weight_files, SafetensorsReader};
use imprint_models::tokenizer::ClipTokenizer;
use imprint_ops::Linear;
use serde::Deserialize;
use std::path::Path;

use imprint_models::clip_vision::{ClipVisionConfig, ClipVisionTransformer};
use imprint_models::image_processor::ImageProcessor;

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

    /// The text projection of pooled text states `[B, hidden]` (for callers that pool token
    /// embeddings of their own, such as ITI-GEN's learned tokens).
    pub fn project_text(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(self.text_projection.forward(pooled)?)
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
