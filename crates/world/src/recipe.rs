//! `imprint world train`: the recipe that makes the world's base model and its evaluators from
//! nothing but the renderer, in four phases:
//!
//! 1. **vae** — an `AutoencoderKL` with 4× downsampling (64 px → 16×16×4 latents), trained on
//!    reconstruction (L1 + MSE) with a small KL term, as the latent-diffusion autoencoder (Rombach et al.
//!    2022) without its perceptual and adversarial terms, which flat-coloured scenes do not need.
//!    Its `scaling_factor` is then set to 1/std of the latents, as SD's 0.18215 was chosen.
//! 2. **clip** — a `CLIPModel` (text and vision towers) trained contrastively on (scene, caption)
//!    pairs with CLIP's symmetric cross-entropy and learned temperature (Radford et al. 2021). Its
//!    text tower becomes the diffusion model's text encoder, as SD uses CLIP's.
//! 3. **unet** — a `UNet2DConditionModel` trained on the frozen VAE's latents given the frozen
//!    text encoder's states, with 10 % of captions dropped for classifier-free guidance (Ho &
//!    Salimans 2022), in two stages, as SD 2's v-models were made from ε ones: ε-prediction on
//!    SD's own schedule (`unet-eps`), then v-prediction (Salimans & Ho 2022) on that schedule
//!    rescaled to zero terminal SNR, sampled with trailing timesteps (Lin et al. 2024, "Common
//!    Diffusion Noise Schedules and Sample Steps are Flawed"), from the ε weights with a fresh
//!    optimizer (`unet-v`). With SD's own schedule alone (ᾱ_999 ≈ 0.0047) the noisiest training
//!    inputs still carry ~7 % of the image, and the world's flat backgrounds leak through it: the
//!    ε model learnt to take its scene's colours from that leak rather than from the caption,
//!    and from pure noise it drew murky backgrounds whatever the caption said (`imprint world
//!    follow` measured background colour 0.20 against 0.12 for a model ignoring its caption). At
//!    zero terminal SNR the noisiest inputs carry nothing, so the layout must come from the text.
//!    The ε stage is kept because it measurably helps: the same 5000 v steps from random weights
//!    gave a model that follows captions about as well but that Textual Inversion could not
//!    personalize (world bench, concept 0: TI DINO 0.399 against 0.402 for the bare class word;
//!    from the two-stage model 0.451 against 0.345).
//! 4. **dino** — a `ViTModel` trained to name the main object's shape, colour, pattern and
//!    pattern colour from its CLS token (heads discarded), so its CLS features separate object
//!    identities regardless of background, position and size, the property DINO's features have
//!    on real photos that the DINO metric relies on.
//!
//! Each phase checkpoints its weights and optimizer state every `save_every` steps under
//! `OUT/.checkpoints/` and is skipped once its output exists, so an interrupted run resumes
//! where it stopped. Data is drawn per step from seeded streams, so a resumed run sees the same
//! batches. Losses and times go to `OUT/train-log.jsonl`.

use crate::scene::{sample_scene_seeded, Color, Pattern, Shape};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

use image::RgbImage;
use imprint_eval::{ClipConfig, ClipModel, ImageProcessor, ViTConfig, ViTModel};
use imprint_models::clip::ClipTextTransformer;
use imprint_models::init::random_trainable_var_builder;
use imprint_models::io::{save_safetensors_atomic, write_atomic};
use imprint_models::loading::{take_vars, ModelFolder};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::schedulers::SchedulerConfig;
use imprint_models::tokenizer::{
    pruned_clip_vocab_and_merges, write_clip_tokenizer_with, ClipTokenizer,
};
use imprint_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use imprint_models::vae::{AutoencoderKL, AutoencoderKLConfig};
use imprint_models::TextConditioning;
use imprint_train::optim::{AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Image size of the world.
pub const IMAGE_SIZE: usize = 64;
/// Width of the text encoder (and the UNet's cross-attention).
const TEXT_WIDTH: usize = 64;
/// Seed streams of the phases' data, so the phases never see the same scenes.
const STREAM_VAE: u64 = 1;
const STREAM_CLIP: u64 = 2;
const STREAM_UNET: u64 = 3;
const STREAM_DINO: u64 = 4;
/// The UNet's v stage draws its own scenes, not a replay of the ε stage's.
const STREAM_UNET_V: u64 = 5;

/// Steps, batch sizes and learning rates of each phase. `world train --recipe FILE` reads a JSON
/// object of the fields to change; the run writes the whole recipe to `OUT/recipe.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub seed: u64,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    /// Weight of the pixels that objects cover in the VAE's reconstruction loss (1 = every pixel
    /// alike). Objects cover a few percent of a scene, so an unweighted loss is met by a VAE
    /// that draws backgrounds exactly and smears objects into blobs (`world follow`'s
    /// "through the VAE" column measures what it keeps).
    pub vae_object_weight: f64,
    pub clip_steps: usize,
    pub clip_batch: usize,
    pub clip_lr: f64,
    /// The UNet's first stage: ε-prediction on SD's own schedule.
    pub unet_eps_steps: usize,
    /// The UNet's second stage: v-prediction at zero terminal SNR, from the first stage's
    /// weights with a fresh optimizer.
    pub unet_steps: usize,
    pub unet_batch: usize,
    pub unet_lr: f64,
    /// Weight of the latent pixels that objects cover in the UNet's loss (1 = all alike); see
    /// `vae_object_weight`.
    pub unet_object_weight: f64,
    /// Start the UNet from these weights (a diffusers `unet` folder or its safetensors file)
    /// instead of random ones: a world model fine-tuned further (set `unet_eps_steps` to 0 to
    /// run only the v stage).
    pub unet_init: Option<PathBuf>,
    /// The UNet's width per resolution (16², 8², 4² latents; `block_out_channels`), each a
    /// multiple of 16 (its group norm's groups).
    pub unet_channels: Vec<usize>,
    /// Resnets (and transformers) per down block (`layers_per_block`; up blocks have one more).
    pub unet_layers_per_block: usize,
    pub dino_steps: usize,
    pub dino_batch: usize,
    pub dino_lr: f64,
    pub save_every: usize,
}

impl Default for Recipe {
    /// The recipe of `examples/world/`. Its VAE, CLIP and ViT are this recipe's output at seed 0;
    /// its UNet was made by these stages with two more restarts (its `train-log.jsonl` holds all
    /// of them): the ε stage as 2000 steps and 3000 more with Adam and the learning-rate schedule
    /// restarted (phase `unet`) and 500 further ε steps (`unet-eps-continued`), then this
    /// recipe's 6000 v steps (`unet-v`). So a fresh run reproduces it in distribution, not bit
    /// for bit.
    fn default() -> Self {
        Self {
            seed: 0,
            vae_steps: 1500,
            vae_batch: 8,
            vae_lr: 2e-3,
            vae_object_weight: 1.0,
            clip_steps: 600,
            clip_batch: 64,
            clip_lr: 5e-4,
            unet_eps_steps: 5000,
            unet_steps: 6000,
            unet_batch: 16,
            unet_lr: 3e-4,
            unet_object_weight: 1.0,
            unet_init: None,
            unet_channels: vec![32, 64, 128],
            unet_layers_per_block: 1,
            dino_steps: 400,
            dino_batch: 64,
            dino_lr: 5e-4,
            save_every: 250,
        }
    }
}

impl Recipe {
    /// Refuses a recipe that cannot make a sound world, before anything is trained or written.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vae_batch", self.vae_batch),
            ("clip_batch", self.clip_batch),
            ("unet_batch", self.unet_batch),
            ("dino_batch", self.dino_batch),
            ("save_every", self.save_every),
            // The scheduler the model ships with is the v stage's: it must run.
            ("unet_steps", self.unet_steps),
        ] {
            if v == 0 {
                bail!("recipe: {name} must be at least 1")
            }
        }
        for (name, w) in [
            ("vae_object_weight", self.vae_object_weight),
            ("unet_object_weight", self.unet_object_weight),
        ] {
            // Below 1 the latent max-pool would pick the background's weight, not the objects'.
            if !(w.is_finite() && w >= 1.0) {
                bail!("recipe: {name} must be at least 1 (1 = every pixel alike), got {w}")
            }
        }
        for (name, lr) in [
            ("vae_lr", self.vae_lr),
            ("clip_lr", self.clip_lr),
            ("unet_lr", self.unet_lr),
            ("dino_lr", self.dino_lr),
        ] {
            if !(lr.is_finite() && lr >= 0.0) {
                bail!("recipe: {name} must be a finite, non-negative learning rate, got {lr}")
            }
        }
        if self.unet_channels.len() != 3
            || self.unet_channels.iter().any(|&c| c == 0 || c % 16 != 0)
        {
            bail!(
                "recipe: unet_channels must be three positive multiples of 16 (the 16², 8² and 4² levels), got {:?}",
                self.unet_channels
            )
        }
        if self.unet_layers_per_block == 0 {
            bail!("recipe: unet_layers_per_block must be at least 1")
        }
        if let Some(init) = &self.unet_init {
            imprint_models::loading::weight_files(
                &unet_weights_dir(init),
                "diffusion_pytorch_model",
            )
            .with_context(|| format!("recipe: unet_init {}", init.display()))?;
        }
        Ok(())
    }

    /// Every phase shortened to a handful of steps (tests of the recipe's plumbing).
    pub fn smoke() -> Self {
        Self {
            vae_steps: 2,
            vae_batch: 2,
            clip_steps: 2,
            clip_batch: 4,
            unet_eps_steps: 2,
            unet_steps: 2,
            unet_batch: 2,
            dino_steps: 2,
            dino_batch: 4,
            save_every: 1,
            ..Self::default()
        }
    }
}

/// Words of the world's captions and of the training templates: the text encoder's vocabulary is
/// CLIP's, cut down to what these need.
fn vocabulary_words() -> Vec<String> {
    let mut words: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut add = |text: &str| {
        for w in text
            .to_lowercase()
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words.insert(w.to_string());
        }
    };
    for i in 0..4000 {
        add(&sample_scene_seeded(12345, i).1);
    }
    for k in 0..crate::held_out::HELD_OUT.len() {
        for p in crate::held_out::editability_prompts(k) {
            add(&p.text("thing"));
        }
    }
    for s in Shape::ALL {
        add(s.word());
    }
    for c in Color::ALL {
        add(c.word());
    }
    add("a an the of on at in with and photo picture rendering image drawing painting style object \
         toy shape thing sks small big large medium cropped clean dark bright close up good nice \
         weird cool one this that my new");
    words.into_iter().collect()
}

fn text_config(vocab: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": vocab, "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64,
        "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1,
        "dtype": "float32"
    })
}

fn clip_config(vocab: usize) -> Value {
    json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 64,
        "logit_scale_init_value": 2.6592, "dtype": "float32",
        "text_config": text_config(vocab),
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32, "patch_size": 4,
            "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 64
        }
    })
}

fn clip_preprocessor() -> Value {
    json!({
        "image_processor_type": "CLIPImageProcessor", "do_resize": true,
        "size": {"shortest_edge": 32}, "resample": 3, "do_center_crop": true,
        "crop_size": {"height": 32, "width": 32}, "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": true
    })
}

fn dino_config() -> Value {
    json!({
        "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 32, "patch_size": 4,
        "num_channels": 3, "qkv_bias": true, "dtype": "float32"
    })
}

fn dino_preprocessor() -> Value {
    json!({
        "image_processor_type": "ViTImageProcessor", "do_resize": true,
        "size": {"height": 32, "width": 32}, "resample": 2, "do_rescale": true,
        "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": true
    })
}

fn vae_config(scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
        "act_fn": "silu", "block_out_channels": [16, 32, 64], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 8, "sample_size": IMAGE_SIZE, "scaling_factor": scaling_factor
    })
}

fn unet_config(r: &Recipe) -> Value {
    json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
        "block_out_channels": r.unet_channels, "layers_per_block": r.unet_layers_per_block, "attention_head_dim": 4,
        "cross_attention_dim": TEXT_WIDTH, "norm_num_groups": 16, "sample_size": IMAGE_SIZE / 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0,
        "act_fn": "silu", "norm_eps": 1e-05, "downsample_padding": 1, "mid_block_scale_factor": 1
    })
}

fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "clip_sample": false,
        "set_alpha_to_one": false, "steps_offset": 1, "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": true
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("{}: cannot create", p.display()))?;
    }
    write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// Pixels `[N, 3, 64, 64]` in [−1, 1].
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let n = images.len();
    let s = IMAGE_SIZE;
    let mut v = vec![0f32; n * 3 * s * s];
    for (i, img) in images.iter().enumerate() {
        if img.width() as usize != s || img.height() as usize != s {
            bail!(
                "world images are {s}×{s}, got {}×{}",
                img.width(),
                img.height()
            )
        }
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                v[((i * 3 + c) * s + y as usize) * s + x as usize] = p.0[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(v, (n, 3, s, s), device)?)
}

/// The scenes of one step of a phase: `(image, caption)` pairs drawn from the phase's stream.
fn scenes(seed: u64, stream: u64, step: usize, n: usize) -> Vec<(crate::scene::Scene, String)> {
    (0..n)
        .map(|i| {
            sample_scene_seeded(
                seed.wrapping_mul(31).wrapping_add(stream),
                (step * n + i) as u64,
            )
        })
        .collect()
}

/// Logs, checkpoints and progress of one phase.
struct Phase<'a> {
    name: &'static str,
    out: &'a Path,
    steps: usize,
    save_every: usize,
    bar: indicatif::ProgressBar,
    log: std::fs::File,
    started: Instant,
    /// Seconds the phase had run before this process resumed it (the log's clock continues).
    seconds_before: f64,
    objective: String,
}

impl<'a> Phase<'a> {
    fn new(
        name: &'static str,
        out: &'a Path,
        steps: usize,
        save_every: usize,
        index: usize,
    ) -> Result<Self> {
        Self::with_objective(name, out, steps, save_every, index, "")
    }

    /// A phase whose checkpoints record `objective` (what the weights are trained to predict), so
    /// a checkpoint made under another objective is refused instead of silently trained on.
    fn with_objective(
        name: &'static str,
        out: &'a Path,
        steps: usize,
        save_every: usize,
        index: usize,
        objective: &str,
    ) -> Result<Self> {
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
        )?);
        bar.set_prefix(format!("phase {index}/4 {name}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.join("train-log.jsonl"))?;
        Ok(Self {
            name,
            out,
            steps,
            save_every,
            bar,
            log,
            started: Instant::now(),
            seconds_before: 0.0,
            objective: objective.to_string(),
        })
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.out
            .join(".checkpoints")
            .join(format!("{}.safetensors", self.name))
    }

    /// Restores vars and optimizer moments from the phase's checkpoint; returns the next step.
    /// The log keeps the phase's entries up to that step only: the steps after the checkpoint
    /// are trained again, and their first, lost run must not appear twice.
    fn resume(&mut self, vars: &[(String, Var)], opt: &mut AdamW) -> Result<usize> {
        let step = self.restore(vars, opt)?;
        self.trim_log(step)?;
        Ok(step)
    }

    /// Rewrites the log without this phase's entries past `step`, and continues the phase's clock
    /// from its last kept entry.
    fn trim_log(&mut self, step: usize) -> Result<()> {
        let path = self.out.join("train-log.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: unreadable", path.display()))?;
        let mut kept = String::with_capacity(text.len());
        let mut dropped = 0usize;
        self.seconds_before = 0.0;
        for line in text.lines() {
            let entry: Option<serde_json::Value> = serde_json::from_str(line).ok();
            let ours = entry
                .as_ref()
                .filter(|e| e["phase"] == self.name)
                .and_then(|e| Some((e["step"].as_u64()? as usize, e["seconds"].as_f64()?)));
            match ours {
                Some((s, _)) if s > step => dropped += 1,
                Some((_, secs)) => {
                    self.seconds_before = self.seconds_before.max(secs);
                    kept.push_str(line);
                    kept.push('\n');
                }
                None => {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        if dropped > 0 {
            write_atomic(&path, kept.as_bytes())
                .with_context(|| format!("{}: cannot rewrite", path.display()))?;
            self.log = std::fs::OpenOptions::new().append(true).open(&path)?;
        }
        Ok(())
    }

    fn restore(&self, vars: &[(String, Var)], opt: &mut AdamW) -> Result<usize> {
        let path = self.checkpoint_path();
        if !path.exists() {
            return Ok(0);
        }
        let t = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("{}: unreadable checkpoint", path.display()))?;
        if !self.objective.is_empty() {
            let saved = match t.get("objective") {
                Some(o) => String::from_utf8_lossy(&o.to_vec1::<u8>()?).into_owned(),
                None => "unrecorded (an older recipe)".into(),
            };
            if saved != self.objective {
                bail!(
                    "{}: this checkpoint was trained for objective {saved}, the recipe trains {}; delete it to train the phase afresh",
                    path.display(),
                    self.objective
                )
            }
        }
        for (i, (name, var)) in vars.iter().enumerate() {
            let get = |k: &str| {
                t.get(k)
                    .with_context(|| format!("{}: lacks {k}", path.display()))
                    .and_then(|x| Ok(x.to_device(var.device())?))
            };
            var.set(&get(&format!("w.{name}"))?)?;
            opt.exp_avg[i] = get(&format!("m.{name}"))?;
            opt.exp_avg_sq[i] = get(&format!("v.{name}"))?;
        }
        let step = t
            .get("step")
            .context("checkpoint lacks step")?
            .to_scalar::<i64>()? as usize;
        // A checkpoint made from finished weights to train a phase further carries fresh moments
        // and `opt_step` 0, so Adam's bias correction starts over with them.
        opt.step = match t.get("opt_step") {
            Some(s) => s.to_scalar::<i64>()? as usize,
            None => step,
        };
        self.bar.set_position(step as u64);
        Ok(step)
    }

    fn save(&self, vars: &[(String, Var)], opt: &AdamW, step: usize) -> Result<()> {
        let mut t = HashMap::new();
        for (i, (name, var)) in vars.iter().enumerate() {
            t.insert(format!("w.{name}"), var.as_tensor().clone());
            t.insert(format!("m.{name}"), opt.exp_avg[i].clone());
            t.insert(format!("v.{name}"), opt.exp_avg_sq[i].clone());
        }
        t.insert("step".into(), Tensor::new(step as i64, &Device::Cpu)?);
        if !self.objective.is_empty() {
            t.insert(
                "objective".into(),
                Tensor::new(self.objective.as_bytes(), &Device::Cpu)?,
            );
        }
        let path = self.checkpoint_path();
        std::fs::create_dir_all(path.parent().unwrap())?;
        save_safetensors_atomic(&path, &t, None)
    }

    fn record(
        &mut self,
        step: usize,
        losses: &[(&str, f64)],
        vars: &[(String, Var)],
        opt: &AdamW,
    ) -> Result<()> {
        let mut entry = json!({"phase": self.name, "step": step + 1,
            "seconds": self.seconds_before + self.started.elapsed().as_secs_f64()});
        for (k, v) in losses {
            entry[*k] = json!(v);
        }
        writeln!(self.log, "{entry}")?;
        self.bar.set_position((step + 1) as u64);
        let msg = losses
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        self.bar.set_message(msg);
        if (step + 1) % self.save_every == 0 && step + 1 < self.steps {
            self.save(vars, opt, step + 1)?;
        }
        Ok(())
    }

    fn finish(&self) {
        self.bar.finish();
        let _ = std::fs::remove_file(self.checkpoint_path());
    }
}

/// Linear warm-up over the first 5 % of steps, then cosine decay to 10 %.
fn lr_at(base: f64, step: usize, steps: usize) -> f64 {
    let warm = (steps / 20).max(1);
    if step < warm {
        return base * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (steps - warm).max(1) as f64;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

fn optimizer(vars: &[(String, Var)], weight_decay: f64) -> Result<AdamW> {
    AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        AdamWConfig {
            weight_decay,
            ..AdamWConfig::default()
        },
    )
}

fn step_with(opt: &mut AdamW, vars: &[(String, Var)], loss: &Tensor, lr: f64) -> Result<()> {
    let grads = loss.backward()?;
    let mut gs = Vec::with_capacity(vars.len());
    for (_, v) in vars {
        // Detached: a gradient computed through trainable weights records its own graph, which
        // the optimizer's moments would otherwise keep alive (and every step's activations).
        gs.push(match grads.get(v.as_tensor()) {
            Some(g) => g.detach(),
            None => v.zeros_like()?,
        });
    }
    imprint_train::optim::clip_grad_norm(&mut gs, Some(1.0))?;
    opt.step(&gs, lr)
}

fn save_vars(
    path: &Path,
    vars: &[(String, Var)],
    keep: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    let t: HashMap<String, Tensor> = vars
        .iter()
        .filter_map(|(n, v)| keep(n).map(|k| (k, v.as_tensor().clone())))
        .collect();
    save_safetensors_atomic(path, &t, None)
}

/// Writes the world's tokenizer into `dir` unless the same one is there; a different one (the
/// caption grammar changed since the text encoder was trained) is refused rather than rebinding
/// the trained embedding rows to other words. Files go through a temporary folder and are
/// renamed into place.
fn install_tokenizer(
    dir: &Path,
    vocab: &[String],
    merges: &[imprint_models::tokenizer::Merge],
) -> Result<()> {
    let tmp = dir.with_extension("tokenizer-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    write_clip_tokenizer_with(&tmp, "<|endoftext|>", vocab, merges)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for name in ["vocab.json", "merges.txt"] {
        if let Ok(existing) = std::fs::read(dir.join(name)) {
            if existing != std::fs::read(tmp.join(name))? {
                let _ = std::fs::remove_dir_all(&tmp);
                bail!(
                    "{}: a different tokenizer is already here (the caption grammar changed since this world was trained); train into a new --out",
                    dir.join(name).display()
                )
            }
        }
    }
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        std::fs::rename(entry.path(), dir.join(entry.file_name()))
            .with_context(|| format!("{}: cannot write", dir.display()))?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// Gaussian noise from a seeded stream (Box–Muller on ChaCha8), so a run and its resumption draw
/// the same noise on every machine.
fn seeded_randn(
    shape: &[usize],
    seed: u64,
    stream: u64,
    step: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = crate::scene::seeded_rng(
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(stream),
        step as u64,
    );
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        v.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// The phases of [`train_world`], in order.
pub const PHASES: [&str; 4] = ["vae", "clip", "unet", "dino"];

/// Runs every phase whose output is missing under `out`.
pub fn train_world(out: &Path, recipe: &Recipe, device: &Device) -> Result<()> {
    train_world_phases(out, recipe, device, &PHASES)
}

/// Runs only `phases` (names from [`PHASES`]) of the recipe; a phase whose output exists is
/// skipped, and a phase that needs an earlier one's output fails with its path. The recipe goes
/// to `OUT/recipe.json`; a run resumed with a different recipe is refused.
pub fn train_world_phases(
    out: &Path,
    recipe: &Recipe,
    device: &Device,
    phases: &[&str],
) -> Result<()> {
    if let Some(p) = phases.iter().find(|p| !PHASES.contains(p)) {
        bail!("unknown phase '{p}' (phases: {})", PHASES.join(", "))
    }
    recipe.validate()?;
    let run = |name: &str| phases.contains(&name);
    let model = out.join("model");
    // A phase that needs an earlier one's output it will not find says which phase to add.
    let vae_done = model
        .join("vae/diffusion_pytorch_model.safetensors")
        .exists();
    let clip_done = out.join("clip/model.safetensors").exists();
    if run("unet") && !(vae_done || run("vae")) {
        bail!("{}: the unet phase trains on the VAE's latents and there is no VAE yet: add vae to --phases", out.display())
    }
    if run("unet") && !(clip_done || run("clip")) {
        bail!(
            "{}: the unet phase needs the text encoder the clip phase makes: add clip to --phases",
            out.display()
        )
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let recipe_file = out.join("recipe.json");
    if recipe_file.exists() {
        let text = std::fs::read_to_string(&recipe_file)
            .with_context(|| format!("{}: cannot read", recipe_file.display()))?;
        let before: Recipe = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a world recipe", recipe_file.display()))?;
        if &before != recipe {
            bail!(
                "{} was made with another recipe (see {}): resume it with the options that made it (the same --recipe, --seed and --steps-scale) or train into a new folder",
                out.display(),
                recipe_file.display()
            )
        }
    } else {
        write_json(&recipe_file, &serde_json::to_value(recipe)?)?;
    }
    // The tokenizer first: the text encoder's vocabulary depends on it.
    let words = vocabulary_words();
    let word_refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let (vocab, merges) = pruned_clip_vocab_and_merges(&word_refs)?;
    for dir in [out.join("clip"), model.join("tokenizer")] {
        install_tokenizer(&dir, &vocab, &merges)?;
    }
    if run("vae")
        && !model
            .join("vae/diffusion_pytorch_model.safetensors")
            .exists()
    {
        train_vae(out, recipe, device)?;
    }
    if run("clip") && !out.join("clip/model.safetensors").exists() {
        train_clip(out, recipe, vocab.len(), device)?;
    }
    if run("unet")
        && !model
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    {
        train_unet(out, recipe, device)?;
    }
    if run("dino") && !out.join("dino/model.safetensors").exists() {
        train_dino(out, recipe, device)?;
    }
    Ok(())
}

fn train_vae(out: &Path, r: &Recipe, device: &Device) -> Result<()> {
    let cfg: AutoencoderKLConfig = serde_json::from_value(vae_config(1.0))?;
    let (vb, vars) = random_trainable_var_builder(r.seed.wrapping_add(10), device);
    let vae = AutoencoderKL::new(vb, &cfg)?;
    let vars = take_vars(&vars)?;
    let mut opt = optimizer(&vars, 0.0)?;
    let mut phase = Phase::new("vae", out, r.vae_steps, r.save_every, 1)?;
    let start = phase.resume(&vars, &mut opt)?;
    for step in start..r.vae_steps {
        let batch = scenes(r.seed, STREAM_VAE, step, r.vae_batch);
        let imgs: Vec<RgbImage> = batch
            .iter()
            .map(|(s, _)| s.render(IMAGE_SIZE as u32))
            .collect();
        let x = images_to_tensor(&imgs, device)?;
        let dist = vae.encode(&x)?;
        let noise = seeded_randn(dist.mean.dims(), r.seed, 10 + STREAM_VAE, step, device)?;
        let z = dist.sample(&noise)?;
        let rec = vae.decode(&z)?;
        let diff = (&rec - &x)?;
        let mse = diff.sqr()?.mean_all()?;
        // L1 beside L2, as the latent-diffusion autoencoder: sharper edges on small objects.
        let l1 = diff.abs()?.mean_all()?;
        // KL(q ‖ N(0, 1)) per latent element.
        let kl = ((dist.mean.sqr()? + dist.logvar.exp()?)? - 1.0)?
            .sub(&dist.logvar)?
            .mean_all()?
            .affine(0.5, 0.0)?;
        let reconstruction = if r.vae_object_weight == 1.0 {
            (&mse + &l1)?
        } else {
            // The weighted mean of the per-pixel L2 + L1 terms.
            let w = object_weights(&batch, r.vae_object_weight, device)?;
            let per_pixel = (diff.sqr()? + diff.abs()?)?;
            let norm = w.mean_all()?.to_scalar::<f32>()? as f64;
            (per_pixel.broadcast_mul(&w)?.mean_all()? / norm)?
        };
        let loss = (reconstruction + (&kl * 1e-4)?)?;
        step_with(&mut opt, &vars, &loss, lr_at(r.vae_lr, step, r.vae_steps))?;
        phase.record(
            step,
            &[
                ("mse", mse.to_scalar::<f32>()? as f64),
                ("kl", kl.to_scalar::<f32>()? as f64),
            ],
            &vars,
            &opt,
        )?;
    }
    // scaling_factor = 1 / std of the latent means over fresh scenes (as SD's 0.18215).
    let mut zs = vec![];
    for i in 0..8 {
        let batch = scenes(r.seed, STREAM_VAE + 100, i, 16);
        let imgs: Vec<RgbImage> = batch
            .iter()
            .map(|(s, _)| s.render(IMAGE_SIZE as u32))
            .collect();
        zs.push(vae.encode(&images_to_tensor(&imgs, device)?)?.mean.detach());
    }
    let z = Tensor::cat(&zs, 0)?.flatten_all()?;
    let mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let var = z
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let scaling = 1.0 / var.sqrt().max(1e-6);
    let dir = out.join("model/vae");
    write_json(&dir.join("config.json"), &vae_config(scaling))?;
    save_vars(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &vars,
        |n| Some(n.to_string()),
    )?;
    phase.finish();
    Ok(())
}

/// Per-pixel loss weights `[B, 1, H, W]`: `object_weight` where the scene differs from its
/// background alone (the pixels its objects cover), 1 elsewhere.
fn object_weights(
    batch: &[(crate::scene::Scene, String)],
    object_weight: f64,
    device: &Device,
) -> Result<Tensor> {
    let size = IMAGE_SIZE as u32;
    let mut w = Vec::with_capacity(batch.len() * IMAGE_SIZE * IMAGE_SIZE);
    for (scene, _) in batch {
        let full = scene.render(size);
        let background = crate::scene::Scene {
            background: scene.background.clone(),
            objects: vec![],
        }
        .render(size);
        w.extend(full.pixels().zip(background.pixels()).map(|(a, b)| {
            if a == b {
                1f32
            } else {
                object_weight as f32
            }
        }));
    }
    Ok(Tensor::from_vec(
        w,
        (batch.len(), 1, IMAGE_SIZE, IMAGE_SIZE),
        device,
    )?)
}

fn tokenize_batch(tok: &ClipTokenizer, captions: &[String], device: &Device) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(captions.len());
    for c in captions {
        let ids: Vec<i64> = tok.encode(c)?.iter().map(|&i| i as i64).collect();
        rows.push(Tensor::new(ids, device)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

fn train_clip(out: &Path, r: &Recipe, vocab: usize, device: &Device) -> Result<()> {
    let dir = out.join("clip");
    let cfg_json = clip_config(vocab);
    let cfg: ClipConfig = serde_json::from_value(cfg_json.clone())?;
    let tokenizer = ClipTokenizer::from_dir(&dir)?;
    let processor =
        ImageProcessor::from_json(&clip_preprocessor(), &dir.join("preprocessor_config.json"))?;
    let (vb, vars) = random_trainable_var_builder(r.seed.wrapping_add(20), device);
    let clip = ClipModel::new(vb.clone(), &cfg, tokenizer, processor)?;
    let logit_scale = vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(2.6592))?;
    let mut vars = take_vars(&vars)?;
    // The random backend invents every weight, logit_scale too: start it at CLIP's ln(1/0.07).
    if let Some((_, v)) = vars.iter().find(|(n, _)| n == "logit_scale") {
        v.set(&Tensor::new(2.6592f32, device)?)?;
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = optimizer(&vars, 0.1)?;
    let mut phase = Phase::new("clip", out, r.clip_steps, r.save_every, 2)?;
    let start = phase.resume(&vars, &mut opt)?;
    for step in start..r.clip_steps {
        let batch = scenes(r.seed, STREAM_CLIP, step, r.clip_batch);
        let imgs: Vec<RgbImage> = batch
            .iter()
            .map(|(s, _)| s.render(IMAGE_SIZE as u32))
            .collect();
        let captions: Vec<String> = batch.iter().map(|(_, c)| c.clone()).collect();
        let px = clip.processor.preprocess_batch(&imgs, device)?;
        let img = unit(&clip.image_features(&px)?)?;
        let txt =
            unit(&clip.text_features(&tokenize_batch(&clip.tokenizer, &captions, device)?)?)?;
        let scale = logit_scale.clamp(0f32, 4.6052f32)?.exp()?;
        let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
        // Identical captions in one batch are both positives: targets spread over them.
        let n = captions.len();
        let mut target = vec![0f32; n * n];
        for i in 0..n {
            let same: Vec<usize> = (0..n).filter(|&j| captions[j] == captions[i]).collect();
            for &j in &same {
                target[i * n + j] = 1.0 / same.len() as f32;
            }
        }
        let target = Tensor::from_vec(target, (n, n), device)?;
        let ce = |l: &Tensor| -> Result<Tensor> {
            let logp = candle_nn::ops::log_softmax(l, D::Minus1)?;
            Ok((logp * &target)?.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
        };
        let loss = ((ce(&logits)? + ce(&logits.t()?)?)? * 0.5)?;
        let acc = {
            let am: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            am.iter()
                .enumerate()
                .filter(|(i, &j)| captions[*i] == captions[j as usize])
                .count() as f64
                / n as f64
        };
        step_with(&mut opt, &vars, &loss, lr_at(r.clip_lr, step, r.clip_steps))?;
        phase.record(
            step,
            &[("loss", loss.to_scalar::<f32>()? as f64), ("i2t_acc", acc)],
            &vars,
            &opt,
        )?;
    }
    write_json(&dir.join("config.json"), &cfg_json)?;
    write_json(&dir.join("preprocessor_config.json"), &clip_preprocessor())?;
    // Its text tower is the diffusion model's text encoder. Written before clip/model.safetensors,
    // which marks the phase done.
    let te = out.join("model/text_encoder");
    write_json(&te.join("config.json"), &text_config(vocab))?;
    save_vars(&te.join("model.safetensors"), &vars, |n| {
        n.starts_with("text_model.").then(|| n.to_string())
    })?;
    save_vars(&dir.join("model.safetensors"), &vars, |n| {
        Some(n.to_string())
    })?;
    phase.finish();
    Ok(())
}

fn unit(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)?)
}

/// The UNet's two training stages, as SD 2's v-models were made from ε ones: ε-prediction on
/// SD's own schedule, then v-prediction on that schedule rescaled to zero terminal SNR (the
/// scheduler config the model ships with), from the ε weights with a fresh optimizer.
struct UnetStage {
    /// Phase name in the log and checkpoint file name.
    name: &'static str,
    /// Its data stream.
    stream: u64,
    steps: usize,
    schedule: NoiseSchedule,
    objective: String,
}

fn unet_stages(folder: &ModelFolder, r: &Recipe) -> Result<[UnetStage; 2]> {
    let v = folder.scheduler_config()?;
    let mut eps = v.clone();
    eps.prediction_type = "epsilon".into();
    eps.rescale_betas_zero_snr = false;
    let objective = |c: &SchedulerConfig| {
        format!(
            "{} zero-terminal-snr={}",
            c.prediction_type, c.rescale_betas_zero_snr
        )
    };
    Ok([
        UnetStage {
            name: "unet-eps",
            stream: STREAM_UNET,
            steps: r.unet_eps_steps,
            schedule: NoiseSchedule::new(&eps)?,
            objective: objective(&eps),
        },
        UnetStage {
            name: "unet-v",
            stream: STREAM_UNET_V,
            steps: r.unet_steps,
            schedule: NoiseSchedule::new(&v)?,
            objective: objective(&v),
        },
    ])
}

fn train_unet(out: &Path, r: &Recipe, device: &Device) -> Result<()> {
    let model = out.join("model");
    write_json(&model.join("unet/config.json"), &unet_config(r))?;
    write_json(
        &model.join("scheduler/scheduler_config.json"),
        &scheduler_config(),
    )?;
    let folder = ModelFolder::open(&model)?;
    let vae = folder.load_vae(DType::F32, device)?;
    let te = folder.load_text_encoder(DType::F32, device)?;
    let tokenizer = folder.tokenizer()?;
    let cfg: UNet2DConditionConfig = serde_json::from_value(unet_config(r))?;
    let (vb, vars) = random_trainable_var_builder(r.seed.wrapping_add(30), device);
    let unet = UNet2DConditionModel::new(vb, &cfg)?;
    let vars = take_vars(&vars)?;
    if let Some(init) = &r.unet_init {
        load_into(&vars, init)?;
    }
    let [eps, v] = unet_stages(&folder, r)?;
    let old = out.join(".checkpoints/unet.safetensors");
    if old.exists() {
        bail!(
            "{}: a checkpoint of the single-stage UNet recipe; this recipe trains the UNet in two stages (unet-eps, unet-v): delete it to train the UNet afresh",
            old.display()
        )
    }
    let v_phase = Phase::with_objective(v.name, out, v.steps, r.save_every, 3, &v.objective)?;
    let eps_checkpoint = out.join(format!(".checkpoints/{}.safetensors", eps.name));
    if v_phase.checkpoint_path().exists() {
        // The ε stage is done (its weights are the v stage's start); a crash between writing the
        // v stage's start and removing the ε checkpoint may have left the latter.
        let _ = std::fs::remove_file(&eps_checkpoint);
    } else {
        let mut opt = optimizer(&vars, 1e-2)?;
        let mut phase =
            Phase::with_objective(eps.name, out, eps.steps, r.save_every, 3, &eps.objective)?;
        let start = phase.resume(&vars, &mut opt)?;
        for step in start..eps.steps {
            unet_step(
                &unet,
                &vars,
                &mut opt,
                &mut phase,
                &eps,
                step,
                r,
                (&vae, &te, &tokenizer),
                device,
            )?;
        }
        // The v stage starts from these weights with fresh moments (opt_step 0).
        let fresh = optimizer(&vars, 1e-2)?;
        v_phase.save(&vars, &fresh, 0)?;
        phase.finish();
    }
    let mut opt = optimizer(&vars, 1e-2)?;
    let mut phase = v_phase;
    let start = phase.resume(&vars, &mut opt)?;
    for step in start..v.steps {
        unet_step(
            &unet,
            &vars,
            &mut opt,
            &mut phase,
            &v,
            step,
            r,
            (&vae, &te, &tokenizer),
            device,
        )?;
    }
    // model_index.json first: the UNet's weights mark the phase done.
    write_json(
        &model.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null], "image_encoder": [null, null], "requires_safety_checker": false,
            "safety_checker": [null, null], "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    save_vars(
        &model.join("unet/diffusion_pytorch_model.safetensors"),
        &vars,
        |n| Some(n.to_string()),
    )?;
    phase.finish();
    Ok(())
}

/// The folder of a `unet_init`: the path itself, or the folder of a weights file.
fn unet_weights_dir(init: &Path) -> PathBuf {
    if init.is_dir() {
        init.to_path_buf()
    } else {
        init.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// Sets every variable from the same-named tensor of `path` (a diffusers `unet` folder, with
/// its `.fp16` or sharded variants, or one safetensors file), in the variable's dtype.
fn load_into(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let files = if path.is_dir() {
        imprint_models::loading::weight_files(path, "diffusion_pytorch_model")?
    } else {
        vec![path.to_path_buf()]
    };
    let mut tensors = HashMap::new();
    for file in &files {
        tensors.extend(
            candle_core::safetensors::load(file, &Device::Cpu).with_context(|| {
                format!("{}: cannot read the initial UNet weights", file.display())
            })?,
        );
    }
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .with_context(|| format!("{}: no tensor '{name}'", path.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: '{name}' is {:?}, the world's UNet needs {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// One UNet training step of `stage`: a batch of rendered scenes and their captions (10 %
/// dropped for classifier-free guidance), the stage's target, AdamW.
#[allow(clippy::too_many_arguments)]
fn unet_step(
    unet: &UNet2DConditionModel,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    phase: &mut Phase,
    stage: &UnetStage,
    step: usize,
    r: &Recipe,
    (vae, te, tokenizer): (&AutoencoderKL, &ClipTextTransformer, &ClipTokenizer),
    device: &Device,
) -> Result<()> {
    let schedule = &stage.schedule;
    // Caption dropout and timesteps; the ε stage keeps the single-stage recipe's draws.
    let salt = match stage.stream {
        STREAM_UNET => 0,
        other => other.wrapping_mul(0x0100_0000_01b3),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        r.seed ^ salt ^ (step as u64).wrapping_mul(0x9e37_79b9),
    );
    let batch = scenes(r.seed, stage.stream, step, r.unet_batch);
    let imgs: Vec<RgbImage> = batch
        .iter()
        .map(|(s, _)| s.render(IMAGE_SIZE as u32))
        .collect();
    let captions: Vec<String> = batch
        .iter()
        .map(|(_, c)| {
            if rng.gen::<f64>() < 0.1 {
                String::new()
            } else {
                c.clone()
            }
        })
        .collect();
    let (latents, states) = {
        let x = images_to_tensor(&imgs, device)?;
        let d = vae.encode(&x)?;
        let noise = seeded_randn(d.mean.dims(), r.seed, 10 + stage.stream, step, device)?;
        let z = vae.scale_latents(&d.sample(&noise)?)?.detach();
        let ids = tokenize_batch(tokenizer, &captions, device)?;
        (z, te.forward(&ids, 0)?.last_hidden_state.detach())
    };
    let noise = seeded_randn(latents.dims(), r.seed, 20 + stage.stream, step, device)?;
    let t: Vec<usize> = (0..r.unet_batch)
        .map(|_| rng.gen_range(0..schedule.num_train_timesteps()))
        .collect();
    let noisy = schedule.add_noise(&latents, &noise, &t)?;
    let ts = Tensor::new(t.iter().map(|&v| v as i64).collect::<Vec<_>>(), device)?;
    let pred = unet.forward(&noisy, &ts, TextConditioning::Shared(&states))?;
    let target = schedule.target(schedule.prediction, &latents, &noise, &t)?;
    let loss = if r.unet_object_weight == 1.0 {
        (&pred - &target)?.sqr()?.mean_all()?
    } else {
        // A latent pixel weighs `unet_object_weight` if any of the 4×4 pixels it encodes is an
        // object's.
        let f = IMAGE_SIZE / latents.dim(3)?;
        let w = object_weights(&batch, r.unet_object_weight, device)?.max_pool2d(f)?;
        let norm = w.mean_all()?.to_scalar::<f32>()? as f64;
        ((&pred - &target)?.sqr()?.broadcast_mul(&w)?.mean_all()? / norm)?
    };
    step_with(opt, vars, &loss, lr_at(r.unet_lr, step, stage.steps))?;
    phase.record(
        step,
        &[("loss", loss.to_scalar::<f32>()? as f64)],
        vars,
        opt,
    )
}

/// Index of a value in a vocabulary list.
fn index_of<T: PartialEq>(all: &[T], v: &T) -> u32 {
    all.iter().position(|x| x == v).unwrap_or(0) as u32
}

fn train_dino(out: &Path, r: &Recipe, device: &Device) -> Result<()> {
    let dir = out.join("dino");
    let cfg: ViTConfig = serde_json::from_value(dino_config())?;
    let processor =
        ImageProcessor::from_json(&dino_preprocessor(), &dir.join("preprocessor_config.json"))?;
    let (vb, vars) = random_trainable_var_builder(r.seed.wrapping_add(40), device);
    let vit = ViTModel::new(vb.clone(), &cfg)?;
    let d = cfg.hidden_size;
    let heads: Vec<(usize, imprint_ops::Linear)> = [
        Shape::ALL.len(),
        Color::ALL.len(),
        Pattern::ALL.len(),
        Color::ALL.len(),
    ]
    .iter()
    .enumerate()
    .map(|(i, &n)| {
        Ok((
            n,
            imprint_ops::Linear::new(vb.pp(format!("heads.{i}")), d, n, true)?,
        ))
    })
    .collect::<Result<_>>()?;
    let vars = take_vars(&vars)?;
    let mut opt = optimizer(&vars, 0.05)?;
    let mut phase = Phase::new("dino", out, r.dino_steps, r.save_every, 4)?;
    let start = phase.resume(&vars, &mut opt)?;
    let seed = r.seed.wrapping_mul(31).wrapping_add(STREAM_DINO);
    for step in start..r.dino_steps {
        // Scenes whose first object is the subject: its identity is the label.
        let mut imgs = Vec::new();
        let mut labels = vec![Vec::new(); 4];
        let mut i = 0u64;
        while imgs.len() < r.dino_batch {
            // A sub-stream per step; single-object scenes are most of the world, so the cap is
            // never reached in practice.
            if i > 100 * r.dino_batch as u64 {
                bail!("dino phase: too few single-object scenes in step {step}'s stream")
            }
            let (scene, _) = sample_scene_seeded(seed.wrapping_add((step as u64) << 32), i);
            i += 1;
            let [o] = scene.objects.as_slice() else {
                continue;
            };
            imgs.push(scene.render(IMAGE_SIZE as u32));
            labels[0].push(index_of(Shape::ALL, &o.shape));
            labels[1].push(index_of(Color::ALL, &o.color));
            labels[2].push(index_of(Pattern::ALL, &o.pattern));
            let pc = if o.pattern == Pattern::Plain {
                o.color
            } else {
                o.pattern_color
            };
            labels[3].push(index_of(Color::ALL, &pc));
        }
        let px = processor.preprocess_batch(&imgs, device)?;
        let cls = vit.cls_features(&px)?;
        let mut loss = Tensor::new(0f32, device)?;
        let mut correct = 0usize;
        for ((_, head), y) in heads.iter().zip(&labels) {
            let logits = head.forward(&cls)?;
            let y = Tensor::new(y.as_slice(), device)?;
            loss = (loss + candle_nn::loss::cross_entropy(&logits, &y)?)?;
            let am: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            correct += am
                .iter()
                .zip(y.to_vec1::<u32>()?)
                .filter(|(a, b)| **a == *b)
                .count();
        }
        let acc = correct as f64 / (4 * r.dino_batch) as f64;
        step_with(&mut opt, &vars, &loss, lr_at(r.dino_lr, step, r.dino_steps))?;
        phase.record(
            step,
            &[("loss", loss.to_scalar::<f32>()? as f64), ("acc", acc)],
            &vars,
            &opt,
        )?;
    }
    write_json(&dir.join("config.json"), &dino_config())?;
    write_json(&dir.join("preprocessor_config.json"), &dino_preprocessor())?;
    save_vars(&dir.join("model.safetensors"), &vars, |n| {
        (!n.starts_with("heads.")).then(|| n.to_string())
    })?;
    phase.finish();
    Ok(())
}

/// Converts every float32 weight file of a trained world folder to float16 in place (the committed
/// copy; the loaders widen on load).
pub fn to_half(out: &Path) -> Result<()> {
    for rel in [
        "model/vae/diffusion_pytorch_model.safetensors",
        "model/unet/diffusion_pytorch_model.safetensors",
        "model/text_encoder/model.safetensors",
        "clip/model.safetensors",
        "dino/model.safetensors",
    ] {
        let p = out.join(rel);
        let t = candle_core::safetensors::load(&p, &Device::Cpu)?;
        let h: HashMap<String, Tensor> = t
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?)))
            .collect::<Result<_>>()?;
        save_safetensors_atomic(&p, &h, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imprint_models::loading::ModelFolder;

    /// The whole recipe at a few steps: every output is a loadable folder in the reference layout,
    /// the text encoder is CLIP's text tower, and a finished phase is not trained again.
    #[test]
    fn smoke_recipe_writes_loadable_folders_and_skips_finished_phases() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("world");
        let dev = Device::Cpu;
        train_world(&out, &Recipe::smoke(), &dev)?;
        let folder = ModelFolder::open(out.join("model"))?;
        let vae = folder.load_vae(DType::F32, &dev)?;
        assert!(vae.config.scaling_factor.is_finite() && vae.config.scaling_factor > 0.0);
        let te = folder.load_text_encoder(DType::F32, &dev)?;
        folder.load_unet(DType::F32, &dev)?;
        let tok = folder.tokenizer()?;
        // The pruned vocabulary keeps world words whole.
        let ids = tok.encode("a small green star at the top left of a striped blue background")?;
        // BOS and the 13 words, each one token.
        assert_eq!(ids.iter().position(|&i| i == tok.eos_id()), Some(14));
        let clip = ClipModel::load(&out.join("clip"), &dev)?;
        let ids =
            Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), &dev)?.unsqueeze(0)?;
        let a = te.forward(&ids, 0)?.last_hidden_state;
        let b = clip.text_model.forward(&ids, 0)?.last_hidden_state;
        assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        ViTModel::load(&out.join("dino"), &dev)?;
        let log = std::fs::read_to_string(out.join("train-log.jsonl"))?;
        for phase in ["vae", "clip", "unet-eps", "unet-v", "dino"] {
            assert!(
                log.contains(&format!("\"phase\":\"{phase}\"")),
                "{phase} missing from the log"
            );
        }
        // Running again trains nothing: the weights stay byte for byte.
        let unet = out.join("model/unet/diffusion_pytorch_model.safetensors");
        let before = std::fs::read(&unet)?;
        train_world(&out, &Recipe::smoke(), &dev)?;
        assert_eq!(std::fs::read(&unet)?, before);
        for stage in ["unet-eps", "unet-v"] {
            assert!(!out
                .join(format!(".checkpoints/{stage}.safetensors"))
                .exists());
        }
        Ok(())
    }

    /// A phase interrupted after a checkpoint continues from it: its step count, weights and
    /// optimizer moments come back.
    #[test]
    fn phase_checkpoints_restore_weights_and_moments() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let v = Var::new(&[1f32, 2.0], &dev)?;
        let vars = vec![("w".to_string(), v.clone())];
        let mut opt = optimizer(&vars, 0.0)?;
        opt.step(&[Tensor::new(&[0.5f32, -0.5], &dev)?], 0.1)?;
        let mut phase = Phase::new("vae", dir.path(), 10, 1, 1)?;
        phase.save(&vars, &opt, 3)?;
        let saved = v.as_tensor().to_vec1::<f32>()?;
        v.set(&Tensor::new(&[9f32, 9.0], &dev)?)?;
        let mut fresh = optimizer(&vars, 0.0)?;
        assert_eq!(phase.resume(&vars, &mut fresh)?, 3);
        assert_eq!(v.as_tensor().to_vec1::<f32>()?, saved);
        assert_eq!(
            fresh.exp_avg[0].to_vec1::<f32>()?,
            opt.exp_avg[0].to_vec1::<f32>()?
        );
        assert_eq!(fresh.step, 3);
        Ok(())
    }

    /// Steps logged after the last checkpoint are trained again on resume: the log drops their
    /// first run (other phases' entries stay) and the phase's clock continues.
    #[test]
    fn resuming_drops_the_log_entries_past_the_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let vars = vec![("w".to_string(), Var::new(&[1f32, 2.0], &dev)?)];
        let mut opt = optimizer(&vars, 0.0)?;
        let mut clip = Phase::new("clip", dir.path(), 10, 100, 2)?;
        clip.record(0, &[("loss", 1.0)], &vars, &opt)?;
        let mut phase = Phase::new("vae", dir.path(), 10, 3, 1)?;
        for step in 0..5 {
            phase.record(step, &[("loss", 1.0)], &vars, &opt)?;
        }
        drop((phase, clip));
        let mut resumed = Phase::new("vae", dir.path(), 10, 3, 1)?;
        assert_eq!(resumed.resume(&vars, &mut opt)?, 3);
        resumed.record(3, &[("loss", 0.5)], &vars, &opt)?;
        let log = std::fs::read_to_string(dir.path().join("train-log.jsonl"))?;
        let entries: Vec<serde_json::Value> = log
            .lines()
            .map(serde_json::from_str)
            .collect::<std::result::Result<_, _>>()?;
        let steps = |name: &str| -> Vec<u64> {
            entries
                .iter()
                .filter(|e| e["phase"] == name)
                .map(|e| e["step"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(steps("vae"), [1, 2, 3, 4]);
        assert_eq!(steps("clip"), [1]);
        let secs: Vec<f64> = entries
            .iter()
            .filter(|e| e["phase"] == "vae")
            .map(|e| e["seconds"].as_f64().unwrap())
            .collect();
        assert!(secs[3] >= secs[2], "the clock went back: {secs:?}");
        Ok(())
    }

    #[test]
    fn checkpoints_of_another_objective_are_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let vars = vec![("w".to_string(), Var::new(&[1f32, 2.0], &dev)?)];
        let mut opt = optimizer(&vars, 0.0)?;
        Phase::with_objective(
            "unet",
            dir.path(),
            10,
            1,
            3,
            "epsilon zero-terminal-snr=false",
        )?
        .save(&vars, &opt, 2)?;
        let mut v = Phase::with_objective(
            "unet",
            dir.path(),
            10,
            1,
            3,
            "v_prediction zero-terminal-snr=true",
        )?;
        let err = v.resume(&vars, &mut opt).unwrap_err().to_string();
        assert!(err.contains("objective epsilon"), "{err}");
        let mut same = Phase::with_objective(
            "unet",
            dir.path(),
            10,
            1,
            3,
            "epsilon zero-terminal-snr=false",
        )?;
        assert_eq!(same.resume(&vars, &mut opt)?, 2);
        Ok(())
    }

    /// The object weights fall on some pixels of every scene but never on most, and a scene
    /// emptied of its objects weighs 1 everywhere.
    #[test]
    fn object_weights_mark_the_pixels_objects_cover() -> Result<()> {
        let dev = Device::Cpu;
        let batch = scenes(0, STREAM_VAE, 0, 8);
        let w = object_weights(&batch, 7.0, &dev)?;
        assert_eq!(w.dims(), [8, 1, IMAGE_SIZE, IMAGE_SIZE]);
        for i in 0..batch.len() {
            let v: Vec<f32> = w.get(i)?.flatten_all()?.to_vec1()?;
            assert!(v.iter().all(|&x| x == 1.0 || x == 7.0));
            let share = v.iter().filter(|&&x| x == 7.0).count() as f64 / v.len() as f64;
            assert!(share > 0.0 && share < 0.5, "scene {i}: {share}");
        }
        let empty: Vec<_> = batch
            .iter()
            .map(|(s, c)| {
                let mut s = s.clone();
                s.objects.clear();
                (s, c.clone())
            })
            .collect();
        let w = object_weights(&empty, 7.0, &dev)?;
        assert_eq!(w.max_all()?.to_scalar::<f32>()?, 1.0);
        Ok(())
    }

    /// `--phases`, the recipe's own file, the weighted losses, and a UNet started from given
    /// weights: at learning rate 0 the v stage hands them back unchanged.
    #[test]
    fn phases_recipe_file_weighted_losses_and_unet_init() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let base = dir.path().join("base");
        let weighted = Recipe {
            vae_object_weight: 4.0,
            unet_object_weight: 4.0,
            unet_channels: vec![16, 32, 32],
            unet_layers_per_block: 2,
            ..Recipe::smoke()
        };
        train_world_phases(&base, &weighted, &dev, &["vae", "clip", "unet"])?;
        assert!(!base.join("dino").join("model.safetensors").exists());
        // The recipe's UNet shape is the one written and loaded.
        let unet = ModelFolder::open(base.join("model"))?.unet_config()?;
        assert_eq!(unet.block_out_channels, vec![16, 32, 32]);
        assert_eq!(
            unet.layers_per_block.expand(3, "layers_per_block")?,
            vec![2; 3]
        );
        let saved: Recipe =
            serde_json::from_str(&std::fs::read_to_string(base.join("recipe.json"))?)?;
        assert_eq!(saved, weighted);
        let log = std::fs::read_to_string(base.join("train-log.jsonl"))?;
        assert!(log.contains("\"unet-v\""));
        for line in log.lines() {
            let row: Value = serde_json::from_str(line)?;
            for key in ["loss", "mse"] {
                if let Some(v) = row.get(key) {
                    // serde_json writes a NaN as null: as_f64 is None then.
                    assert!(v.as_f64().is_some_and(f64::is_finite), "{line}");
                }
            }
        }
        for bad in [
            Recipe {
                unet_object_weight: 0.5,
                ..Recipe::smoke()
            },
            Recipe {
                save_every: 0,
                ..Recipe::smoke()
            },
            Recipe {
                unet_channels: vec![32, 64],
                ..Recipe::smoke()
            },
            Recipe {
                unet_channels: vec![32, 60, 128],
                ..Recipe::smoke()
            },
            Recipe {
                unet_init: Some(dir.path().join("missing")),
                ..Recipe::smoke()
            },
        ] {
            let fresh = dir.path().join("refused");
            assert!(train_world_phases(&fresh, &bad, &dev, &PHASES).is_err());
            assert!(!fresh.exists(), "a refused recipe writes nothing");
        }
        let err = train_world_phases(
            &dir.path().join("no-vae"),
            &Recipe::smoke(),
            &dev,
            &["unet"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("add vae to --phases"), "{err}");
        let err = train_world_phases(&base, &Recipe::smoke(), &dev, &["dino"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("another recipe"), "{err}");
        let err = train_world_phases(&base, &weighted, &dev, &["vea"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown phase 'vea'"), "{err}");

        let tuned = dir.path().join("tuned");
        let init = base.join("model/unet");
        let frozen = Recipe {
            unet_init: Some(init.clone()),
            unet_eps_steps: 0,
            unet_steps: 1,
            unet_lr: 0.0,
            unet_channels: weighted.unet_channels.clone(),
            unet_layers_per_block: weighted.unet_layers_per_block,
            ..Recipe::smoke()
        };
        // Weights of another UNet shape are refused, naming the tensor that differs.
        let other_shape = Recipe {
            unet_channels: Recipe::smoke().unet_channels,
            ..frozen.clone()
        };
        let err = train_world_phases(
            &dir.path().join("other-shape"),
            &other_shape,
            &dev,
            &["vae", "clip", "unet"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the world's UNet needs"), "{err}");
        train_world_phases(&tuned, &frozen, &dev, &["vae", "clip", "unet"])?;
        let a =
            candle_core::safetensors::load(init.join("diffusion_pytorch_model.safetensors"), &dev)?;
        let b = candle_core::safetensors::load(
            tuned.join("model/unet/diffusion_pytorch_model.safetensors"),
            &dev,
        )?;
        assert_eq!(a.len(), b.len());
        for (name, t) in &a {
            let diff = (t - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
        let log = std::fs::read_to_string(tuned.join("train-log.jsonl"))?;
        assert!(!log.contains("unet-eps"), "the ε stage was set to 0 steps");
        Ok(())
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_a_tenth() {
        assert!(lr_at(1.0, 0, 100) < lr_at(1.0, 4, 100));
        assert!((lr_at(1.0, 5, 100) - 1.0).abs() < 1e-9);
        assert!((lr_at(1.0, 100, 100) - 0.1).abs() < 1e-9);
    }
}
