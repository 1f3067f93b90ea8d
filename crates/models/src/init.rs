//! `imprint model init`: a complete diffusers folder with random weights in a real architecture.
//!
//! The networks are built through a [`VarBuilder`] whose backend invents each weight as it is asked
//! for (seeded by the weight's name), so the architecture code itself defines every name and shape:
//! there is no separate weight table to keep in sync. Tests, examples and benchmarks use these
//! folders; since speed does not depend on weight values, `sd15` times like the real SD 1.5.

use crate::clip::{ClipTextConfig, ClipTextTransformer};
use crate::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::vae::{AutoencoderKL, AutoencoderKLConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The architectures `model init --config` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnownConfig {
    /// A few-MB SD 1.x-style model (epsilon, conv projections, `<|endoftext|>` padding).
    Tiny,
    /// A tiny SD 2.x-style model (v-prediction, linear projections, per-block heads, gelu, `!` padding).
    TinySd2,
    /// The Stable Diffusion 1.5 architecture.
    Sd15,
    /// The Stable Diffusion 2.1 (768-v) architecture.
    Sd21,
}

impl std::str::FromStr for KnownConfig {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "tiny" => Self::Tiny,
            "tiny-sd2" => Self::TinySd2,
            "sd15" => Self::Sd15,
            "sd21" => Self::Sd21,
            other => bail!("unknown config '{other}' (expected tiny, tiny-sd2, sd15 or sd21)"),
        })
    }
}

/// The config.json files of one architecture.
pub struct FolderConfigs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    pub scheduler: Value,
    pub pad_token: &'static str,
}

fn text_encoder_json(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    act: &str,
    proj: usize,
) -> Value {
    json!({
        "_name_or_path": "imprint-random", "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0,
        "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": inter, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "num_attention_heads": heads, "num_hidden_layers": layers, "projection_dim": proj,
        "torch_dtype": "float32", "vocab_size": 49408
    })
}

fn vae_json(boc: &[usize], layers: usize, groups: usize, sample: usize) -> Value {
    json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
        "block_out_channels": boc, "down_block_types": vec!["DownEncoderBlock2D"; boc.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; boc.len()], "in_channels": 3, "out_channels": 3,
        "latent_channels": 4, "layers_per_block": layers, "norm_num_groups": groups, "sample_size": sample,
        "scaling_factor": 0.18215
    })
}

fn scheduler_json(prediction: &str) -> Value {
    json!({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
        "num_train_timesteps": 1000, "prediction_type": prediction, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null
    })
}

impl KnownConfig {
    pub fn configs(&self) -> FolderConfigs {
        match self {
            KnownConfig::Tiny => FolderConfigs {
                unet: json!({
                    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
                    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 4,
                    "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 8,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0,
                    "act_fn": "silu", "norm_eps": 1e-05, "downsample_padding": 1, "mid_block_scale_factor": 1
                }),
                vae: vae_json(&[16, 16, 32, 32], 1, 8, 64),
                text_encoder: text_encoder_json(32, 64, 2, 4, "quick_gelu", 32),
                scheduler: scheduler_json("epsilon"),
                pad_token: "<|endoftext|>",
            },
            KnownConfig::TinySd2 => FolderConfigs {
                unet: json!({
                    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
                    "block_out_channels": [32, 64, 64], "layers_per_block": [1, 2, 1], "attention_head_dim": [2, 4, 4],
                    "cross_attention_dim": 48, "norm_num_groups": 8, "sample_size": 8,
                    "use_linear_projection": true, "upcast_attention": true,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0,
                    "act_fn": "silu", "norm_eps": 1e-05, "downsample_padding": 1, "mid_block_scale_factor": 1
                }),
                vae: vae_json(&[16, 32, 32, 32], 1, 8, 64),
                text_encoder: text_encoder_json(48, 96, 3, 4, "gelu", 32),
                scheduler: scheduler_json("v_prediction"),
                pad_token: "!",
            },
            KnownConfig::Sd15 => FolderConfigs {
                unet: json!({
                    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
                    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
                    "cross_attention_dim": 768,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
                    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                }),
                vae: vae_json(&[128, 256, 512, 512], 2, 32, 512),
                text_encoder: text_encoder_json(768, 3072, 12, 12, "quick_gelu", 768),
                scheduler: scheduler_json("epsilon"),
                pad_token: "<|endoftext|>",
            },
            KnownConfig::Sd21 => FolderConfigs {
                unet: json!({
                    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
                    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
                    "center_input_sample": false, "cross_attention_dim": 1024,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
                    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
                    "norm_num_groups": 32, "out_channels": 4, "sample_size": 96, "upcast_attention": true,
                    "use_linear_projection": true,
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                }),
                vae: vae_json(&[128, 256, 512, 512], 2, 32, 768),
                text_encoder: text_encoder_json(1024, 4096, 23, 16, "gelu", 512),
                scheduler: scheduler_json("v_prediction"),
                pad_token: "!",
            },
        }
    }
}

/// Invents each weight on request and remembers it, for saving.
struct RandomBackend {
    seed: u64,
    made: Arc<Mutex<HashMap<String, Tensor>>>,
}

/// FNV-1a: a stable hash of the weight name (std's hasher may change between Rust versions).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl RandomBackend {
    fn invent(&self, shape: &Shape, name: &str) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name));
        let n = shape.elem_count();
        let dims = shape.dims();
        let leaf = name.rsplit('.').next().unwrap_or("");
        let is_norm = name.contains("norm") || name.contains("layer_norm");
        let uniform = |rng: &mut rand_chacha::ChaCha8Rng, scale: f32| -> f32 {
            rng.gen_range(-1.0f32..1.0) * scale
        };
        if leaf == "bias" {
            (0..n).map(|_| uniform(&mut rng, 0.1)).collect()
        } else if is_norm && dims.len() == 1 {
            (0..n).map(|_| 1.0 + uniform(&mut rng, 0.1)).collect()
        } else if name.contains("embedding") {
            (0..n).map(|_| uniform(&mut rng, 0.5)).collect()
        } else {
            // Variance-preserving: U(−a, a) with a = √3 / √fan_in.
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let a = (3.0 / fan_in as f32).sqrt();
            (0..n).map(|_| uniform(&mut rng, a)).collect()
        }
    }
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self
            .made
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!("{name}: requested as {s:?} and as {:?}", t.shape())
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = Tensor::from_vec(self.invent(&s, name), s, &Device::Cpu)?;
        made.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init: {name} requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.made
            .lock()
            .map(|m| m.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` whose weights are freshly invented (as `model init` invents them) and trainable:
/// the start of a network trained from scratch (the toy world's models). Each weight is recorded
/// with its name.
pub fn random_trainable_var_builder(
    seed: u64,
    device: &Device,
) -> (VarBuilder<'static>, crate::loading::TrainableVars) {
    let vars: crate::loading::TrainableVars = Arc::new(Mutex::new(Vec::new()));
    let backend: Box<dyn SimpleBackend> = Box::new(RandomVarBackend {
        random: RandomBackend {
            seed,
            made: Arc::new(Mutex::new(HashMap::new())),
        },
        vars: vars.clone(),
    });
    (
        VarBuilder::from_backend(backend, DType::F32, device.clone()),
        vars,
    )
}

/// [`RandomBackend`] whose weights are trainable variables (one per name, shared on reuse).
struct RandomVarBackend {
    random: RandomBackend,
    vars: crate::loading::TrainableVars,
}

impl SimpleBackend for RandomVarBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let existing = self
            .vars
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor().clone());
        if let Some(v) = existing {
            if v.shape() != &s {
                candle_core::bail!("{name}: requested as {s:?} and as {:?}", v.shape())
            }
            return Ok(v);
        }
        let t = self.random.get(s, name, h, dtype, dev)?;
        crate::loading::record_var(&self.vars, name, &t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.random.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.random.contains_tensor(name)
    }
}

/// Builds a network through a random backend and writes its weights to `path` (atomically).
fn write_random<F>(path: &Path, seed: u64, build: F) -> Result<()>
where
    F: FnOnce(VarBuilder<'static>) -> Result<()>,
{
    let made = Arc::new(Mutex::new(HashMap::new()));
    let backend: Box<dyn SimpleBackend> = Box::new(RandomBackend {
        seed,
        made: made.clone(),
    });
    build(VarBuilder::from_backend(backend, DType::F32, Device::Cpu))?;
    let tensors = made
        .lock()
        .map_err(|_| anyhow::anyhow!("random init: poisoned lock"))?
        .clone();
    crate::io::save_safetensors_atomic(path, &tensors, None)
}

/// Writes a complete random-weight diffusers folder for `config` into `out` (created if missing;
/// an existing model folder is refused rather than overwritten).
pub fn write_random_model(config: KnownConfig, out: &Path, seed: u64) -> Result<()> {
    if out.join("model_index.json").exists() {
        bail!(
            "{}: a model folder already exists here; choose another --out",
            out.display()
        )
    }
    let c = config.configs();
    let write_json = |rel: &str, v: &Value| -> Result<()> {
        let p = out.join(rel);
        std::fs::create_dir_all(p.parent().unwrap())
            .with_context(|| format!("{}: cannot create", p.display()))?;
        crate::io::write_atomic(&p, serde_json::to_string_pretty(v)?.as_bytes())
    };
    write_json("unet/config.json", &c.unet)?;
    write_json("vae/config.json", &c.vae)?;
    write_json("text_encoder/config.json", &c.text_encoder)?;
    write_json("scheduler/scheduler_config.json", &c.scheduler)?;
    crate::tokenizer::write_clip_tokenizer(&out.join("tokenizer"), c.pad_token)?;

    let unet_cfg: UNet2DConditionConfig = serde_json::from_value(c.unet.clone())?;
    write_random(
        &out.join("unet/diffusion_pytorch_model.safetensors"),
        seed,
        |vb| UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ()),
    )?;
    let vae_cfg: AutoencoderKLConfig = serde_json::from_value(c.vae.clone())?;
    write_random(
        &out.join("vae/diffusion_pytorch_model.safetensors"),
        seed.wrapping_add(1),
        |vb| AutoencoderKL::new(vb, &vae_cfg).map(|_| ()),
    )?;
    let te_cfg: ClipTextConfig = serde_json::from_value(c.text_encoder.clone())?;
    write_random(
        &out.join("text_encoder/model.safetensors"),
        seed.wrapping_add(2),
        |vb| ClipTextTransformer::new(vb, &te_cfg).map(|_| ()),
    )?;
    // Last, so a folder with model_index.json is always complete.
    write_json(
        "model_index.json",
        &json!({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null], "image_encoder": [null, null], "requires_safety_checker": false,
            "safety_checker": [null, null], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    Ok(())
}
