//! The training loop every method shares: batches of augmented images with captions, the
//! denoising loss, gradient accumulation and clipping, AdamW with a learning-rate schedule,
//! progress, a JSONL log, validation grids, and checkpoints that resume bit-exactly on CPU.
//! [`train_textual_inversion`] and [`train_lora`] only set their method up and call [`run`].

use crate::checkpoint::Checkpoint;
use crate::config::{
    CustomDiffusionConfig, DreamBoothConfig, LoraConfig, OutputPaths, PerfusionConfig,
    TextualInversionConfig, TrainerOptions,
};
use crate::data::{self, Augment, Crop, LatentCache};
use crate::methods::custom_diffusion::CustomDiffusionMethod;
use crate::methods::dreambooth::DreamBoothMethod;
use crate::methods::extended_textual_inversion::{
    ExtendedTextualInversion, ExtendedTextualInversionMethod,
};
use crate::methods::lora::LoraMethod;
use crate::methods::perfusion::PerfusionMethod;
use crate::methods::textual_inversion::{TextualInversion, TextualInversionMethod};
use crate::methods::{diffusion_loss_with, LossTerms, Method};
use crate::optim::{clip_grad_norm, AdamW};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::TextStates;
use imprint_pipeline::noise::SeededNoise;
use imprint_pipeline::{image_io, SampleOptions, StableDiffusion};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
    Interrupted { step: usize, checkpoint: PathBuf },
}

/// One line of the JSONL log.
#[derive(serde::Serialize)]
struct LogLine {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    seconds: f64,
    /// Cut-Mix-Unmix: the unmix penalty (before its weight), included in `loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    unmix: Option<f64>,
}

fn load_model(t: &TrainerOptions) -> Result<StableDiffusion> {
    t.validate()?;
    OutputPaths::new(&t.out)?;
    if let Some(spec) = validation_image_prompt(t) {
        spec.check().context("--validation-ip-adapter")?;
    }
    let device = imprint_pipeline::parse_device(&t.device)?;
    let mut sd = StableDiffusion::load(&t.model, DType::F32, &device)?;
    if t.second_images.is_some() {
        // One probe shared by every cross-attention layer (Cut-Mix-Unmix's unmix term).
        let probe = Arc::new(imprint_models::attention::UnmixProbe::default());
        for (_, block) in sd.unet.transformer_blocks_in_processor_order_mut() {
            block.attn2.unmix = Some(probe.clone());
        }
    }
    Ok(sd)
}

/// What every method does once its trainable tensors exist: mixed precision (frozen UNet weights
/// to half precision, the trained ones stay f32), then gradient checkpointing.
fn prepare(sd: &mut StableDiffusion, t: &TrainerOptions) -> Result<()> {
    if let Some(dtype) = t.half_dtype() {
        sd.unet.set_mixed_precision(dtype)?;
    }
    if t.gradient_checkpointing {
        sd.unet.enable_gradient_checkpointing()?;
    }
    Ok(())
}

/// The validation's image prompt, if asked for.
fn validation_image_prompt(
    t: &TrainerOptions,
) -> Option<imprint_pipeline::ip_adapter::ImagePromptSpec> {
    Some(imprint_pipeline::ip_adapter::ImagePromptSpec {
        adapter: t.validation_ip_adapter.clone()?,
        images: t.validation_ip_image.clone(),
        image_encoder: t.validation_image_encoder.clone(),
        blocks: None,
    })
}

/// Cut-Mix-Unmix needs the images' own captions (they name the subjects); methods that caption
/// from templates refuse it.
fn refuse_cut_mix(t: &TrainerOptions, method: &str) -> Result<()> {
    if t.second_images.is_some() {
        bail!("Cut-Mix-Unmix (--second-images) trains methods captioned by instance prompts (svdiff, lora, dreambooth); {method} captions from templates")
    }
    Ok(())
}

/// The unmix probe the model carries when training with cut-mix samples.
fn unmix_probe(sd: &StableDiffusion) -> Option<Arc<imprint_models::attention::UnmixProbe>> {
    let transformers = sd.unet.transformers();
    let block = transformers.first()?.transformer_blocks.first()?;
    block.attn2.unmix.clone()
}

/// Cut-Mix-Unmix's training set: the second subject's images (captioned by their `IMAGE.txt` or
/// the second instance prompt) and the cut-mix images of both subjects.
fn cut_mix_images(
    t: &TrainerOptions,
    first: &[data::TrainImage],
) -> Result<(Vec<data::TrainImage>, Vec<data::TrainImage>)> {
    let Some(dir) = &t.second_images else {
        return Ok((vec![], vec![]));
    };
    let folder = data::load_image_folder(dir, (t.resolution / 2) as u32)
        .with_context(|| format!("--second-images {}", dir.display()))?;
    for w in &folder.warnings {
        eprintln!("warning: {w}");
    }
    let mut second = vec![];
    for img in &folder.images {
        let mut img = img.resized_for(t.resolution as u32);
        if img.caption.is_none() {
            img.caption = Some(t.second_instance_prompt.clone().with_context(|| {
                format!(
                    "{}: no caption; give --second-instance-prompt (e.g. \"a photo of zwx cat\") or an IMAGE.txt",
                    img.path.display()
                )
            })?);
        }
        second.push(img);
    }
    let subjects = t.subjects.as_deref().unwrap_or_default();
    let [a, b] = subjects else {
        bail!("--subjects needs two phrases")
    };
    let mixed = data::cut_mix(
        first,
        &second,
        [a.as_str(), b.as_str()],
        t.cut_mix_prompt
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_CUT_MIX_PROMPT),
        t.resolution as u32,
        200,
    )?;
    Ok((second, mixed))
}

/// The checkpoint to resume from, refused if it belongs to another run.
fn load_resume(t: &TrainerOptions, config_text: &str) -> Result<Option<Checkpoint>> {
    let Some(path) = &t.resume else {
        return Ok(None);
    };
    let ck = Checkpoint::load(path)?;
    check_resumable(&ck.config, config_text).with_context(|| path.display().to_string())?;
    Ok(Some(ck))
}

/// Trains a textual-inversion concept as `cfg` says; see the crate docs for the files it writes.
pub fn train_textual_inversion(cfg: &TextualInversionConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    refuse_cut_mix(t, "Textual Inversion")?;
    let templates = cfg.templates.parse()?;
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let ti = match &cfg.init_concept {
        None => TextualInversion::new(
            &mut sd.tokenizer,
            &sd.text_encoder,
            &cfg.token,
            &cfg.init_word,
            cfg.num_vectors,
        )?,
        Some(path) => {
            let c = imprint_concepts::formats::load_any(path)?;
            let e = c
                .embedding(imprint_concepts::TEXT_ENCODER)
                .with_context(|| {
                    format!("{}: --init-concept has no token embedding", path.display())
                })?;
            if e.num_vectors() != cfg.num_vectors {
                bail!(
                    "{}: --init-concept has {} vector(s) but --num-vectors is {}",
                    path.display(),
                    e.num_vectors(),
                    cfg.num_vectors
                )
            }
            TextualInversion::with_vectors(
                &mut sd.tokenizer,
                &sd.text_encoder,
                &cfg.token,
                &e.vectors,
            )?
        }
    };
    let method = TextualInversionMethod {
        ti,
        templates,
        init_word: cfg.init_word.clone(),
    };
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// Trains an Extended Textual Inversion (P+) concept: Textual Inversion's options, one vector set
/// per cross-attention layer.
pub fn train_extended_textual_inversion(
    cfg: &TextualInversionConfig,
    hooks: &Hooks,
) -> Result<Outcome> {
    let t = &cfg.trainer;
    refuse_cut_mix(t, "P+")?;
    if cfg.init_concept.is_some() {
        bail!("--init-concept starts Textual Inversion; P+ starts from its init word")
    }
    let templates = cfg.templates.parse()?;
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let xti = ExtendedTextualInversion::new(&mut sd, &cfg.token, &cfg.init_word, cfg.num_vectors)?;
    let method = ExtendedTextualInversionMethod {
        xti,
        templates,
        init_word: cfg.init_word.clone(),
    };
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// Trains a Perfusion concept as `cfg` says.
pub fn train_perfusion(cfg: &PerfusionConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    refuse_cut_mix(t, "Perfusion")?;
    let templates = cfg.templates.parse()?;
    if !(cfg.value_lr > 0.0) || !(cfg.tau > 0.0) || !cfg.beta.is_finite() {
        bail!("--value-lr and --tau must be positive and --beta finite")
    }
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let method = PerfusionMethod::attach(
        &mut sd,
        &t.model,
        &cfg.token,
        &cfg.superclass,
        templates,
        cfg.value_lr / t.base_lr(),
        cfg.beta,
        cfg.tau,
    )?;
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// Trains a Custom Diffusion concept; writes diffusers' folder at `out` and the native file
/// `out.safetensors` (see `methods::custom_diffusion`). With `--rank`, reports what the
/// compression costs: the native file's size and how far an 8-step sample moves.
pub fn train_custom_diffusion(cfg: &CustomDiffusionConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    // Its resize augmentation and masked loss would not follow the cut-mix regions.
    refuse_cut_mix(t, "Custom Diffusion")?;
    if t.out.exists() {
        bail!(
            "{}: already exists; Custom Diffusion writes a new folder there",
            t.out.display()
        )
    }
    if cfg.rank == Some(0) {
        bail!("--rank must be at least 1")
    }
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let method = CustomDiffusionMethod::attach(
        &mut sd,
        &cfg.token,
        &cfg.init_word,
        cfg.instance_prompt.clone(),
        cfg.train_q_out,
        t.class_prompt.is_some(),
        cfg.augment,
        cfg.rank,
    )?;
    prepare(&mut sd, t)?;
    let outcome = run(&sd, &method, t, &config_text, resume, hooks)?;
    drop(sd);
    if let (Outcome::Finished { .. }, Some(rank)) = (&outcome, cfg.rank) {
        let native = CustomDiffusionMethod::native_path(&t.out);
        let bytes = std::fs::metadata(&native)?.len();
        let prompt = cfg
            .instance_prompt
            .clone()
            .unwrap_or_else(|| format!("a photo of {}", cfg.token[0]));
        let diff = compression_cost(t, &t.out, &native, &prompt)?;
        let note = format!(
            "rank {rank}: {} is {bytes} bytes; an 8-step sample of \"{prompt}\" moves by {diff:.2e} (max |Δ| / max |full|) against the full weights",
            native.display()
        );
        eprintln!("{note}");
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(OutputPaths::new(&t.out)?.log)?;
        writeln!(log, "{}", serde_json::json!({ "compression": note }))?;
    }
    Ok(outcome)
}

/// The relative difference of 8-step DDIM samples with the full concept and the compressed one.
fn compression_cost(
    t: &TrainerOptions,
    full: &Path,
    compressed: &Path,
    prompt: &str,
) -> Result<f64> {
    let device = imprint_pipeline::parse_device(&t.device)?;
    let mut latents = vec![];
    for concept in [full, compressed] {
        let mut sd = StableDiffusion::load(&t.model, DType::F32, &device)?;
        sd.apply_concept(concept, 1.0)?;
        let opts = SampleOptions {
            prompt: prompt.to_string(),
            steps: 8,
            guidance: 7.5,
            ..Default::default()
        };
        let size = t.resolution / sd.vae_scale_factor();
        let mut noise = SeededNoise::new(t.seed);
        let init = noise.randn((1, sd.unet.config.out_channels, size, size), &device)?;
        latents.push(sd.sample(&opts, &init, &mut noise)?);
    }
    let scale = latents[0].abs()?.max_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let diff = (&latents[0] - &latents[1])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()? as f64;
    Ok(diff / scale)
}

/// Trains a LoRA as `cfg` says.
pub fn train_lora(cfg: &LoraConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    if cfg.dropout != 0.0 && t.gradient_checkpointing {
        bail!("--dropout with --gradient-checkpointing is not supported: the recomputed blocks would draw other masks")
    }
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let method = LoraMethod::attach(
        &mut sd,
        &cfg.targets,
        cfg.rank,
        cfg.alpha,
        cfg.train_text_encoder,
        cfg.instance_prompt.clone(),
        t.seed,
        cfg.dropout,
    )?;
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// Trains SVDiff's spectral shifts as `cfg` says; writes the native concept file.
pub fn train_svdiff(cfg: &crate::config::SvdiffConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let method = crate::methods::svdiff::SvdiffMethod::attach(
        &mut sd,
        cfg.train_text_encoder,
        cfg.instance_prompt.clone(),
        cfg.token.clone(),
    )?;
    eprintln!(
        "svdiff: {} spectral shifts train ({} bytes as f32)",
        method.parameter_count(),
        4 * method.parameter_count()
    );
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// Fine-tunes the whole UNet (and optionally the text encoder) as `cfg` says; writes a model folder.
pub fn train_dreambooth(cfg: &DreamBoothConfig, hooks: &Hooks) -> Result<Outcome> {
    let t = &cfg.trainer;
    if t.out.exists() {
        bail!(
            "{}: already exists; DreamBooth writes a new model folder there",
            t.out.display()
        )
    }
    let config_text = toml::to_string(cfg)?;
    let mut sd = load_model(t)?;
    let resume = load_resume(t, &config_text)?;
    let method = DreamBoothMethod::setup(
        &mut sd,
        cfg.train_text_encoder,
        cfg.instance_prompt.clone(),
        cfg.extract_lora,
    )?;
    prepare(&mut sd, t)?;
    run(&sd, &method, t, &config_text, resume, hooks)
}

/// The shared loop: trains `method`'s tensors on `sd` and writes the concept and its companions.
pub fn run(
    sd: &StableDiffusion,
    method: &dyn Method,
    t: &TrainerOptions,
    config_text: &str,
    resume: Option<Checkpoint>,
    hooks: &Hooks,
) -> Result<Outcome> {
    // Loaded (and tried on a copy of the UNet) before anything is written: a broken image prompt
    // must fail the run at its start, not at the first validation.
    let image_prompt = match validation_image_prompt(t) {
        Some(spec) => {
            let prompt = spec
                .load(sd.dtype, &sd.device)
                .context("--validation-ip-adapter")?;
            prompt.attach(&mut sd.unet.clone())?;
            Some(prompt)
        }
        None => None,
    };
    let paths = OutputPaths::new(&t.out)?;
    let device = sd.device.clone();
    let prediction = sd.scheduler_config.prediction()?;
    let schedule = NoiseSchedule::new(&sd.scheduler_config)?;

    match (t.inpainting, sd.unet.config.in_channels) {
        (true, 9) | (false, 4) => {}
        (true, c) => bail!("--inpainting trains an inpainting model (a UNet with 9 input channels); this one has {c}"),
        (false, 9) => bail!("this model is an inpainting model (a UNet with 9 input channels): add --inpainting"),
        (false, c) => bail!("the UNet has {c} input channels; imprint trains 4-channel models and, with --inpainting, 9-channel ones"),
    }
    let folder = data::load_image_folder(&t.images, (t.resolution / 2) as u32)?;
    for w in &folder.warnings {
        eprintln!("warning: {w}");
    }
    // Shrink each photo once to its training size: renders are then only crops.
    let mut images: Vec<_> = folder
        .images
        .iter()
        .map(|i| i.resized_for(t.resolution as u32))
        .collect();
    // Cut-Mix-Unmix: the second subject's images join the first's; the cut-mix images follow
    // them, drawn with their own probability.
    let (second, mixed) = cut_mix_images(t, &images)?;
    for m in &mixed {
        // Every cut-mix caption must fit the text encoder and name both subjects apart.
        let caption = m.caption.as_deref().unwrap_or_default();
        let ids: Vec<i64> = sd.tokenize(caption)?.flatten_all()?.to_vec1()?;
        let mut seen = std::collections::BTreeSet::new();
        for r in &m.regions {
            let at = sd
                .word_positions(&ids, &r.phrase)
                .with_context(|| format!("cut-mix subject '{}' in \"{caption}\"", r.phrase))?;
            if at.iter().any(|p| !seen.insert(*p)) {
                bail!("the cut-mix subjects overlap in \"{caption}\": give --subjects two phrases neither of which contains the other")
            }
        }
    }
    images.extend(second);
    let singles = images.len();
    images.extend(mixed);
    let mix = (images.len() > singles).then(|| {
        (
            singles,
            t.cut_mix_prob
                .unwrap_or(crate::config::DEFAULT_CUT_MIX_PROB),
        )
    });
    let probe = unmix_probe(sd);
    let unmix_weight = t
        .unmix_weight
        .unwrap_or(crate::config::DEFAULT_UNMIX_WEIGHT);
    let augment = Augment {
        resolution: t.resolution as u32,
        crop: if t.crop == "random" {
            Crop::Random
        } else {
            Crop::Center
        },
        flip: t.flip,
    };

    let trainable = method.trainable();
    if let Some(side) = &sd.unet.gradient_checkpointing {
        side.watch(trainable.iter().map(|(_, v)| v.as_tensor()));
    }
    let vars: Vec<_> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut adam = AdamW::new(vars, t.adam)?;
    adam.lr_scales = trainable.iter().map(|(n, _)| method.lr_scale(n)).collect();
    // Shared with the fused backward's gradient sink, which updates weights mid-backward.
    let adam = Arc::new(Mutex::new(adam));
    // fp16: dynamic loss scaling, as PyTorch's GradScaler.
    let mut scaler = (t.mixed_precision == "fp16").then(LossScaler::default);
    let (mut rng, start) = match &resume {
        None => (SeededNoise::new(t.seed), 0),
        Some(ck) => {
            let mut adam = lock(&adam)?;
            for (i, (name, var)) in trainable.iter().enumerate() {
                let j = ck
                    .params
                    .iter()
                    .position(|(n, _)| n == name)
                    .with_context(|| format!("the checkpoint lacks '{name}'"))?;
                var.set(&ck.params[j].1.to_device(&device)?)?;
                adam.exp_avg[i] = ck.exp_avg[j].to_device(&device)?;
                adam.exp_avg_sq[i] = ck.exp_avg_sq[j].to_device(&device)?;
            }
            adam.step = ck.step;
            let (scaler_state, method_state): (Vec<_>, Vec<_>) = ck
                .state
                .iter()
                .cloned()
                .partition(|(n, _)| n.starts_with(LossScaler::PREFIX));
            if let Some(s) = &mut scaler {
                s.restore(&scaler_state)?;
            }
            method.restore_state(&method_state)?;
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

    let class = match (&t.class_prompt, &t.class_images) {
        (Some(prompt), Some(dir)) => Some((prompt.clone(), class_images(sd, dir, prompt, t)?)),
        _ => None,
    };
    let batcher = Batcher {
        sd,
        t,
        augment: &augment,
        timesteps: schedule.num_train_timesteps(),
    };
    // Latent distributions per augmentation variant, one cache per image set.
    let (mut cache, mut class_cache) = (LatentCache::default(), LatentCache::default());
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
    let save = |adam: &AdamW,
                rng: &SeededNoise,
                scaler: &Option<LossScaler>,
                step: usize|
     -> Result<PathBuf> {
        let (seed, pos) = rng.state();
        let mut state = method.state()?;
        if let Some(s) = scaler {
            state.extend(s.state()?);
        }
        Checkpoint {
            step,
            params: trainable
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect(),
            exp_avg: adam.exp_avg.clone(),
            exp_avg_sq: adam.exp_avg_sq.clone(),
            rng_seed: seed,
            rng_word_pos: pos,
            config: config_text.to_string(),
            state,
        }
        .save(&paths.checkpoints)
    };

    for step in start..t.steps {
        let started = Instant::now();
        let lr = base_lr * t.lr_schedule.factor(step, t.lr_warmup_steps, t.steps);
        let fused = match (&sd.unet.gradient_checkpointing, t.fused_backward) {
            (Some(side), true) => Some(FusedStep::install(side, &trainable, &adam, lr)),
            _ => None,
        };
        let mut grad_sums: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0f64;
        let mut unmix_sum = 0f64;
        for micro in 0..t.grad_accum {
            // Training-time randomness inside the method (LoRA dropout), keyed for exact resume.
            method.begin_forward(Some(
                t.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((step as u64) << 20) ^ micro as u64
                    | 1,
            ));
            let batch = make_batch(
                &batcher,
                &mut cache,
                &images,
                &mut rng,
                method.resize_augmentation(),
                &|img, rng| method.caption(img, rng),
                mix,
            )?;
            let text = method.text_states(sd, &batch.ids)?;
            if let Some(probe) = &probe {
                probe.set_regions(batch.regions.clone());
            }
            let terms = LossTerms {
                mask: batch.mask.as_ref(),
                snr_gamma: t.snr_gamma,
                normalize_by_mask: method.mask_normalized_loss(),
                extra_input: batch.inpaint.as_ref(),
            };
            let mut loss = diffusion_loss_with(
                &sd.unet,
                &schedule,
                prediction,
                &batch.latents,
                &batch.noise,
                &batch.timesteps,
                text.conditioning(),
                terms,
            )?;
            if let Some(probe) = &probe {
                // Cut-Mix-Unmix: each subject's tokens should not be attended to where the other
                // subject lies; the penalty is averaged over layers (zero without cut-mix rows).
                let penalties = probe.take_penalties();
                if !penalties.is_empty() {
                    let unmix = Tensor::stack(&penalties, 0)?.mean_all()?;
                    unmix_sum += unmix.to_scalar::<f32>()? as f64;
                    loss = (loss + (unmix * unmix_weight)?)?;
                }
            }
            if let Some((prompt, class_images)) = &class {
                // Prior preservation: the same loss on the model's own class images, weighted.
                let batch = make_batch(
                    &batcher,
                    &mut class_cache,
                    class_images,
                    &mut rng,
                    false,
                    &|_, _| prompt.clone(),
                    None,
                )?;
                let text = method.text_states(sd, &batch.ids)?;
                let terms = LossTerms {
                    mask: None,
                    snr_gamma: t.snr_gamma,
                    normalize_by_mask: false,
                    extra_input: batch.inpaint.as_ref(),
                };
                let prior = diffusion_loss_with(
                    &sd.unet,
                    &schedule,
                    prediction,
                    &batch.latents,
                    &batch.noise,
                    &batch.timesteps,
                    text.conditioning(),
                    terms,
                )?;
                loss = (loss + (prior * t.prior_weight)?)?;
            }
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            let grads = (loss * (loss_scale / t.grad_accum as f64))?.backward()?;
            if let Some(fused) = &fused {
                // Every weight not stepped during the backward pass (outside the recomputed
                // blocks) is stepped now, with the same update.
                fused.finish(&grads, &trainable)?;
                continue;
            }
            let mut these = vec![];
            for (name, var) in &trainable {
                // Inside recomputed blocks the gradient arrives through the checkpointing store.
                let side = sd
                    .unet
                    .gradient_checkpointing
                    .as_ref()
                    .and_then(|s| s.take(var.as_tensor()));
                // A parameter the loss does not reach yet (a LoRA up matrix starts at zero, so its
                // down matrix gets no gradient on the first step) has a zero gradient.
                these.push(match (grads.get(var.as_tensor()), side) {
                    (Some(g), Some(s)) => (g + s)?,
                    (Some(g), None) => g.clone(),
                    (None, Some(s)) => s,
                    (None, None) => var.zeros_like().with_context(|| name.clone())?,
                });
            }
            if let Some(side) = &sd.unet.gradient_checkpointing {
                side.clear();
            }
            grad_sums = Some(match grad_sums {
                None => these,
                Some(sums) => sums
                    .iter()
                    .zip(these)
                    .map(|(s, g)| s + g)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let grad_norm = match (fused, grad_sums) {
            (Some(fused), _) => fused.grad_norm(),
            (None, Some(mut grads)) => {
                let finite = match &mut scaler {
                    Some(s) => s.unscale(&mut grads)?,
                    None => true,
                };
                if finite {
                    let norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
                    lock(&adam)?.step(&grads, lr)?;
                    norm
                } else {
                    // fp16 overflow: the step is skipped and the loss scale halved.
                    f64::NAN
                }
            }
            (None, None) => bail!("no gradients: grad-accum must be at least 1"),
        };
        method.after_step()?;
        let done = step + 1;
        let loss = loss_sum / t.grad_accum as f64;
        let line = LogLine {
            step: done,
            loss,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
            unmix: probe.as_ref().map(|_| unmix_sum / t.grad_accum as f64),
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        if let Some(cb) = &hooks.after_step {
            cb(done);
        }
        if let Some(prompt) = &t.validation_prompt {
            if t.validation_every > 0 && done % t.validation_every == 0 && done < t.steps {
                let grid = validate(sd, method, prompt, t, image_prompt.as_ref())?;
                bar.println(format!(
                    "validation grid: {}",
                    save_grid(&paths.validation, done, &grid)?.display()
                ));
            }
        }
        let last = done == t.steps;
        if hooks.interrupt.load(Ordering::SeqCst) && !last {
            let checkpoint = save(&*lock(&adam)?, &rng, &scaler, done)?;
            bar.abandon_with_message(format!("interrupted at step {done}"));
            return Ok(Outcome::Interrupted {
                step: done,
                checkpoint,
            });
        }
        if t.save_every > 0 && done % t.save_every == 0 && !last {
            save(&*lock(&adam)?, &rng, &scaler, done)?;
        }
    }
    bar.finish_with_message("done");
    method.save(&paths.concept, Some(base_model_name(&t.model)), t.steps)?;
    if let Some(prompt) = &t.validation_prompt {
        let grid = validate(sd, method, prompt, t, image_prompt.as_ref())?;
        save_grid(&paths.validation, t.steps, &grid)?;
    }
    Ok(Outcome::Finished { steps: t.steps })
}

/// Dynamic loss scaling for fp16 mixed precision, as PyTorch's `GradScaler`: the loss is
/// multiplied by `scale` before the backward pass so small gradients survive half precision, the
/// gradients are divided by it before the update, a step with a non-finite gradient is skipped
/// and the scale halved, and after 2000 clean steps in a row the scale doubles.
struct LossScaler {
    scale: f64,
    clean_steps: usize,
    /// Steps skipped in a row: fp16 overflowing in the forward pass itself skips every step.
    skipped: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            clean_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    const PREFIX: &'static str = "loss_scaler.";
    const GROWTH_INTERVAL: usize = 2000;
    /// Halvings in a row after which the run stops: 2⁻²⁰ of the starting scale.
    const MAX_SKIPPED: usize = 20;

    /// Divides `grads` by the scale; false (and the scale halved) if any is not finite.
    fn unscale(&mut self, grads: &mut [Tensor]) -> Result<bool> {
        let mut sums = Vec::with_capacity(grads.len());
        for g in grads.iter_mut() {
            *g = (&*g / self.scale)?;
            sums.push(g.abs()?.sum_all()?.to_dtype(DType::F32)?);
        }
        // One read back for all of them: a non-finite entry makes the total non-finite.
        let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
        let finite = total.is_finite();
        if finite {
            self.skipped = 0;
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.clean_steps = 0;
            self.skipped += 1;
            eprintln!(
                "fp16: non-finite gradients, step skipped, loss scale now {}",
                self.scale
            );
            if self.skipped >= Self::MAX_SKIPPED {
                bail!("fp16: {} steps in a row overflowed (loss scale down to {}): the model overflows in fp16 itself; use --mixed-precision bf16 or no", self.skipped, self.scale)
            }
        }
        Ok(finite)
    }

    /// The scaler's state as checkpoint tensors, so a resumed run continues with the same scale.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        // On the CPU: the checkpoint is written from there, and every backend holds an f64.
        let device = &candle_core::Device::Cpu;
        Ok(vec![
            (
                format!("{}scale", Self::PREFIX),
                Tensor::new(self.scale, device)?,
            ),
            (
                format!("{}clean_steps", Self::PREFIX),
                Tensor::new(self.clean_steps as f64, device)?,
            ),
        ])
    }

    fn restore(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        for (name, t) in state {
            let v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            match name.strip_prefix(Self::PREFIX) {
                Some("scale") => self.scale = v,
                Some("clean_steps") => self.clean_steps = v as usize,
                _ => bail!("checkpoint: unknown loss-scaler entry '{name}'"),
            }
        }
        Ok(())
    }
}

/// Draws training examples: images, augmentation, cached latents, noise, timesteps, token ids.
struct Batcher<'a> {
    sd: &'a StableDiffusion,
    t: &'a TrainerOptions,
    augment: &'a Augment,
    timesteps: usize,
}

struct Batch {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    ids: Tensor,
    /// `[B, 1, h, w]` when every image of the batch has a mask and masks are on.
    mask: Option<Tensor>,
    /// Inpainting runs: `[B, 5, h, w]`, the random mask and the masked image's latents.
    inpaint: Option<Tensor>,
    /// Where each subject of the batch's cut-mix images lies, for the unmix term.
    regions: Vec<imprint_models::attention::RegionMask>,
}

/// One batch of `batch_size` examples from `images` (the instance or the class set). `mix`:
/// Cut-Mix-Unmix's instance set, whose images from this index on are cut-mix images, drawn with
/// this probability.
fn make_batch(
    b: &Batcher,
    cache: &mut LatentCache,
    images: &[data::TrainImage],
    rng: &mut SeededNoise,
    zoom: bool,
    caption: &dyn Fn(&data::TrainImage, &mut rand_chacha::ChaCha20Rng) -> String,
    mix: Option<(usize, f64)>,
) -> Result<Batch> {
    let (sd, t) = (b.sd, b.t);
    let device = &sd.device;
    let mut latents = vec![];
    let mut captions = vec![];
    let mut masks = vec![];
    let mut inpaint = vec![];
    let mut regions = vec![];
    for row in 0..t.batch_size {
        let index = match mix {
            // The extra draw only with cut-mix images, so other runs keep their random stream.
            Some((singles, p)) => {
                if rng.rng().gen_bool(p) {
                    rng.rng().gen_range(singles..images.len())
                } else {
                    rng.rng().gen_range(0..singles)
                }
            }
            None => rng.rng().gen_range(0..images.len()),
        };
        let mut variant = b.augment.sample_variant(images, index, rng.rng());
        if !images[index].regions.is_empty() {
            variant.flip = false;
            regions.push((row, index));
        }
        if zoom && images[index].regions.is_empty() {
            variant.zoom = Some(data::Zoom::sample(t.resolution as u32, rng.rng()));
        }
        let dist = cache.get_or_encode(&variant, || {
            let pixels = data::render(&images[index], &variant, t.resolution as u32)?
                .unsqueeze(0)?
                .to_device(device)?;
            sd.vae.encode(&pixels)
        })?;
        let eps = rng.randn(dist.mean.shape().clone(), device)?;
        let on_device = imprint_models::vae::LatentDistribution {
            mean: dist.mean.to_device(device)?,
            logvar: dist.logvar.to_device(device)?,
        };
        latents.push(sd.vae.scale_latents(&on_device.sample(&eps)?)?);
        if t.inpainting {
            inpaint.push(inpainting_input(sd, &images[index], &variant, t, rng)?);
        }
        let text = caption(&images[index], rng.rng());
        if let Some(z) = variant.zoom {
            let prefix = z.caption_prefix(t.resolution as u32, rng.rng());
            captions.push(format!("{prefix}{text}"));
            // The loss covers where the zoomed view lies (the subject mask is not used).
            masks.push(Some(
                z.mask(t.resolution as u32, sd.vae_scale_factor() as u32)?,
            ));
            continue;
        }
        captions.push(text);
        if t.use_masks {
            masks.push(data::render_mask(
                &images[index],
                &variant,
                t.resolution as u32,
                sd.vae_scale_factor() as u32,
            )?);
        }
    }
    let latents = Tensor::cat(&latents, 0)?;
    let mut noise = rng.randn(latents.shape().clone(), device)?;
    if t.noise_offset != 0.0 {
        // diffusers' noise offset: a per-sample, per-channel constant added to the noise.
        let (n, c, _, _) = latents.dims4()?;
        noise = noise.broadcast_add(&(rng.randn((n, c, 1, 1), device)? * t.noise_offset)?)?;
    }
    let timesteps: Vec<usize> = (0..t.batch_size)
        .map(|_| rng.rng().gen_range(0..b.timesteps))
        .collect();
    let ids = captions
        .iter()
        .map(|c| sd.tokenize(c))
        .collect::<Result<Vec<_>>>()?;
    let regions = subject_regions(sd, &ids, images, &regions, t.resolution)?;
    let mask = if !masks.is_empty() && masks.iter().all(Option::is_some) {
        let m: Vec<Tensor> = masks.into_iter().flatten().collect();
        Some(Tensor::stack(&m, 0)?.to_device(device)?)
    } else {
        None
    };
    Ok(Batch {
        latents,
        noise,
        timesteps,
        ids: Tensor::cat(&ids, 0)?,
        mask,
        inpaint: if inpaint.is_empty() {
            None
        } else {
            Some(Tensor::cat(&inpaint, 0)?)
        },
        regions,
    })
}

/// An inpainting example's extra UNet input `[1, 5, h, w]`: a random mask of the rendered view
/// (nearest-downsampled to the latent grid) and the latents of the view with the mask's region
/// blanked (diffusers' DreamBooth-inpaint script: `image * (mask < 0.5)`, encoded, scaled).
fn inpainting_input(
    sd: &StableDiffusion,
    image: &data::TrainImage,
    variant: &data::Variant,
    t: &TrainerOptions,
    rng: &mut SeededNoise,
) -> Result<Tensor> {
    let device = &sd.device;
    let r = t.resolution;
    let mask = data::random_inpainting_mask(r as u32, rng.rng());
    let f = sd.vae_scale_factor();
    let g = r / f;
    let latent: Vec<f32> = (0..g * g)
        .map(|i| mask[(i / g) * f * r + (i % g) * f])
        .collect();
    let keep: Vec<f32> = mask.iter().map(|m| 1.0 - m).collect();
    let pixels = data::render(image, variant, r as u32)?
        .unsqueeze(0)?
        .to_device(device)?;
    let keep = Tensor::from_vec(keep, (1, 1, r, r), device)?;
    let dist = sd.vae.encode(&pixels.broadcast_mul(&keep)?)?;
    let eps = rng.randn(dist.mean.shape().clone(), device)?;
    let masked = sd.vae.scale_latents(&dist.sample(&eps)?)?;
    let latent = Tensor::from_vec(latent, (1, 1, g, g), device)?;
    Ok(Tensor::cat(&[&latent, &masked], 1)?)
}

/// The attention regions of a batch's cut-mix rows: each subject's phrase located in its row's
/// caption, and its columns as a mask on the latent grid.
fn subject_regions(
    sd: &StableDiffusion,
    ids: &[Tensor],
    images: &[data::TrainImage],
    rows: &[(usize, usize)],
    resolution: usize,
) -> Result<Vec<imprint_models::attention::RegionMask>> {
    let f = sd.vae_scale_factor();
    let g = resolution / f;
    let mut out = vec![];
    for &(row, index) in rows {
        let row_ids: Vec<i64> = ids[row].flatten_all()?.to_vec1()?;
        for r in &images[index].regions {
            let tokens = sd.word_positions(&row_ids, &r.phrase).with_context(|| {
                format!(
                    "cut-mix subject '{}' in the caption of {}",
                    r.phrase,
                    images[index].path.display()
                )
            })?;
            let (x0, x1) = (r.columns.0 as usize / f, (r.columns.1 as usize).div_ceil(f));
            let mask: Vec<f32> = (0..g * g)
                .map(|i| f32::from(u8::from((x0..x1).contains(&(i % g)))))
                .collect();
            out.push(imprint_models::attention::RegionMask {
                tokens,
                mask: Tensor::from_vec(mask, (g, g), &sd.device)?,
                rows: vec![row],
            });
        }
    }
    Ok(out)
}

/// The class images for prior preservation: those in `dir`, completed to `num_class_images` by
/// generating with the base model (kept for the next run).
fn class_images(
    sd: &StableDiffusion,
    dir: &Path,
    prompt: &str,
    t: &TrainerOptions,
) -> Result<Vec<data::TrainImage>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the class-images folder", dir.display()))?;
    let existing = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .count();
    if existing < t.num_class_images {
        if sd.unet.config.in_channels != 4 {
            bail!(
                "{}: {existing} class images, {} asked for; an inpainting model cannot generate the rest here: put {} class images in the folder (or lower --num-class-images)",
                dir.display(),
                t.num_class_images,
                t.num_class_images
            )
        }
        let missing = t.num_class_images - existing;
        let bar = ProgressBar::new(missing as u64);
        bar.set_style(ProgressStyle::with_template(
            "generating class images [{bar:30}] {pos}/{len}, ETA {eta}",
        )?);
        for i in existing..t.num_class_images {
            let opts = imprint_pipeline::GenerateOptions {
                prompt: prompt.to_string(),
                scheduler: imprint_models::schedulers::SchedulerKind::DpmPlusPlus2M,
                steps: 25,
                seed: t.seed.wrapping_add(7919).wrapping_add(i as u64),
                width: Some(t.resolution),
                height: Some(t.resolution),
                ..Default::default()
            };
            let image = sd.generate(&opts)?.remove(0);
            image_io::save_png(&image, &dir.join(format!("class-{i:05}.png")))?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let folder = data::load_image_folder(dir, (t.resolution / 2) as u32)?;
    for w in &folder.warnings {
        eprintln!("warning: {w}");
    }
    Ok(folder
        .images
        .iter()
        .map(|i| i.resized_for(t.resolution as u32))
        .collect())
}

/// The base model's folder name, recorded in the concept (where it was trained).
fn base_model_name(model: &Path) -> String {
    let canonical = model.canonicalize().unwrap_or_else(|_| model.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Keys that may change between an interrupted run and its resumption.
const RESUMABLE_CHANGES: &[&str] = &[
    "steps",
    "resume",
    "save-every",
    "validation-prompt",
    "validation-every",
    "num-validation-images",
    "validation-steps",
    "validation-ip-adapter",
    "validation-ip-image",
    "validation-image-encoder",
    "device",
];

/// A checkpoint resumes only the same run: every setting but the ones above must match.
fn check_resumable(saved: &str, current: &str) -> Result<()> {
    let saved: toml::Table = saved
        .parse()
        .context("the checkpoint's configuration is unreadable")?;
    let current: toml::Table = current.parse()?;
    let keys: std::collections::BTreeSet<&String> = saved.keys().chain(current.keys()).collect();
    for k in keys {
        if !RESUMABLE_CHANGES.contains(&k.as_str()) && saved.get(k) != current.get(k) {
            bail!(
                "the checkpoint belongs to another run: '{k}' differs ({:?} then, {:?} now)",
                saved.get(k),
                current.get(k)
            )
        }
    }
    Ok(())
}

/// Images of the validation prompt with the current trained tensors, as one grid. An image
/// prompt is attached to a copy of the model (its modules share the trained tensors), so the
/// training forward never sees the adapter's branch.
fn validate(
    sd: &StableDiffusion,
    method: &dyn Method,
    prompt: &str,
    t: &TrainerOptions,
    image_prompt: Option<&imprint_pipeline::ip_adapter::ImagePrompt>,
) -> Result<image::RgbImage> {
    let with_adapter;
    let sd = match image_prompt {
        Some(p) => {
            let mut copy = sd.clone();
            copy.apply_image_prompt(p)?;
            with_adapter = copy;
            &with_adapter
        }
        None => sd,
    };
    method.begin_forward(None);
    let prompt = method.prompt(prompt);
    let opts = SampleOptions {
        prompt: prompt.clone(),
        steps: t.validation_steps,
        guidance: 7.5,
        ..Default::default()
    };
    let cond = method.text_states(sd, &sd.tokenize(&prompt)?)?.detach();
    let uncond = method.text_states(sd, &sd.tokenize("")?)?.detach();
    let context = TextStates::cat(&[
        &sd.with_image_prompt(uncond, false)?,
        &sd.with_image_prompt(cond, true)?,
    ])?;
    let size = t.resolution / sd.vae_scale_factor();
    let mut images = vec![];
    for i in 0..t.num_validation_images.max(1) {
        // Validation has its own seeds: it must not shift the training stream.
        let mut noise = SeededNoise::new(t.seed.wrapping_add(1_000_003).wrapping_add(i as u64));
        let mut scheduler = sd.build_scheduler(opts.scheduler, opts.steps, false)?;
        let init = (noise.randn((1, sd.unet.config.out_channels, size, size), &sd.device)?
            * scheduler.init_noise_sigma())?;
        // An inpainting model samples with everything to repaint on a blank (mid-gray) image.
        let inpaint = if sd.unet.config.in_channels == 9 {
            let (c, r) = (sd.unet.config.out_channels, t.resolution);
            let blank = Tensor::zeros((1, 3, r, r), DType::F32, &sd.device)?;
            let masked = sd.vae.scale_latents(&sd.vae.encode(&blank)?.mean)?;
            let zeros = Tensor::zeros((1, c, size, size), DType::F32, &sd.device)?;
            Some(imprint_pipeline::Inpainting {
                mask: Tensor::ones((1, 1, size, size), DType::F32, &sd.device)?,
                image_latents: zeros.clone(),
                masked_image_latents: Some(masked),
                noise: zeros,
            })
        } else {
            None
        };
        let latents = sd.denoise_loop(
            &opts,
            scheduler.as_mut(),
            init,
            0,
            &mut noise,
            &context,
            inpaint.as_ref(),
        )?;
        images.push(image_io::tensor_to_rgb(&sd.decode(&latents)?)?);
    }
    image_io::grid(&images)
}

fn save_grid(dir: &Path, step: usize, grid: &image::RgbImage) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let path = dir.join(format!("step-{step:06}.png"));
    image_io::save_png(grid, &path)?;
    Ok(path)
}

fn lock(adam: &Mutex<AdamW>) -> Result<MutexGuard<'_, AdamW>> {
    adam.lock()
        .map_err(|_| anyhow::anyhow!("optimizer state poisoned by an earlier failure"))
}

/// One optimizer step fused into the backward pass: each trained weight inside a checkpointed
/// block is updated as soon as its gradient exists (the gradient is then dropped), the rest
/// right after the backward pass. The update is AdamW's own, so results equal the unfused step
/// (no clipping, one micro-batch; `TrainerOptions::validate` enforces both).
struct FusedStep {
    side: imprint_ops::SideGrads,
    adam: Arc<Mutex<AdamW>>,
    lr: f64,
    /// Σ‖g‖² over every gradient, for the logged norm.
    sum_sq: Arc<Mutex<f64>>,
}

impl FusedStep {
    fn install(
        side: &imprint_ops::SideGrads,
        trainable: &[(String, candle_core::Var)],
        adam: &Arc<Mutex<AdamW>>,
        lr: f64,
    ) -> Self {
        let index: std::collections::HashMap<_, _> = trainable
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (v.id(), i))
            .collect();
        let sum_sq = Arc::new(Mutex::new(0f64));
        let (a, sq) = (adam.clone(), sum_sq.clone());
        side.set_sink(Some(Arc::new(move |id, g| {
            let Some(&i) = index.get(&id) else {
                return Ok(());
            };
            let err = |e: String| candle_core::Error::Msg(format!("fused backward: {e}"));
            let norm = imprint_ops::optim::sum_squares(&g)?;
            *sq.lock().map_err(|_| err("poisoned".into()))? += norm;
            lock(&a)
                .and_then(|mut adam| adam.update(i, &g, lr))
                .map_err(|e| err(format!("{e:#}")))
        })));
        Self {
            side: side.clone(),
            adam: adam.clone(),
            lr,
            sum_sq,
        }
    }

    fn finish(
        &self,
        grads: &candle_core::backprop::GradStore,
        trainable: &[(String, candle_core::Var)],
    ) -> Result<()> {
        let mut adam = lock(&self.adam)?;
        let mut sum_sq = 0f64;
        for (i, (name, var)) in trainable.iter().enumerate() {
            if self.side.delivered(var.as_tensor()) {
                continue;
            }
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.zeros_like().with_context(|| name.clone())?,
            };
            sum_sq += imprint_ops::optim::sum_squares(&g)?;
            adam.update(i, &g, self.lr)?;
        }
        adam.finish_step();
        *self
            .sum_sq
            .lock()
            .map_err(|_| anyhow::anyhow!("fused backward: poisoned"))? += sum_sq;
        self.side.set_sink(None);
        self.side.clear();
        Ok(())
    }

    fn grad_norm(&self) -> f64 {
        self.sum_sq.lock().map_or(f64::NAN, |s| s.sqrt())
    }
}
