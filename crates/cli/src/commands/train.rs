//! `imprint train <method>`.

use anyhow::Result;
use clap::{Args, Subcommand};
use imprint_train::config::{
    custom_diffusion_defaults, dreambooth_defaults, extended_textual_inversion_defaults,
    lora_defaults, perfusion_defaults, resolve, textual_inversion_defaults, CustomDiffusionConfig,
    DreamBoothConfig, LoraConfig, PerfusionConfig, TextualInversionConfig, TrainerOptions,
};
use imprint_train::trainer::{
    train_custom_diffusion, train_dreambooth, train_extended_textual_inversion, train_lora,
    train_perfusion, train_textual_inversion, Hooks, Outcome,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Textual Inversion: learn a new word's embedding from a few images.
    #[command(name = "textual-inversion", alias = "ti")]
    TextualInversion(TiArgs),
    /// LoRA: low-rank deltas on the UNet's (and optionally the text encoder's) projections.
    Lora(LoraArgs),
    /// DreamBooth: fine-tune the whole UNet (optionally the text encoder); writes a model folder.
    Dreambooth(DreamBoothArgs),
    /// Extended Textual Inversion (P+): the new word gets its own vectors in every UNet
    /// cross-attention layer. Takes the textual-inversion options.
    #[command(name = "xti", alias = "p-plus")]
    ExtendedTextualInversion(TiArgs),
    /// Perfusion: the new word plus key-locked, gated rank-1 edits of every cross-attention key
    /// and value (~100 KB per concept on SD 1.5).
    Perfusion(PerfusionArgs),
    /// Custom Diffusion: modifier words plus every cross-attention key and value projection;
    /// writes diffusers' Custom Diffusion folder at --out and imprint's file OUT.safetensors.
    #[command(name = "custom-diffusion")]
    CustomDiffusion(CustomDiffusionArgs),
    /// SVDiff: shifts of the singular values of every UNet weight (and optionally the text
    /// encoder's), ~1 MB per concept on SD 1.5, with DreamBooth's instance prompt and prior
    /// preservation.
    Svdiff(SvdiffArgs),
    /// Train an encoder (E4T-style) that maps a concept's images to its word, over many concepts
    /// of a domain (a folder of concept folders, or `--data world`); then `imprint personalize`
    /// makes a concept in seconds.
    Encoder(super::personalize::EncoderArgs),
    /// Bias correction (ITI-GEN): inclusive tokens for each category of an attribute, learned
    /// from one folder of images per category in CLIP space (no diffusion backprop); then
    /// `generate --balance ATTRIBUTE` samples the categories in equal proportion.
    Debias(super::debias::DebiasArgs),
}

#[derive(Args, Debug)]
pub struct CustomDiffusionArgs {
    /// A modifier token, e.g. "<new1>"; repeat to train several concepts jointly (their images'
    /// IMAGE.txt captions name them).
    #[arg(long)]
    token: Vec<String>,
    /// The single-token word each --token starts from (default ktn, pll, ucd).
    #[arg(long)]
    init_word: Vec<String>,
    /// The caption of images without an IMAGE.txt, e.g. "a photo of <new1> cat".
    #[arg(long)]
    instance_prompt: Option<String>,
    /// Also train the cross-attention query and output projections (the script's
    /// --freeze_model crossattn).
    #[arg(long)]
    train_q_out: bool,
    /// Turn off the resize augmentation (the script's --noaug).
    #[arg(long)]
    no_augment: bool,
    /// Store the native file's weight changes as rank-R truncated SVDs (and report the cost).
    #[arg(long)]
    rank: Option<usize>,
    #[command(flatten)]
    trainer: TrainerArgs,
}

#[derive(Args, Debug)]
pub struct SvdiffArgs {
    /// The caption of images without an IMAGE.txt, e.g. "a photo of sks dog".
    #[arg(long)]
    instance_prompt: Option<String>,
    /// The rare word naming the subject ("sks"), recorded as the concept's trigger.
    #[arg(long)]
    token: Option<String>,
    /// Also shift the text encoder's singular values.
    #[arg(long)]
    train_text_encoder: bool,
    #[command(flatten)]
    cut_mix: CutMixArgs,
    #[command(flatten)]
    trainer: TrainerArgs,
}

/// Cut-Mix-Unmix (SVDiff §3.3): two subjects trained together, with cut-mix images of both and
/// the unmix regularizer on their cross-attention.
#[derive(Args, Debug)]
pub struct CutMixArgs {
    /// The second subject's images (the first's are --images).
    #[arg(long, value_name = "DIR")]
    second_images: Option<PathBuf>,
    /// The caption of the second subject's images without an IMAGE.txt, e.g. "a photo of zwx cat".
    #[arg(long)]
    second_instance_prompt: Option<String>,
    /// How the cut-mix captions name the two subjects, first then second: "sks dog,zwx cat".
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    subjects: Vec<String>,
    /// The cut-mix caption (default "a photo of a {left} on the left and a {right} on the right").
    #[arg(long)]
    cut_mix_prompt: Option<String>,
    /// Share of training samples that are cut-mix images (default 0.5).
    #[arg(long)]
    cut_mix_prob: Option<f64>,
    /// Weight of the unmix regularizer (default 1).
    #[arg(long)]
    unmix_weight: Option<f64>,
}

#[derive(Args, Debug)]
pub struct PerfusionArgs {
    /// The new word, e.g. "<my-toy>".
    #[arg(long)]
    token: Option<String>,
    /// The concept's class word (one token), e.g. "toy": keys stay locked to it and the word's
    /// embedding starts at it.
    #[arg(long)]
    superclass: Option<String>,
    /// object or style caption templates.
    #[arg(long)]
    templates: Option<String>,
    /// Learning rate of the value target outputs (default 3e-2; --lr is the embedding's, 6e-3).
    #[arg(long)]
    value_lr: Option<f64>,
    /// Training gate bias (default 0.75).
    #[arg(long)]
    beta: Option<f64>,
    /// Training gate temperature (default 0.1).
    #[arg(long)]
    tau: Option<f64>,
    #[command(flatten)]
    trainer: TrainerArgs,
}

#[derive(Args, Debug)]
pub struct DreamBoothArgs {
    /// The caption of images without an IMAGE.txt, e.g. "a photo of sks dog".
    #[arg(long)]
    instance_prompt: Option<String>,
    /// Also fine-tune the text encoder.
    #[arg(long)]
    train_text_encoder: bool,
    /// Also write OUT.lora.safetensors: the change as a LoRA of this rank (truncated SVD).
    #[arg(long)]
    extract_lora: Option<usize>,
    #[command(flatten)]
    trainer: TrainerArgs,
}

#[derive(Args, Debug)]
pub struct LoraArgs {
    /// The caption of images without an IMAGE.txt, e.g. "a photo of sks dog".
    #[arg(long)]
    instance_prompt: Option<String>,
    #[arg(long)]
    rank: Option<usize>,
    /// Delta scale alpha/rank; defaults to the rank.
    #[arg(long)]
    alpha: Option<f64>,
    /// Comma-separated UNet modules to adapt (default to_q,to_k,to_v,to_out.0; also proj_in,
    /// proj_out, ff.net.0.proj, ff.net.2, conv1, conv2, ...).
    #[arg(long)]
    targets: Option<String>,
    /// Also adapt the text encoder's attention and MLP projections.
    #[arg(long)]
    train_text_encoder: bool,
    #[arg(long)]
    dropout: Option<f64>,
    #[command(flatten)]
    trainer: TrainerArgs,
}

/// Options every method shares; each one is also a key of `--config FILE.toml`.
#[derive(Args, Debug)]
pub struct TrainerArgs {
    /// A TOML file with the same keys as these flags (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Diffusers model folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder of training images (JPEG/PNG/WebP).
    #[arg(long)]
    images: Option<PathBuf>,
    /// The concept file to write (.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Multiply the learning rate by batch size × accumulation (true|false).
    #[arg(long)]
    scale_lr: Option<bool>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    resolution: Option<usize>,
    /// constant, warmup or cosine.
    #[arg(long)]
    lr_schedule: Option<String>,
    #[arg(long)]
    lr_warmup_steps: Option<usize>,
    /// center or random.
    #[arg(long)]
    crop: Option<String>,
    /// Random horizontal flips (true|false).
    #[arg(long)]
    flip: Option<bool>,
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    save_every: Option<usize>,
    /// A checkpoint file, or a NAME.checkpoints folder (its latest checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    validation_prompt: Option<String>,
    #[arg(long)]
    validation_every: Option<usize>,
    #[arg(long)]
    num_validation_images: Option<usize>,
    #[arg(long)]
    validation_steps: Option<usize>,
    /// An IP-Adapter (FILE[:SCALE], h94 layout) for the validation images only; training never
    /// sees it.
    #[arg(long, alias = "ip-adapter", value_name = "FILE[:SCALE]")]
    validation_ip_adapter: Option<String>,
    /// The validation's image prompt (repeatable: embeddings averaged).
    #[arg(long, alias = "ip-image", value_name = "IMG")]
    validation_ip_image: Vec<PathBuf>,
    /// The adapter's image encoder, if not image_encoder/ beside FILE.
    #[arg(long, alias = "image-encoder", value_name = "DIR")]
    validation_image_encoder: Option<PathBuf>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Recompute UNet blocks in the backward pass instead of storing their activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --gradient-checkpointing: update each UNet block's weights as soon as its gradients
    /// exist, so all gradients never exist at once (DreamBooth: one UNet's worth less memory).
    #[arg(long)]
    fused_backward: bool,
    /// Mixed precision: no (f32), fp16 or bf16 (frozen UNet weights and activations in half
    /// precision; trained weights, gradients and optimizer state in f32).
    #[arg(long, value_parser = ["no", "fp16", "bf16"])]
    mixed_precision: Option<String>,
    /// Min-SNR loss weighting with this gamma (e.g. 5).
    #[arg(long)]
    snr_gamma: Option<f64>,
    /// Noise offset (e.g. 0.05).
    #[arg(long)]
    noise_offset: Option<f64>,
    /// Train an inpainting model (9-channel UNet) with random rectangle/ellipse masks.
    #[arg(long)]
    inpainting: bool,
    /// Restrict the loss to IMAGE.mask.png where present (true|false).
    #[arg(long)]
    use_masks: Option<bool>,
    /// Prior preservation: the class prompt, e.g. "a photo of a dog".
    #[arg(long)]
    class_prompt: Option<String>,
    /// Prior preservation: the class images folder (missing images are generated).
    #[arg(long)]
    class_images: Option<PathBuf>,
    #[arg(long)]
    num_class_images: Option<usize>,
    /// Weight of the prior-preservation loss.
    #[arg(long)]
    prior_weight: Option<f64>,
    #[arg(long, env = "IMPRINT_DEVICE")]
    device: Option<String>,
    /// Print the whole configuration this run would use (defaults, then --config, then flags)
    /// as TOML, and exit without training.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
pub struct TiArgs {
    /// The new word, e.g. "<my-toy>".
    #[arg(long)]
    token: Option<String>,
    /// A single-token word the vectors start from, e.g. "toy".
    #[arg(long)]
    init_word: Option<String>,
    /// How many vectors the token stands for.
    #[arg(long)]
    num_vectors: Option<usize>,
    /// object or style caption templates.
    #[arg(long)]
    templates: Option<String>,
    /// Start from this concept file's vectors instead of the init word's.
    #[arg(long)]
    init_concept: Option<PathBuf>,
    #[command(flatten)]
    trainer: TrainerArgs,
}

/// Inserts `key = value` for every flag given.
macro_rules! flags {
    ($table:ident, $src:expr, [$($field:ident => $key:literal),* $(,)?]) => {
        $(if let Some(v) = &$src.$field { $table.insert($key.to_string(), toml::Value::try_from(v)?); })*
    };
}

fn trainer_flags(a: &TrainerArgs, t: &mut toml::Table) -> Result<()> {
    if a.gradient_checkpointing {
        t.insert("gradient-checkpointing".into(), toml::Value::Boolean(true));
    }
    if a.fused_backward {
        t.insert("fused-backward".into(), toml::Value::Boolean(true));
    }
    if a.inpainting {
        t.insert("inpainting".into(), toml::Value::Boolean(true));
    }
    if !a.validation_ip_image.is_empty() {
        t.insert(
            "validation-ip-image".into(),
            toml::Value::try_from(&a.validation_ip_image)?,
        );
    }
    flags!(t, a, [model => "model", images => "images", out => "out", steps => "steps", lr => "lr",
        scale_lr => "scale-lr", batch_size => "batch-size", grad_accum => "grad-accum", resolution => "resolution",
        lr_schedule => "lr-schedule", lr_warmup_steps => "lr-warmup-steps", crop => "crop", flip => "flip",
        seed => "seed", save_every => "save-every", resume => "resume", validation_prompt => "validation-prompt",
        validation_every => "validation-every", num_validation_images => "num-validation-images",
        validation_steps => "validation-steps", validation_ip_adapter => "validation-ip-adapter",
        validation_image_encoder => "validation-image-encoder", max_grad_norm => "max-grad-norm", device => "device",
        mixed_precision => "mixed-precision",
        snr_gamma => "snr-gamma", noise_offset => "noise-offset", use_masks => "use-masks",
        class_prompt => "class-prompt", class_images => "class-images", num_class_images => "num-class-images",
        prior_weight => "prior-weight"]);
    Ok(())
}

fn cut_mix_flags(a: &CutMixArgs, t: &mut toml::Table) -> Result<()> {
    if !a.subjects.is_empty() {
        t.insert("subjects".into(), toml::Value::try_from(&a.subjects)?);
    }
    flags!(t, a, [second_images => "second-images", second_instance_prompt => "second-instance-prompt",
        cut_mix_prompt => "cut-mix-prompt", cut_mix_prob => "cut-mix-prob", unmix_weight => "unmix-weight"]);
    Ok(())
}

/// Runs a configured training with Ctrl-C wired to a clean stop.
/// Hooks with a progress bar whose interrupt flag the first Ctrl-C sets: the run finishes its
/// step, checkpoints and stops (a second Ctrl-C kills as usual).
pub(crate) fn interruptible_hooks() -> Hooks {
    let hooks = Hooks {
        progress: true,
        ..Default::default()
    };
    let flag = hooks.interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again to abort)"
        );
    });
    hooks
}

/// Trains (or, with `--print-config`, checks and prints the resolved configuration and returns).
fn launch<C: serde::Serialize>(
    cfg: &C,
    options: &TrainerOptions,
    args: &TrainerArgs,
    train: impl FnOnce(&Hooks) -> Result<Outcome>,
) -> Result<()> {
    if args.print_config {
        options.validate()?;
        print!("{}", toml::to_string(cfg)?);
        return Ok(());
    }
    let out = &options.out;
    let hooks = interruptible_hooks();
    match train(&hooks)? {
        Outcome::Finished { steps } => println!("{} ({steps} steps)", out.display()),
        Outcome::Interrupted { step, checkpoint } => {
            println!(
                "stopped at step {step}; resume with --resume {}",
                checkpoint.display()
            );
            std::process::exit(130);
        }
    }
    Ok(())
}

fn require(flags: &toml::Table, config: &Option<PathBuf>, keys: &[&str]) -> Result<()> {
    for required in keys {
        if !flags.contains_key(*required) && config.is_none() {
            anyhow::bail!("--{required} is required (or give it in --config FILE.toml)")
        }
    }
    Ok(())
}

pub fn run(c: TrainCommand) -> Result<()> {
    match c {
        TrainCommand::Dreambooth(a) => {
            let mut flags = toml::Table::new();
            flags!(flags, a, [instance_prompt => "instance-prompt", extract_lora => "extract-lora"]);
            if a.train_text_encoder {
                flags.insert("train-text-encoder".into(), toml::Value::Boolean(true));
            }
            trainer_flags(&a.trainer, &mut flags)?;
            require(&flags, &a.trainer.config, &["model", "images", "out"])?;
            let cfg: DreamBoothConfig =
                resolve(dreambooth_defaults(), a.trainer.config.as_deref(), flags)?;
            launch(&cfg, &cfg.trainer, &a.trainer, |hooks| {
                train_dreambooth(&cfg, hooks)
            })
        }
        TrainCommand::Lora(a) => {
            let mut flags = toml::Table::new();
            flags!(flags, a, [instance_prompt => "instance-prompt", rank => "rank", alpha => "alpha", targets => "targets", dropout => "dropout"]);
            if a.train_text_encoder {
                flags.insert("train-text-encoder".into(), toml::Value::Boolean(true));
            }
            trainer_flags(&a.trainer, &mut flags)?;
            require(&flags, &a.trainer.config, &["model", "images", "out"])?;
            let cfg: LoraConfig = resolve(lora_defaults(), a.trainer.config.as_deref(), flags)?;
            launch(&cfg, &cfg.trainer, &a.trainer, |hooks| {
                train_lora(&cfg, hooks)
            })
        }
        TrainCommand::CustomDiffusion(a) => {
            let mut flags = toml::Table::new();
            flags!(flags, a, [instance_prompt => "instance-prompt", rank => "rank"]);
            if !a.token.is_empty() {
                flags.insert("token".into(), toml::Value::try_from(&a.token)?);
            }
            if !a.init_word.is_empty() {
                flags.insert("init-word".into(), toml::Value::try_from(&a.init_word)?);
            }
            if a.train_q_out {
                flags.insert("train-q-out".into(), toml::Value::Boolean(true));
            }
            if a.no_augment {
                flags.insert("augment".into(), toml::Value::Boolean(false));
            }
            trainer_flags(&a.trainer, &mut flags)?;
            require(
                &flags,
                &a.trainer.config,
                &["model", "images", "out", "token"],
            )?;
            let cfg: CustomDiffusionConfig = resolve(
                custom_diffusion_defaults(),
                a.trainer.config.as_deref(),
                flags,
            )?;
            launch(&cfg, &cfg.trainer, &a.trainer, |hooks| {
                train_custom_diffusion(&cfg, hooks)
            })
        }
        TrainCommand::Perfusion(a) => {
            let mut flags = toml::Table::new();
            flags!(flags, a, [token => "token", superclass => "superclass", templates => "templates",
                value_lr => "value-lr", beta => "beta", tau => "tau"]);
            trainer_flags(&a.trainer, &mut flags)?;
            require(
                &flags,
                &a.trainer.config,
                &["model", "images", "out", "token", "superclass"],
            )?;
            let cfg: PerfusionConfig =
                resolve(perfusion_defaults(), a.trainer.config.as_deref(), flags)?;
            launch(&cfg, &cfg.trainer, &a.trainer, |hooks| {
                train_perfusion(&cfg, hooks)
            })
        }
        TrainCommand::ExtendedTextualInversion(a) => train_ti_like(
            a,
            extended_textual_inversion_defaults(),
            train_extended_textual_inversion,
        ),
        TrainCommand::Debias(a) => super::debias::run(a),
        TrainCommand::Encoder(a) => super::personalize::train(a),
        TrainCommand::Svdiff(a) => {
            let mut flags = toml::Table::new();
            flags!(flags, a, [instance_prompt => "instance-prompt", token => "token"]);
            if a.train_text_encoder {
                flags.insert("train-text-encoder".into(), toml::Value::Boolean(true));
            }
            cut_mix_flags(&a.cut_mix, &mut flags)?;
            trainer_flags(&a.trainer, &mut flags)?;
            require(&flags, &a.trainer.config, &["model", "images", "out"])?;
            let cfg: imprint_train::config::SvdiffConfig = resolve(
                imprint_train::config::svdiff_defaults(),
                a.trainer.config.as_deref(),
                flags,
            )?;
            launch(&cfg, &cfg.trainer, &a.trainer, |hooks| {
                imprint_train::trainer::train_svdiff(&cfg, hooks)
            })
        }
        TrainCommand::TextualInversion(a) => {
            train_ti_like(a, textual_inversion_defaults(), train_textual_inversion)
        }
    }
}

/// Textual Inversion and P+ share their options; only the defaults and the trainer differ.
fn train_ti_like(
    a: TiArgs,
    defaults: toml::Table,
    train: fn(&TextualInversionConfig, &Hooks) -> anyhow::Result<Outcome>,
) -> Result<()> {
    let mut flags = toml::Table::new();
    flags!(flags, a, [token => "token", init_word => "init-word", num_vectors => "num-vectors", templates => "templates", init_concept => "init-concept"]);
    trainer_flags(&a.trainer, &mut flags)?;
    require(
        &flags,
        &a.trainer.config,
        &["model", "images", "out", "token", "init-word"],
    )?;
    let cfg: TextualInversionConfig = resolve(defaults, a.trainer.config.as_deref(), flags)?;
    launch(&cfg, &cfg.trainer, &a.trainer, |hooks| train(&cfg, hooks))
}
