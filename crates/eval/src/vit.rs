//! `transformers.ViTModel` (DINO's backbone): the CLS token's state after the final layer norm is
//! the DINO metric's image feature.
//!
//! Follows transformers' `models/vit/modeling_vit.py`: a stride-`p` patch convolution with bias, a
//! CLS token prepended, learned position embeddings (no interpolation: images are preprocessed to
//! the configured size), pre-norm layers (`layernorm_before` → self-attention → residual,
//! `layernorm_after` → intermediate → output → residual) and the final `layernorm`.

use crate::preprocess::ImageProcessor;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_models::clip::Activation;
use imprint_models::clip_vision::patchify;
use imprint_models::loading::{read_json, weight_files, SafetensorsReader};
use imprint_ops::{scaled_dot_product_attention, LayerNorm, Linear};
use serde::Deserialize;
use std::path::Path;

/// `config.json` of a `ViTModel` folder (the fields that change the math).
#[derive(Clone, Debug, Deserialize)]
pub struct ViTConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

struct ViTLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    layernorm_before: LayerNorm,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    out: Linear,
    heads: usize,
    activation: Activation,
}

impl ViTLayer {
    fn new(vb: VarBuilder, cfg: &ViTConfig, activation: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("attention");
        let sa = attn.pp("attention");
        Ok(Self {
            query: Linear::new(sa.pp("query"), d, d, cfg.qkv_bias)?,
            key: Linear::new(sa.pp("key"), d, d, cfg.qkv_bias)?,
            value: Linear::new(sa.pp("value"), d, d, cfg.qkv_bias)?,
            output: Linear::new(attn.pp("output.dense"), d, d, true)?,
            layernorm_before: LayerNorm::new(vb.pp("layernorm_before"), d, cfg.layer_norm_eps)?,
            layernorm_after: LayerNorm::new(vb.pp("layernorm_after"), d, cfg.layer_norm_eps)?,
            intermediate: Linear::new(vb.pp("intermediate.dense"), d, cfg.intermediate_size, true)?,
            out: Linear::new(vb.pp("output.dense"), cfg.intermediate_size, d, true)?,
            heads: cfg.num_attention_heads,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let hd = d / self.heads;
        let n = self.layernorm_before.forward(x)?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, hd))?
                .transpose(1, 2)?
                .reshape((b * self.heads, s, hd))
        };
        let q = split(self.query.forward(&n)?)?;
        let k = split(self.key.forward(&n)?)?;
        let v = split(self.value.forward(&n)?)?;
        let o = scaled_dot_product_attention(&q, &k, &v, (hd as f64).powf(-0.5), None)?
            .reshape((b, self.heads, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, d))?;
        let h = (x + self.output.forward(&o)?)?;
        let m = self.out.forward(
            &self.activation.forward(
                &self
                    .intermediate
                    .forward(&self.layernorm_after.forward(&h)?)?,
            )?,
        )?;
        Ok((h + m)?)
    }
}

/// `ViTModel` without its pooler (DINO reads the CLS token, not the pooled tanh projection).
pub struct ViTModel {
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// `[D, C·p·p]` and `[D]`: the patch convolution, flattened.
    patch_weight: Tensor,
    patch_bias: Tensor,
    layers: Vec<ViTLayer>,
    layernorm: LayerNorm,
    pub config: ViTConfig,
    pub processor: Option<ImageProcessor>,
}

impl ViTModel {
    /// `vb` at the model's root (a `ViTForImageClassification`'s `vit.` prefix is followed).
    pub fn new(vb: VarBuilder, cfg: &ViTConfig) -> Result<Self> {
        let what = "config.json";
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
            bail!(
                "{what}: image_size {} is not a multiple of patch_size {}",
                cfg.image_size,
                cfg.patch_size
            )
        }
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!(
                "{what}: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        let vb = if !vb.contains_tensor("embeddings.cls_token")
            && vb.contains_tensor("vit.embeddings.cls_token")
        {
            vb.pp("vit")
        } else {
            vb
        };
        let activation = Activation::parse_in(&cfg.hidden_act, what)?;
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let n = (cfg.image_size / p).pow(2);
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings.projection");
        Ok(Self {
            cls_token: emb.get((1, 1, d), "cls_token")?,
            position_embeddings: emb.get((1, n + 1, d), "position_embeddings")?,
            patch_weight: proj
                .get((d, cfg.num_channels, p, p), "weight")?
                .reshape((d, cfg.num_channels * p * p))?,
            patch_bias: proj.get(d, "bias")?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ViTLayer::new(vb.pp("encoder.layer").pp(i), cfg, activation))
                .collect::<Result<Vec<_>>>()?,
            layernorm: LayerNorm::new(vb.pp("layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
            processor: None,
        })
    }

    /// Loads a transformers `ViTModel` folder (`config.json`, `model.safetensors` and
    /// `preprocessor_config.json`, which the metric needs to preprocess as the reference).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let ctx = || format!("{}: not a usable ViTModel folder", dir.display());
        let cfg: ViTConfig = read_json(&dir.join("config.json")).with_context(ctx)?;
        let files = weight_files(dir, "model").with_context(ctx)?;
        let reader = SafetensorsReader::open(&files).with_context(ctx)?;
        let vb = VarBuilder::from_backend(Box::new(reader), DType::F32, device.clone());
        let mut model = Self::new(vb, &cfg).with_context(ctx)?;
        let pp = dir.join("preprocessor_config.json");
        model.processor = Some(ImageProcessor::load(&pp)?);
        Ok(model)
    }

    /// `last_hidden_state [B, 1 + patches, D]` of preprocessed `pixel_values [B, C, S, S]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if c != self.config.num_channels || h != s || w != s {
            bail!(
                "ViT: pixel values of shape {:?}, expected [B, {}, {s}, {s}]",
                pixel_values.dims(),
                self.config.num_channels
            )
        }
        let d = self.config.hidden_size;
        let patches = patchify(pixel_values, self.config.patch_size)?
            .broadcast_matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.layernorm.forward(&x)?)
    }

    /// The CLS token's final-layer-normed state `[B, D]`: DINO's image feature.
    pub fn cls_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward(pixel_values)?.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
