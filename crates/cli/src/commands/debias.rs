//! `imprint train debias`: inclusive tokens for an attribute, from one folder of reference images
//! per category, learned with ITI-GEN's CLIP-space losses (`--method iti-gen`) or as one Textual
//! Inversion concept per category (`--method ti`); `generate --balance ATTRIBUTE` then samples the
//! categories in equal proportion.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use imprint_eval::metrics::read_images;
use imprint_eval::ClipModel;
use imprint_train::methods::iti_gen::{
    train_iti_gen, ItiGenConfig, DEFAULT_LAMBDA, DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TOKENS,
};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct DebiasArgs {
    /// The attribute's name, e.g. "color" (words become `<color-red>`, …).
    #[arg(long)]
    attribute: String,
    /// A folder with one subfolder of reference images per category (the subfolder's name is
    /// the category's).
    #[arg(long)]
    categories: PathBuf,
    /// How the tokens are learned: `iti-gen` (ITI-GEN's direction-alignment and consistency
    /// losses in CLIP space; seconds to minutes, no diffusion backprop) or `ti` (one Textual Inversion
    /// concept per category, trained through the diffusion model on the category's images under
    /// the prompt `--prompt TRIGGER`; needs --model).
    #[arg(long, default_value = "iti-gen", value_parser = ["iti-gen", "ti"])]
    method: String,
    /// The transformers CLIPModel whose text tower is the diffusion model's text encoder (SD 1.x:
    /// openai/clip-vit-large-patch14; the toy world: examples/world/clip); needed by iti-gen.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// The diffusion model the tokens are for: with iti-gen, checks that its text encoder is
    /// --clip's text tower; with ti, the model trained through.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt the tokens are learned with (and appended to by `generate --balance`).
    #[arg(long, default_value = "a photo")]
    prompt: String,
    /// Tokens per category (iti-gen: default 3; ti: Textual Inversion's vectors, default 1).
    #[arg(long)]
    tokens: Option<usize>,
    /// Steps (iti-gen: default 300; ti: per category, Textual Inversion's default).
    #[arg(long)]
    steps: Option<usize>,
    /// Learning rate (iti-gen: default 0.01; ti: Textual Inversion's default, scaled by batch).
    #[arg(long)]
    lr: Option<f64>,
    /// ti: the word each category's vectors start from (default: the prompt's last word).
    #[arg(long)]
    init_word: Option<String>,
    /// ti: images per step (Textual Inversion's default otherwise).
    #[arg(long)]
    batch_size: Option<usize>,
    /// ti: gradient accumulation steps.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// ti: training resolution (default: the model's native size).
    #[arg(long)]
    resolution: Option<usize>,
    /// λ of the semantic-consistency hinge.
    #[arg(long, default_value_t = DEFAULT_LAMBDA)]
    lambda: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The concept file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    device: String,
}

/// Category folders of `dir`, sorted by name, each with its images.
fn read_categories(dir: &Path) -> Result<Vec<(String, Vec<image::RgbImage>)>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the categories folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    if folders.len() < 2 {
        bail!(
            "{}: needs one subfolder of images per category, at least two; found {}",
            dir.display(),
            folders.len()
        )
    }
    folders
        .iter()
        .map(|f| {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: folder name is not UTF-8", f.display()))?
                .to_string();
            Ok((name, read_images(f)?))
        })
        .collect()
}

/// Checks that the model's text encoder is the CLIP's text tower (same table; the tokens are
/// learned in that space).
fn check_text_encoder(model: &Path, clip: &ClipModel, device: &Device) -> Result<()> {
    let folder = imprint_models::loading::ModelFolder::open(model)?;
    let te = folder.load_text_encoder(DType::F32, device)?;
    let (a, b) = (&te.token_embedding, &clip.text_model.token_embedding);
    if a.dims() != b.dims() {
        bail!(
            "{}: the text encoder's token table is {:?} but --clip's text tower has {:?}: the tokens must be learned with the CLIP whose text tower the model uses",
            model.display(),
            a.dims(),
            b.dims()
        )
    }
    let diff = (a - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    if diff > 1e-3 {
        eprintln!("warning: {}'s text encoder differs from --clip's text tower (max |Δ| {diff:.3} in the token table); the learned tokens may steer the model less", model.display());
    }
    Ok(())
}

pub fn run(a: DebiasArgs) -> Result<()> {
    if a.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("{}: --out must be a .safetensors file", a.out.display())
    }
    let categories = read_categories(&a.categories)?;
    if a.method == "ti" {
        if a.lambda != DEFAULT_LAMBDA || a.clip.is_some() {
            bail!("--lambda and --clip belong to --method iti-gen; --method ti learns through --model")
        }
        return run_ti(&a, categories);
    }
    let ti_only = [
        ("--init-word", a.init_word.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--grad-accum", a.grad_accum.is_some()),
        ("--resolution", a.resolution.is_some()),
    ];
    if let Some((flag, _)) = ti_only.iter().find(|(_, given)| *given) {
        bail!(
            "{flag} belongs to --method ti (ITI-GEN learns in CLIP space, with no diffusion model)"
        )
    }
    let device = super::parse_device(&a.device)?;
    let Some(clip_dir) = &a.clip else {
        bail!("--method iti-gen needs --clip: the CLIPModel whose text tower is the model's text encoder")
    };
    let mut clip = ClipModel::load(clip_dir, &device)?;
    if let Some(model) = &a.model {
        check_text_encoder(model, &clip, &device)?;
    }
    let names: Vec<String> = categories
        .iter()
        .map(|(n, i)| format!("{n} ({})", i.len()))
        .collect();
    eprintln!("attribute '{}': {}", a.attribute, names.join(", "));
    let cfg = ItiGenConfig {
        attribute: a.attribute.clone(),
        categories,
        prompt: a.prompt.clone(),
        tokens_per_category: a.tokens.unwrap_or(DEFAULT_TOKENS),
        steps: a.steps.unwrap_or(DEFAULT_STEPS),
        lr: a.lr.unwrap_or(DEFAULT_LR),
        consistency: a.lambda,
        seed: a.seed,
    };
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "iti-gen {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap(),
    );
    let t0 = std::time::Instant::now();
    let (concept, last) = train_iti_gen(&mut clip, &cfg, |_, l| {
        bar.set_message(format!(
            "direction {:.4} consistency {:.4}",
            l.direction, l.consistency
        ));
        bar.inc(1);
    })?;
    bar.finish();
    imprint_concepts::formats::save(&concept, &a.out, imprint_concepts::formats::Format::Native)?;
    eprintln!(
        "{} steps in {:.1} s; final direction loss {:.4}, consistency loss {:.4}",
        cfg.steps,
        t0.elapsed().as_secs_f64(),
        last.direction,
        last.consistency
    );
    println!("{}", a.out.display());
    Ok(())
}

/// `--method ti`: one Textual Inversion concept per category, trained in a scratch folder beside
/// --out (removed afterwards), combined into one inclusive-token concept.
fn run_ti(a: &DebiasArgs, categories: Vec<(String, Vec<image::RgbImage>)>) -> Result<()> {
    let Some(model) = &a.model else {
        bail!("--method ti needs --model: the diffusion model the tokens are trained through")
    };
    let init_word = match &a.init_word {
        Some(w) => w.clone(),
        None => a
            .prompt
            .split_whitespace()
            .last()
            .context("--prompt is empty: give a prompt or --init-word")?
            .to_string(),
    };
    let resolution = match a.resolution {
        Some(r) => r,
        None => imprint_models::loading::ModelFolder::open(model)?.default_size()?,
    };
    let mut options = toml::Table::new();
    let mut set = |k: &str, v: toml::Value| {
        options.insert(k.to_string(), v);
    };
    set("model", toml::Value::String(model.display().to_string()));
    set("resolution", toml::Value::Integer(resolution as i64));
    set("seed", toml::Value::Integer(a.seed as i64));
    set("device", toml::Value::String(a.device.clone()));
    set("save-every", toml::Value::Integer(0));
    if let Some(n) = a.tokens {
        set("num-vectors", toml::Value::Integer(n as i64));
    }
    if let Some(n) = a.steps {
        set("steps", toml::Value::Integer(n as i64));
    }
    if let Some(lr) = a.lr {
        set("lr", toml::Value::Float(lr));
    }
    if let Some(n) = a.batch_size {
        set("batch-size", toml::Value::Integer(n as i64));
    }
    if let Some(n) = a.grad_accum {
        set("grad-accum", toml::Value::Integer(n as i64));
    }
    let parent = match a.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".debias-")
        .tempdir_in(&parent)
        .with_context(|| format!("{}: cannot create a scratch folder", parent.display()))?;
    let cfg = imprint_train::methods::inclusive_ti::InclusiveTiConfig {
        attribute: a.attribute.clone(),
        categories,
        prompt: a.prompt.clone(),
        init_word,
        options,
    };
    // Ctrl-C stops the category in training; the scratch folder goes with the error.
    let hooks = super::train::interruptible_hooks();
    let t0 = std::time::Instant::now();
    let concept =
        imprint_train::methods::inclusive_ti::train_inclusive_ti(&cfg, work.path(), &hooks)?;
    imprint_concepts::formats::save(&concept, &a.out, imprint_concepts::formats::Format::Native)?;
    eprintln!(
        "{} categories learned as Textual Inversion concepts in {:.1} s",
        cfg.categories.len(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", a.out.display());
    Ok(())
}
