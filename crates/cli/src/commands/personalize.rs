//! `imprint train encoder` (learn, once, an encoder that maps a concept's images to its word) and
//! `imprint personalize` (one encoder pass, optionally a few Textual Inversion steps: a concept in
//! seconds).

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use imprint_train::methods::encoder::{
    personalize_vector, train_encoder, ConceptEncoder, EncoderTrainConfig, FolderConcepts,
    DEFAULT_BATCH, DEFAULT_HIDDEN, DEFAULT_LR, DEFAULT_OFFSET_PENALTY, DEFAULT_REFERENCES,
    DEFAULT_STEPS,
};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct EncoderArgs {
    /// The diffusion model (diffusers folder) the encoder personalizes.
    #[arg(long)]
    model: PathBuf,
    /// A folder of concept folders (images, optional IMAGE.txt captions and class.txt), or
    /// `world` for the toy world's unlimited supply of concepts.
    #[arg(long)]
    data: String,
    /// The CLIPModel folder whose image tower the encoder starts from (frozen).
    #[arg(long)]
    init_vision: PathBuf,
    /// The encoder folder to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: usize,
    /// Concepts per step.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch_size: usize,
    /// Images of a concept the encoder sees per example.
    #[arg(long, default_value_t = DEFAULT_REFERENCES)]
    references: usize,
    #[arg(long, default_value_t = DEFAULT_LR)]
    lr: f64,
    /// Weight of the L2 penalty on the predicted offset (E4T's regularizer).
    #[arg(long, default_value_t = DEFAULT_OFFSET_PENALTY)]
    offset_penalty: f64,
    #[arg(long, default_value_t = DEFAULT_HIDDEN)]
    mapper_hidden: usize,
    /// The domain's class word, recorded as `personalize`'s default.
    #[arg(long)]
    class_word: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (0: never); an interrupted run resumes from it.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    device: String,
}

pub fn train(a: EncoderArgs) -> Result<()> {
    let cfg = EncoderTrainConfig {
        model: a.model.clone(),
        init_vision: a.init_vision.clone(),
        out: a.out.clone(),
        steps: a.steps,
        batch: a.batch_size,
        references: a.references,
        lr: a.lr,
        offset_penalty: a.offset_penalty,
        mapper_hidden: a.mapper_hidden,
        class_word: a.class_word.clone(),
        seed: a.seed,
        save_every: a.save_every,
        device: a.device.clone(),
    };
    let mut source: Box<dyn imprint_train::methods::encoder::ConceptSource> = if a.data == "world" {
        Box::new(imprint_world::encoder_data::WorldConcepts { seed: a.seed })
    } else {
        Box::new(FolderConcepts::open(std::path::Path::new(&a.data), a.seed)?)
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "encoder {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let t0 = Instant::now();
    let last = train_encoder(&cfg, source.as_mut(), |step, loss| {
        bar.set_position(step as u64 + 1);
        bar.set_message(format!("loss {loss:.4}"));
    })?;
    bar.finish();
    eprintln!(
        "{} steps in {:.0} s, last diffusion loss {last:.4}",
        a.steps,
        t0.elapsed().as_secs_f64()
    );
    println!("{}", a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct PersonalizeArgs {
    /// An encoder folder from `imprint train encoder`.
    #[arg(long)]
    encoder: PathBuf,
    /// The diffusion model the concept is for.
    #[arg(long)]
    model: PathBuf,
    /// The concept's images (1–5 are typical).
    #[arg(long)]
    images: PathBuf,
    /// The new word, e.g. "<my-toy>".
    #[arg(long)]
    token: String,
    /// The concept's class word (default: the encoder's).
    #[arg(long)]
    class_word: Option<String>,
    /// The concept file to write (imprint's native format).
    #[arg(long)]
    out: PathBuf,
    /// Refine with this many Textual Inversion steps (at most 15).
    #[arg(long, default_value_t = 0)]
    tune_steps: usize,
    /// Learning rate of the refinement.
    #[arg(long, default_value_t = 5e-3)]
    tune_lr: f64,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    device: String,
}

pub fn personalize(a: PersonalizeArgs) -> Result<()> {
    if a.tune_steps > 15 {
        bail!("--tune-steps {} is more than 15; for longer training use `imprint train ti --init-concept`", a.tune_steps)
    }
    if a.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("{}: --out must be a .safetensors file", a.out.display())
    }
    let t0 = Instant::now();
    let device = super::parse_device(&a.device)?;
    let encoder = ConceptEncoder::load(&a.encoder, &device)?;
    let class_word = a
        .class_word
        .clone()
        .or_else(|| encoder.config.class_word.clone())
        .context("--class-word is required (the encoder records none)")?;
    let images = imprint_eval::metrics::read_images(&a.images)?;
    let sd = imprint_pipeline::StableDiffusion::load(&a.model, DType::F32, &device)?;
    let vector = personalize_vector(&encoder, &sd, &images, &class_word)?;
    let mut concept = imprint_concepts::Concept::textual_inversion(&a.token, vector)?;
    concept
        .metadata
        .insert("method_detail".into(), "encoder".into());
    concept
        .metadata
        .insert("encoder".into(), a.encoder.display().to_string());
    let encode_s = t0.elapsed().as_secs_f64();
    if a.tune_steps == 0 {
        imprint_concepts::formats::save(
            &concept,
            &a.out,
            imprint_concepts::formats::Format::Native,
        )?;
        eprintln!(
            "encoder pass: {encode_s:.2} s for {} image(s)",
            images.len()
        );
        println!("{}", a.out.display());
        return Ok(());
    }
    let resolution = sd.default_size();
    drop(sd);
    let start = a
        .out
        .with_extension(format!("encoder-{}.safetensors", std::process::id()));
    imprint_concepts::formats::save(&concept, &start, imprint_concepts::formats::Format::Native)?;
    let captions = imprint_eval::metrics::image_files(&a.images)?
        .iter()
        .all(|p| p.with_extension("txt").is_file());
    let mut flags = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        flags.insert(k.to_string(), v);
    };
    set("model", toml::Value::String(a.model.display().to_string()));
    set(
        "images",
        toml::Value::String(a.images.display().to_string()),
    );
    set("out", toml::Value::String(a.out.display().to_string()));
    set("token", toml::Value::String(a.token.clone()));
    set("init-word", toml::Value::String(class_word.clone()));
    set(
        "init-concept",
        toml::Value::String(start.display().to_string()),
    );
    set(
        "templates",
        toml::Value::String(if captions { "captions" } else { "object" }.into()),
    );
    set("steps", toml::Value::Integer(a.tune_steps as i64));
    set("lr", toml::Value::Float(a.tune_lr));
    set("scale-lr", toml::Value::Boolean(false));
    set(
        "batch-size",
        toml::Value::Integer(images.len().clamp(1, 4) as i64),
    );
    set("grad-accum", toml::Value::Integer(1));
    set("save-every", toml::Value::Integer(0));
    set("resolution", toml::Value::Integer(resolution as i64));
    set("device", toml::Value::String(a.device.clone()));
    let cfg: imprint_train::config::TextualInversionConfig = imprint_train::config::resolve(
        imprint_train::config::textual_inversion_defaults(),
        None,
        flags,
    )?;
    let hooks = imprint_train::trainer::Hooks::default();
    let tuned = imprint_train::trainer::train_textual_inversion(&cfg, &hooks);
    let _ = std::fs::remove_file(&start);
    tuned?;
    eprintln!(
        "encoder pass {encode_s:.2} s + {} tuning steps: {:.2} s in all",
        a.tune_steps,
        t0.elapsed().as_secs_f64()
    );
    println!("{}", a.out.display());
    Ok(())
}
