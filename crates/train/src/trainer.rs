//! The training loop every method shares: batches of augmented images with captions, the
//! denoising loss, gradient accumulation and clipping, AdamW with a learning-rate schedule,
//! progress, a JSONL log, validation grids, and checkpoints that resume bit-exactly on CPU.

use crate::checkpoint::Checkpoint;
use crate::config::{OutputPaths, TextualInversionConfig};
use crate::data::{self, Augment, Crop, LatentCache};
use crate::methods::diffusion_loss;
use crate::methods::textual_inversion::TextualInversion;
use crate::optim::{clip_grad_norm, AdamW};
use crate::templates::{self, TemplateSet};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_concepts::{Concept, TokenEmbedding};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::TextConditioning;
use imprint_pipeline::noise::SeededNoise;
use imprint_pipeline::{image_io, SampleOptions, StableDiffusion};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a run is watched and stopped from outside.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Set (by Ctrl-C, or a test) to stop after the current step with a checkpoint.
    pub interrupt: Arc<AtomicBool>,
    /// Show a progress bar.
    pub progress: bool,
    /// Called after each optimizer step with the number of steps done.
    pub after_step: Option<Arc<dyn Fn(usize) + Send + Sync>>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// All steps done; the concept was written.
    Finished { steps: usize },
    /// Stopped early; `checkpoint` resumes it.
    Interrupted {
        step: usize,
        checkpoint: std::path::PathBuf,
    },
}

/// One line of the JSONL log.
#[derive(serde::Serialize)]
struct LogLine {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    seconds: f64,
}

/// Trains a textual-inversion concept as `cfg` says; see the crate docs for the files it writes.
pub fn train_textual_inversion(cfg: &TextualInversionConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    t.validate()?;
    let templates_set: TemplateSet = cfg.templates.parse()?;
    let paths = OutputPaths::new(&t.out)?;
    let config_text = toml::to_string(cfg)?;
    let device = imprint_pipeline::parse_device(&t.device)?;
    let mut sd = StableDiffusion::load(&t.model, DType::F32, &device)?;
    let prediction = sd.scheduler_config.prediction()?;
    let schedule = NoiseSchedule::new(&sd.scheduler_config)?;

    let folder = data::load_image_folder(&t.images, (t.resolution / 2) as u32)?;
    for w in &folder.warnings {
        eprintln!("warning: {w}");
    }
    // Shrink each photo once to its training size: renders are then only crops.
    let images: Vec<_> = folder
        .images
        .iter()
        .map(|i| i.resized_for(t.resolution as u32))
        .collect();
    let augment = Augment {
        resolution: t.resolution as u32,
        crop: if t.crop == "random" {
            Crop::Random
        } else {
            Crop::Center
        },
        flip: t.flip,
    };

    // The method's trainable part, fresh or from the checkpoint.
    let resume = match &t.resume {
        Some(p) => Some(Checkpoint::load(p)?),
        None => None,
    };
    let method = match &resume {
        None => TextualInversion::new(
            &mut sd.tokenizer,
            &sd.text_encoder,
            &cfg.token,
            &cfg.init_word,
            cfg.num_vectors,
        )?,
        Some(ck) => {
            check_resumable(&ck.config, cfg)?;
            let vectors = &ck.params.first().context("checkpoint holds no vectors")?.1;
            TextualInversion::with_vectors(
                &mut sd.tokenizer,
                &sd.text_encoder,
                &cfg.token,
                vectors,
            )?
        }
    };
    let mut adam = AdamW::new(vec![method.vectors.clone()], t.adam)?;
    let (mut rng, start) = match &resume {
        None => (SeededNoise::new(t.seed), 0),
        Some(ck) => {
            adam.exp_avg = ck
                .exp_avg
                .iter()
                .map(|x| x.to_device(&device))
                .collect::<candle_core::Result<_>>()?;
            adam.exp_avg_sq = ck
                .exp_avg_sq
                .iter()
                .map(|x| x.to_device(&device))
                .collect::<candle_core::Result<_>>()?;
            adam.step = ck.step;
            (
                SeededNoise::from_state(ck.rng_seed, ck.rng_word_pos),
                ck.step,
            )
        }
    };
    if start >= t.steps {
        bail!(
            "the checkpoint is at step {start}, the run has only {} steps",
            t.steps
        )
    }
    imprint_models::io::write_atomic(&paths.config, config_text.as_bytes())?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("{}: cannot open log", paths.log.display()))?;

    let placeholder = method.placeholder_string();
    let template_list = templates::templates(templates_set);
    let mut cache = LatentCache::default();
    let base_lr = t.base_lr();
    let bar = if hooks.progress {
        ProgressBar::new(t.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}",
    )?);
    bar.set_position(start as u64);
    let save = |adam: &AdamW, rng: &SeededNoise, step: usize| -> Result<std::path::PathBuf> {
        let (seed, pos) = rng.state();
        Checkpoint {
            step,
            params: vec![(
                "token_embeddings".to_string(),
                method.vectors.as_tensor().clone(),
            )],
            exp_avg: adam.exp_avg.clone(),
            exp_avg_sq: adam.exp_avg_sq.clone(),
            rng_seed: seed,
            rng_word_pos: pos,
            config: config_text.clone(),
        }
        .save(&paths.checkpoints)
    };

    for step in start..t.steps {
        let started = Instant::now();
        let mut grad_sum: Option<Tensor> = None;
        let mut loss_sum = 0f64;
        for _ in 0..t.grad_accum {
            let mut latents = vec![];
            let mut captions = vec![];
            for _ in 0..t.batch_size {
                let index = rng.rng().gen_range(0..images.len());
                let variant = augment.sample_variant(&images, index, rng.rng());
                let dist = cache.get_or_encode(&variant, || {
                    let pixels = data::render(&images[index], &variant, t.resolution as u32)?
                        .unsqueeze(0)?
                        .to_device(&device)?;
                    sd.vae.encode(&pixels)
                })?;
                let eps = rng.randn(dist.mean.shape().clone(), &device)?;
                let on_device = imprint_models::vae::LatentDistribution {
                    mean: dist.mean.to_device(&device)?,
                    logvar: dist.logvar.to_device(&device)?,
                };
                latents.push(sd.vae.scale_latents(&on_device.sample(&eps)?)?);
                let template = template_list[rng.rng().gen_range(0..template_list.len())];
                captions.push(templates::caption(template, &placeholder));
            }
            let latents = Tensor::cat(&latents, 0)?;
            let noise = rng.randn(latents.shape().clone(), &device)?;
            let timesteps: Vec<usize> = (0..t.batch_size)
                .map(|_| rng.rng().gen_range(0..schedule.num_train_timesteps()))
                .collect();
            let ids = captions
                .iter()
                .map(|c| {
                    Ok(Tensor::new(
                        sd.tokenizer
                            .encode(c)?
                            .iter()
                            .map(|&i| i as i64)
                            .collect::<Vec<_>>(),
                        &device,
                    )?)
                })
                .collect::<Result<Vec<_>>>()?;
            let ids = Tensor::stack(&ids, 0)?;
            let text = method.encode(&sd.text_encoder, &ids)?;
            let loss = diffusion_loss(
                &sd.unet,
                &schedule,
                prediction,
                &latents,
                &noise,
                &timesteps,
                TextConditioning::Shared(&text),
            )?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let grads = (loss / t.grad_accum as f64)?.backward()?;
            let g = grads
                .get(method.vectors.as_tensor())
                .context("no gradient reached the token vectors")?
                .clone();
            grad_sum = Some(match grad_sum {
                None => g,
                Some(s) => (s + g)?,
            });
        }
        let mut grads = vec![grad_sum.expect("grad_accum ≥ 1")];
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        let lr = base_lr * t.lr_schedule.factor(step, t.lr_warmup_steps, t.steps);
        adam.step(&grads, lr)?;
        let done = step + 1;
        let loss = loss_sum / t.grad_accum as f64;
        let line = LogLine {
            step: done,
            loss,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        if let Some(cb) = &hooks.after_step {
            cb(done);
        }
        if let Some(prompt) = &t.validation_prompt {
            if t.validation_every > 0 && done % t.validation_every == 0 && done < t.steps {
                let grid = validate(&sd, &method, prompt, t)?;
                bar.println(format!(
                    "validation grid: {}",
                    save_grid(&paths.validation, done, &grid)?.display()
                ));
            }
        }
        let last = done == t.steps;
        if hooks.interrupt.load(Ordering::SeqCst) && !last {
            let checkpoint = save(&adam, &rng, done)?;
            bar.abandon_with_message(format!("interrupted at step {done}"));
            return Ok(Outcome::Interrupted {
                step: done,
                checkpoint,
            });
        }
        if t.save_every > 0 && done % t.save_every == 0 && !last {
            save(&adam, &rng, done)?;
        }
    }
    bar.finish_with_message("done");
    let concept = Concept {
        trigger: cfg.token.clone(),
        method: "textual-inversion".into(),
        embeddings: vec![TokenEmbedding {
            encoder: "text_encoder".into(),
            vectors: method.vectors.as_tensor().to_device(&Device::Cpu)?,
        }],
        lora: Default::default(),
        base_model: Some(base_model_name(&t.model)),
        metadata: [
            ("steps".to_string(), t.steps.to_string()),
            ("init_word".to_string(), cfg.init_word.clone()),
        ]
        .into(),
    };
    imprint_concepts::formats::save(
        &concept,
        &paths.concept,
        imprint_concepts::formats::Format::Native,
    )?;
    if let Some(prompt) = &t.validation_prompt {
        let grid = validate(&sd, &method, prompt, t)?;
        save_grid(&paths.validation, t.steps, &grid)?;
    }
    Ok(Outcome::Finished { steps: t.steps })
}

/// The base model's folder name, recorded in the concept (where it was trained).
fn base_model_name(model: &std::path::Path) -> String {
    let canonical = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A checkpoint resumes only the same run: same model, images, token and vectors.
fn check_resumable(saved: &str, cfg: &TextualInversionConfig) -> Result<()> {
    let saved: TextualInversionConfig =
        toml::from_str(saved).context("the checkpoint's configuration is unreadable")?;
    let same = saved.token == cfg.token
        && saved.num_vectors == cfg.num_vectors
        && saved.trainer.model == cfg.trainer.model
        && saved.trainer.images == cfg.trainer.images
        && saved.trainer.batch_size == cfg.trainer.batch_size
        && saved.trainer.grad_accum == cfg.trainer.grad_accum
        && saved.trainer.resolution == cfg.trainer.resolution;
    if !same {
        bail!("the checkpoint belongs to another run (model, images, token, vectors, batch or resolution differ)")
    }
    Ok(())
}

/// Images of the validation prompt with the current vectors, as one grid.
fn validate(
    sd: &StableDiffusion,
    method: &TextualInversion,
    prompt: &str,
    t: &crate::config::TrainerOptions,
) -> Result<image::RgbImage> {
    let prompt = prompt.replace(&method.token, &method.placeholder_string());
    let opts = SampleOptions {
        prompt: prompt.clone(),
        steps: t.validation_steps,
        guidance: 7.5,
        ..Default::default()
    };
    let ids = sd.tokenize(&prompt)?;
    let cond = method.encode(&sd.text_encoder, &ids)?.detach();
    let uncond = sd.encode_prompt("", 0)?;
    let context = Tensor::cat(&[uncond, cond], 0)?;
    let f = sd.vae_scale_factor();
    let size = t.resolution / f;
    let mut images = vec![];
    for i in 0..t.num_validation_images.max(1) {
        // Validation has its own seeds: it must not shift the training stream.
        let mut noise = SeededNoise::new(t.seed.wrapping_add(1_000_003).wrapping_add(i as u64));
        let mut scheduler = sd.build_scheduler(opts.scheduler, opts.steps, false)?;
        let init = (noise.randn((1, sd.unet.config.in_channels, size, size), &sd.device)?
            * scheduler.init_noise_sigma())?;
        let latents =
            sd.denoise_with_context(&opts, scheduler.as_mut(), init, 0, &mut noise, &context)?;
        images.push(image_io::tensor_to_rgb(&sd.decode(&latents)?)?);
    }
    image_io::grid(&images)
}

fn save_grid(
    dir: &std::path::Path,
    step: usize,
    grid: &image::RgbImage,
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join(format!("step-{step:06}.png"));
    image_io::save_png(grid, &path)?;
    Ok(path)
}
