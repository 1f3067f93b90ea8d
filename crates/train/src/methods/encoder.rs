//! Encoder-based personalization in the manner of E4T (Gal et al. 2023, "Encoder-based Domain
//! Tuning for Fast Personalization of Text-to-Image Models") and ELITE (Wei et al. 2023): a network
//! learned once, over many concepts of a domain, maps a concept's images to its word embedding —
//! an offset from the domain's class word, as E4T predicts it — so a new concept takes one encoder
//! pass instead of minutes of optimization (optionally refined by a few Textual Inversion steps).
//!
//! * **Encoder**: a CLIP image tower (started from, and frozen at, a `CLIPModel`'s; the world's
//!   for the toy world) whose pooled features, averaged over the concept's images, go through a
//!   two-layer mapper (Linear → GELU → Linear) to the offset. The mapper's last layer starts at
//!   zero, so training starts from the class word.
//! * **Training**: the denoising loss of the frozen diffusion model on one image of the concept,
//!   captioned with the concept's word, given its other images to the encoder, plus E4T's L2
//!   penalty on the offset; only the mapper trains. Concepts come from a [`ConceptSource`]: a
//!   folder of concept folders, or the toy world's unlimited supply.
//! * **Files**: an encoder folder: `config.json` (the tower's `vision_config`, the mapper's widths,
//!   the class word), `model.safetensors` (`vision_model.*`, `mapper.fc1.*`, `mapper.fc2.*`) and the
//!   tower's `preprocessor_config.json`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use imprint_concepts::per_layer::substitute_tokens;
use imprint_models::clip_vision::{ClipVisionConfig, ClipVisionTransformer};
use imprint_models::image_processor::ImageProcessor;
use imprint_models::io::{save_safetensors_atomic, write_atomic};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::TextConditioning;
use imprint_ops::Linear;
use imprint_pipeline::StableDiffusion;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_STEPS: usize = 1500;
pub const DEFAULT_BATCH: usize = 8;
pub const DEFAULT_LR: f64 = 1e-3;
pub const DEFAULT_REFERENCES: usize = 3;
pub const DEFAULT_HIDDEN: usize = 256;
/// E4T's weight of the offset's L2 penalty.
pub const DEFAULT_OFFSET_PENALTY: f64 = 1e-2;

/// `config.json` of an encoder folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// The image tower's config, as in a `CLIPConfig`.
    pub vision_config: serde_json::Value,
    /// Width of the mapper's hidden layer.
    pub mapper_hidden: usize,
    /// Width of the text encoder's token embeddings the offsets are for.
    pub embedding_dim: usize,
    /// The domain's class word (the offsets' origin) when the encoder was trained on one.
    pub class_word: Option<String>,
}

/// The encoder: image tower, then mapper to an embedding offset.
pub struct ConceptEncoder {
    pub vision: ClipVisionTransformer,
    pub fc1: Linear,
    pub fc2: Linear,
    pub processor: ImageProcessor,
    pub config: EncoderConfig,
}

impl ConceptEncoder {
    /// `vb` holds `vision_model.*` and `mapper.*`.
    pub fn new(
        vb: VarBuilder,
        mapper: VarBuilder,
        cfg: &EncoderConfig,
        processor: ImageProcessor,
    ) -> Result<Self> {
        let vc: ClipVisionConfig = serde_json::from_value(cfg.vision_config.clone())
            .context("encoder config: vision_config is not a CLIP vision config")?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &vc)?;
        let fc1 = Linear::new(
            mapper.pp("mapper.fc1"),
            vc.hidden_size,
            cfg.mapper_hidden,
            true,
        )?;
        let fc2 = Linear::new(
            mapper.pp("mapper.fc2"),
            cfg.mapper_hidden,
            cfg.embedding_dim,
            true,
        )?;
        Ok(Self {
            vision,
            fc1,
            fc2,
            processor,
            config: cfg.clone(),
        })
    }

    /// Loads an encoder folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let ctx = || format!("{}: not an imprint encoder folder", dir.display());
        let cfg: EncoderConfig =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).with_context(ctx)?)
                .with_context(ctx)?;
        let weights = load_f32(&dir.join("model.safetensors"), device).with_context(ctx)?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let processor = ImageProcessor::load(&dir.join("preprocessor_config.json"))?;
        Self::new(vb.clone(), vb, &cfg, processor).with_context(ctx)
    }

    /// The embedding offset `[dim]` for a concept's images.
    pub fn offset(&self, images: &[RgbImage]) -> Result<Tensor> {
        if images.is_empty() {
            bail!("the encoder needs at least one image of the concept")
        }
        let device = self.fc1.weight.device().clone();
        let px = self.processor.preprocess_batch(images, &device)?;
        let pooled = self.vision.forward(&px)?.mean(0)?.unsqueeze(0)?;
        let h = self.fc1.forward(&pooled)?.gelu_erf()?;
        Ok(self.fc2.forward(&h)?.squeeze(0)?)
    }
}

fn load_f32(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// One training example: a concept's reference images, a target image of it, and the target's
/// caption with `{}` where the concept's word goes.
pub struct ConceptSample {
    pub class_word: String,
    pub references: Vec<RgbImage>,
    pub target: RgbImage,
    pub caption: String,
}

/// Where concepts come from.
pub trait ConceptSource {
    /// Example `index` (a pure function of it, so a resumed run sees the same data).
    fn sample(&mut self, index: u64, references: usize) -> Result<ConceptSample>;
}

/// A folder of concept folders: each holds images (with optional `IMAGE.txt` captions naming the
/// class word) and optionally `class.txt` (the class word; else the folder name's last word).
pub struct FolderConcepts {
    concepts: Vec<(String, Vec<(PathBuf, Option<String>)>)>,
    seed: u64,
}

impl FolderConcepts {
    pub fn open(dir: &Path, seed: u64) -> Result<Self> {
        let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read the data folder", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        folders.sort();
        let mut concepts = vec![];
        for f in folders {
            let class = match std::fs::read_to_string(f.join("class.txt")) {
                Ok(s) => s.trim().to_string(),
                Err(_) => f
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.rsplit(['-', '_', ' ']).next())
                    .unwrap_or("object")
                    .to_string(),
            };
            let mut images = vec![];
            for p in imprint_eval::metrics::image_files(&f)? {
                let caption = std::fs::read_to_string(p.with_extension("txt")).ok();
                images.push((p, caption.map(|c| c.trim().to_string())));
            }
            if images.len() < 2 {
                bail!(
                    "{}: a concept needs at least two images (references and a target)",
                    f.display()
                )
            }
            concepts.push((class, images));
        }
        if concepts.is_empty() {
            bail!(
                "{}: no concept folders (one folder of images per concept)",
                dir.display()
            )
        }
        Ok(Self { concepts, seed })
    }
}

impl ConceptSource for FolderConcepts {
    fn sample(&mut self, index: u64, references: usize) -> Result<ConceptSample> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let (class, images) = &self.concepts[rng.gen_range(0..self.concepts.len())];
        let mut order: Vec<usize> = (0..images.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        let (target_path, caption) = &images[order[0]];
        let read = |p: &Path| imprint_models::image_processor::read_image_rgb(p);
        let refs = order[1..]
            .iter()
            .take(references.max(1))
            .map(|&i| read(&images[i].0))
            .collect::<Result<_>>()?;
        // The caption's class word becomes the concept's word; without one, a plain caption.
        let caption = match caption {
            Some(c) if c.split_whitespace().any(|w| w == class) => c
                .split_whitespace()
                .map(|w| if w == class { "{}" } else { w })
                .collect::<Vec<_>>()
                .join(" "),
            _ => "a photo of a {}".to_string(),
        };
        Ok(ConceptSample {
            class_word: class.clone(),
            references: refs,
            target: read(target_path)?,
            caption,
        })
    }
}

/// How to train an encoder.
#[derive(Clone, Debug)]
pub struct EncoderTrainConfig {
    pub model: PathBuf,
    /// The `CLIPModel` folder whose image tower the encoder starts from.
    pub init_vision: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    /// Concepts per step.
    pub batch: usize,
    pub references: usize,
    pub lr: f64,
    pub offset_penalty: f64,
    pub mapper_hidden: usize,
    pub class_word: Option<String>,
    pub seed: u64,
    pub save_every: usize,
    pub device: String,
}

/// The word the encoder's vector stands in for during training.
const PLACEHOLDER: &str = "<encoder-concept>";

/// Trains the mapper of an encoder on concepts from `source`; writes the encoder folder at
/// `cfg.out` and returns the last step's loss. A checkpoint under `OUT.checkpoint.safetensors`
/// lets an interrupted run resume.
pub fn train_encoder(
    cfg: &EncoderTrainConfig,
    source: &mut dyn ConceptSource,
    mut progress: impl FnMut(usize, f64),
) -> Result<f64> {
    if cfg.out.exists() {
        bail!(
            "{}: already exists; the encoder is written to a new folder",
            cfg.out.display()
        )
    }
    if cfg.steps == 0 || cfg.batch == 0 {
        bail!("--steps and --batch-size must be at least 1")
    }
    let device = imprint_pipeline::parse_device(&cfg.device)?;
    let mut sd = StableDiffusion::load(&cfg.model, DType::F32, &device)?;
    let clip_cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cfg.init_vision.join("config.json"))
            .with_context(|| format!("{}: not a CLIPModel folder", cfg.init_vision.display()))?,
    )?;
    let vision_config = clip_cfg.get("vision_config").cloned().with_context(|| {
        format!(
            "{}/config.json has no vision_config",
            cfg.init_vision.display()
        )
    })?;
    let dim = sd.text_encoder.token_embedding.dim(1)?;
    let ecfg = EncoderConfig {
        vision_config,
        mapper_hidden: cfg.mapper_hidden,
        embedding_dim: dim,
        class_word: cfg.class_word.clone(),
    };
    let clip_weights: HashMap<String, Tensor> =
        load_f32(&cfg.init_vision.join("model.safetensors"), &device)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("vision_model."))
            .collect();
    let processor = ImageProcessor::load(&cfg.init_vision.join("preprocessor_config.json"))?;
    let (mapper_vb, vars) = imprint_models::init::random_trainable_var_builder(cfg.seed, &device);
    let encoder = ConceptEncoder::new(
        VarBuilder::from_tensors(clip_weights.clone(), DType::F32, &device),
        mapper_vb,
        &ecfg,
        processor,
    )?;
    let vars = imprint_models::loading::take_vars(&vars)?;
    // The last layer starts at zero: the first vectors are the class words themselves.
    for (name, v) in &vars {
        if name.starts_with("mapper.fc2") {
            v.set(&v.as_tensor().zeros_like()?)?;
        }
    }
    let token_id = sd.tokenizer.add_token(PLACEHOLDER)?;
    let schedule = NoiseSchedule::new(&sd.scheduler_config)?;
    let prediction = sd.scheduler_config.prediction()?;
    let resolution = sd.default_size();
    // What a checkpoint must have been made with to be resumed.
    let run_key = format!(
        "model={} vision={} batch={} references={} lr={} penalty={} hidden={} seed={} steps={}",
        cfg.model.display(),
        cfg.init_vision.display(),
        cfg.batch,
        cfg.references,
        cfg.lr,
        cfg.offset_penalty,
        cfg.mapper_hidden,
        cfg.seed,
        cfg.steps
    );
    let mut opt = crate::optim::AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        crate::optim::AdamWConfig::default(),
    )?;
    let ckpt = PathBuf::from(format!("{}.checkpoint.safetensors", cfg.out.display()));
    let mut start = 0;
    if ckpt.is_file() {
        let bytes = std::fs::read(&ckpt)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: unreadable checkpoint ({e})", ckpt.display()))?;
        let made_with = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("run").cloned())
            .unwrap_or_default();
        if made_with != run_key {
            bail!("{}: a checkpoint of another run ({made_with}); delete it or train with the same options", ckpt.display())
        }
        let t = candle_core::safetensors::load(&ckpt, &device)?;
        for (i, (name, v)) in vars.iter().enumerate() {
            let get = |k: String| {
                t.get(&k)
                    .cloned()
                    .with_context(|| format!("{}: lacks {k}", ckpt.display()))
            };
            v.set(&get(format!("w.{name}"))?)?;
            opt.exp_avg[i] = get(format!("m.{name}"))?;
            opt.exp_avg_sq[i] = get(format!("v.{name}"))?;
        }
        start = t
            .get("step")
            .context("checkpoint lacks step")?
            .to_scalar::<i64>()? as usize;
        opt.step = start;
    }
    let mut last = f64::NAN;
    for step in start..cfg.steps {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed
                .wrapping_add(step as u64)
                .wrapping_mul(0x2545_f491_4f6c_dd1d),
        );
        // The batch's concepts: each its own vector in its caption; one batched pass after.
        let mut embeds = Vec::with_capacity(cfg.batch);
        let mut ids = Vec::with_capacity(cfg.batch);
        let mut targets = Vec::with_capacity(cfg.batch);
        let mut penalty = Vec::with_capacity(cfg.batch);
        for b in 0..cfg.batch {
            let s = source.sample((step * cfg.batch + b) as u64, cfg.references)?;
            let class_ids = sd.tokenizer.tokenize(&s.class_word);
            if class_ids.len() != 1 {
                bail!("class word '{}' is {} tokens; the encoder's offsets start from a single-token word", s.class_word, class_ids.len())
            }
            let class_row = sd
                .text_encoder
                .token_embedding
                .get(class_ids[0] as usize)?
                .to_dtype(DType::F32)?;
            let offset = encoder.offset(&s.references)?;
            let vector = (class_row + &offset)?.unsqueeze(0)?;
            let caption = s.caption.replacen("{}", PLACEHOLDER, 1);
            let row = Tensor::new(sd.tokenizer.encode(&caption)?, &device)?.unsqueeze(0)?;
            embeds.push(substitute_tokens(
                &sd.text_encoder,
                &row,
                &[token_id],
                &vector,
            )?);
            ids.push(row);
            targets.push(imprint_pipeline::image_io::rgb_to_tensor(
                &s.target, resolution, resolution, &device,
            )?);
            penalty.push(offset.sqr()?.mean_all()?);
        }
        let ids = Tensor::cat(&ids, 0)?;
        let states = sd
            .text_encoder
            .forward_embeds(&Tensor::cat(&embeds, 0)?, &ids, 0)?
            .last_hidden_state;
        let dist = sd.vae.encode(&Tensor::cat(&targets, 0)?)?;
        let z = sd
            .vae
            .scale_latents(&dist.sample(&seeded_normal(dist.mean.dims(), &mut rng, &device)?)?)?
            .detach();
        let noise = seeded_normal(z.dims(), &mut rng, &device)?;
        let t: Vec<usize> = (0..cfg.batch)
            .map(|_| rng.gen_range(0..schedule.num_train_timesteps()))
            .collect();
        let diffusion = super::diffusion_loss(
            &sd.unet,
            &schedule,
            prediction,
            &z,
            &noise,
            &t,
            TextConditioning::Shared(&states),
        )?;
        let penalty = Tensor::stack(&penalty, 0)?.mean_all()?;
        let loss = (&diffusion + (penalty * cfg.offset_penalty)?)?;
        let grads = loss.backward()?;
        let gs: Vec<Tensor> = vars
            .iter()
            .map(|(n, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .with_context(|| format!("no gradient for {n}"))
            })
            .collect::<Result<_>>()?;
        opt.step(&gs, cfg.lr)?;
        last = diffusion.to_scalar::<f32>()? as f64;
        if !last.is_finite() {
            bail!("encoder training diverged at step {step}; try a smaller --lr")
        }
        progress(step, last);
        if cfg.save_every > 0 && (step + 1) % cfg.save_every == 0 && step + 1 < cfg.steps {
            let mut t = HashMap::new();
            for (i, (name, v)) in vars.iter().enumerate() {
                t.insert(format!("w.{name}"), v.as_tensor().clone());
                t.insert(format!("m.{name}"), opt.exp_avg[i].clone());
                t.insert(format!("v.{name}"), opt.exp_avg_sq[i].clone());
            }
            t.insert("step".into(), Tensor::new((step + 1) as i64, &Device::Cpu)?);
            let meta = HashMap::from([("run".to_string(), run_key.clone())]);
            save_safetensors_atomic(&ckpt, &t, Some(meta))?;
        }
    }
    // The folder: tower (as loaded) and mapper, written to a temporary name and renamed.
    let tmp = PathBuf::from(format!(
        "{}.partial-{}",
        cfg.out.display(),
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp)?;
    let mut weights = clip_weights;
    for (name, v) in &vars {
        weights.insert(name.clone(), v.as_tensor().clone());
    }
    save_safetensors_atomic(&tmp.join("model.safetensors"), &weights, None)?;
    write_atomic(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&ecfg)?.as_bytes(),
    )?;
    std::fs::copy(
        cfg.init_vision.join("preprocessor_config.json"),
        tmp.join("preprocessor_config.json"),
    )?;
    std::fs::rename(&tmp, &cfg.out)?;
    let _ = std::fs::remove_file(&ckpt);
    Ok(last)
}

/// Standard normal noise drawn from `rng` (so a resumed run draws the same).
fn seeded_normal(dims: &[usize], rng: &mut impl Rng, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::Distribution::<f32>::sample(&rand_distr::StandardNormal, rng))
        .collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

/// One encoder pass: the concept's embedding `[1, dim]` for `images`, from the class word's
/// embedding in `te`'s table plus the predicted offset.
pub fn personalize_vector(
    encoder: &ConceptEncoder,
    sd: &StableDiffusion,
    images: &[RgbImage],
    class_word: &str,
) -> Result<Tensor> {
    let ids = sd.tokenizer.tokenize(class_word);
    if ids.len() != 1 {
        bail!(
            "class word '{class_word}' is {} tokens; give a single-token word",
            ids.len()
        )
    }
    let dim = sd.text_encoder.token_embedding.dim(1)?;
    if encoder.config.embedding_dim != dim {
        bail!("the encoder predicts {}-dim embeddings; this model's text encoder takes {dim} (was the encoder trained for another model?)", encoder.config.embedding_dim)
    }
    let row = sd
        .text_encoder
        .token_embedding
        .get(ids[0] as usize)?
        .to_dtype(DType::F32)?;
    let v = (row.to_device(&Device::Cpu)? + encoder.offset(images)?.to_device(&Device::Cpu)?)?;
    Ok(v.unsqueeze(0)?)
}
