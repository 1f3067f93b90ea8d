//! `imprint train debias`: ITI-GEN's inclusive tokens for an attribute, from one folder of
//! reference images per category; `generate --balance ATTRIBUTE` then samples the categories in
//! equal proportion.

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
    /// The transformers CLIPModel whose text tower is the diffusion model's text encoder (SD 1.x:
    /// openai/clip-vit-large-patch14; the toy world: examples/world/clip).
    #[arg(long)]
    clip: PathBuf,
    /// The diffusion model the tokens are for: checks that its text encoder is --clip's text tower.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt the tokens are learned with.
    #[arg(long, default_value = "a photo")]
    prompt: String,
    /// Tokens per category.
    #[arg(long, default_value_t = DEFAULT_TOKENS)]
    tokens: usize,
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    steps: usize,
    #[arg(long, default_value_t = DEFAULT_LR)]
    lr: f64,
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
    let device = super::parse_device(&a.device)?;
    let categories = read_categories(&a.categories)?;
    let mut clip = ClipModel::load(&a.clip, &device)?;
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
        tokens_per_category: a.tokens,
        steps: a.steps,
        lr: a.lr,
        consistency: a.lambda,
        seed: a.seed,
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
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
        a.steps,
        t0.elapsed().as_secs_f64(),
        last.direction,
        last.consistency
    );
    println!("{}", a.out.display());
    Ok(())
}
