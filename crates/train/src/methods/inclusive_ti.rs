//! Inclusive tokens learned as Textual Inversion concepts, one per category: the alternative
//! issue 14 names to ITI-GEN's CLIP-space losses. ITI-GEN (Zhang et al. 2023) aligns each
//! category's tokens with the category's image direction in CLIP space, with no diffusion
//! backprop; that steers a model only as far as the model follows its text encoder. Here each
//! category's tokens are instead trained through the diffusion model itself (Gal et al. 2022's
//! denoising loss) on the category's images, under the very prompt `generate --balance` samples
//! with: `{prompt} {trigger}`. The result is the same inclusive-token concept (one trigger per
//! category, [`imprint_concepts::inclusive`]), so `--balance` uses it unchanged.

use crate::config::{resolve, textual_inversion_defaults, TextualInversionConfig};
use crate::trainer::{train_textual_inversion, Hooks, Outcome};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use imprint_concepts::inclusive::{inclusive_concept, trigger_for};
use imprint_concepts::{Concept, TEXT_ENCODER};
use std::path::Path;

/// Metadata key saying how the tokens were learned (`textual-inversion`; absent for ITI-GEN).
pub const LEARNED_WITH_KEY: &str = "inclusive.learned_with";

/// One attribute to learn tokens for.
pub struct InclusiveTiConfig {
    pub attribute: String,
    /// `(category, reference images)` per category.
    pub categories: Vec<(String, Vec<RgbImage>)>,
    /// The prompt the tokens are appended to, in training as in `--balance` (e.g. "a circle").
    pub prompt: String,
    /// The word each category's vectors start from (Textual Inversion's initializer).
    pub init_word: String,
    /// Textual Inversion options over its defaults (`model` required; `steps`, `lr`,
    /// `resolution`, `seed`, …), as `imprint train ti` takes them.
    pub options: toml::Table,
}

/// Trains every category's tokens in `work` (one folder per category: its images captioned
/// `{prompt} {trigger}`, the Textual Inversion run's log and concept) and returns the attribute's
/// inclusive-token concept.
pub fn train_inclusive_ti(cfg: &InclusiveTiConfig, work: &Path, hooks: &Hooks) -> Result<Concept> {
    if cfg.categories.len() < 2 {
        bail!(
            "attribute '{}' needs at least two categories to balance, got {}",
            cfg.attribute,
            cfg.categories.len()
        )
    }
    // Everything the final concept needs is checked before any category trains.
    for (category, images) in &cfg.categories {
        if category.contains(',') {
            bail!("category name '{category}' contains a comma; rename its folder")
        }
        if images.is_empty() {
            bail!("category '{category}' has no images")
        }
    }
    let mut learned = Vec::with_capacity(cfg.categories.len());
    for (i, (category, images)) in cfg.categories.iter().enumerate() {
        let trigger = trigger_for(&cfg.attribute, category);
        let dir = work.join(format!("{i:02}"));
        let images_dir = dir.join("images");
        std::fs::create_dir_all(&images_dir)
            .with_context(|| format!("{}: cannot create", images_dir.display()))?;
        let caption = format!("{} {trigger}", cfg.prompt);
        for (j, img) in images.iter().enumerate() {
            let png = images_dir.join(format!("{j:03}.png"));
            img.save(&png)
                .with_context(|| format!("{}: cannot write", png.display()))?;
            std::fs::write(png.with_extension("txt"), &caption)?;
        }
        let out = dir.join("concept.safetensors");
        let mut flags = cfg.options.clone();
        let text = |s: &str| toml::Value::String(s.to_string());
        flags.insert("images".into(), text(&images_dir.display().to_string()));
        flags.insert("out".into(), text(&out.display().to_string()));
        flags.insert("token".into(), text(&trigger));
        flags.insert("init-word".into(), text(&cfg.init_word));
        flags.insert("templates".into(), text("captions"));
        let ti: TextualInversionConfig = resolve(textual_inversion_defaults(), None, flags)
            .with_context(|| format!("category '{category}'"))?;
        eprintln!(
            "category '{category}': {} images, \"{caption}\"",
            images.len()
        );
        match train_textual_inversion(&ti, hooks)? {
            Outcome::Finished { .. } => {}
            Outcome::Interrupted { step, .. } => {
                bail!("interrupted at step {step} of category '{category}'")
            }
        }
        let concept = imprint_concepts::formats::load_any(&out)?;
        let vectors = concept
            .embedding(TEXT_ENCODER)
            .with_context(|| format!("{}: no token embedding", out.display()))?
            .vectors
            .clone();
        learned.push((category.clone(), vectors));
    }
    let mut concept = inclusive_concept(&cfg.attribute, learned)?;
    concept
        .metadata
        .insert(LEARNED_WITH_KEY.into(), "textual-inversion".into());
    Ok(concept)
}
