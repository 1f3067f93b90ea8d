//! ITI-GEN (Zhang et al. 2023, "ITI-GEN: Inclusive Text-to-Image Generation"): learn, for each
//! category of an attribute, a few token embeddings ("inclusive tokens") that, appended to a prompt,
//! steer a text-to-image model toward that category — from reference images alone, with no
//! diffusion backprop: the losses live in CLIP's joint space.
//!
//! * **Direction alignment** (§3.2, eq. 2): for every pair of categories (i, j) the text direction
//!   `E_T(P + S_i) − E_T(P + S_j)` should point where the image direction
//!   `mean E_I(images_i) − mean E_I(images_j)` points: `1 − cos`, averaged over pairs.
//! * **Semantic consistency** (eq. 3): the prompt with tokens stays near the prompt alone,
//!   `max(0, λ − cos(E_T(P + S_i), E_T(P)))`, λ = 0.8 as the paper.
//!
//! The text tower must be the diffusion model's text encoder (as SD 1.x uses CLIP ViT-L/14's),
//! since the tokens are learned in its embedding space. Features are pooled at the end-of-text
//! token explicitly: with added tokens past the vocabulary, the legacy argmax pooling would pick
//! a learned token instead.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var, D};
use image::RgbImage;
use imprint_concepts::apply::token_names;
use imprint_concepts::inclusive::{inclusive_concept, trigger_for};
use imprint_concepts::per_layer::substitute_tokens;
use imprint_concepts::Concept;
use imprint_eval::ClipModel;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// ITI-GEN's defaults (its repository's training script).
pub const DEFAULT_TOKENS: usize = 3;
pub const DEFAULT_STEPS: usize = 300;
pub const DEFAULT_LR: f64 = 1e-2;
pub const DEFAULT_LAMBDA: f64 = 0.8;

/// One attribute to learn tokens for.
pub struct ItiGenConfig {
    pub attribute: String,
    /// `(category, reference images)` per category.
    pub categories: Vec<(String, Vec<RgbImage>)>,
    /// The prompt the tokens are learned with (ITI-GEN: "a headshot of a person").
    pub prompt: String,
    pub tokens_per_category: usize,
    pub steps: usize,
    pub lr: f64,
    /// λ of the semantic-consistency hinge.
    pub consistency: f64,
    pub seed: u64,
}

/// The losses of one step.
#[derive(Clone, Copy, Debug)]
pub struct ItiGenLosses {
    pub direction: f64,
    pub consistency: f64,
}

use imprint_eval::metrics::unit_rows as unit;

/// Row-wise cosine of two `[N, D]` tensors.
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((unit(a)? * unit(b)?)?.sum(D::Minus1)?)
}

/// Projected text features `[B, P]` of token embeddings, pooled at each row's end-of-text token.
fn text_features(clip: &ClipModel, embeds: &Tensor, ids: &Tensor, eos: u32) -> Result<Tensor> {
    let hidden = clip
        .text_model
        .forward_embeds(embeds, ids, 0)?
        .last_hidden_state;
    let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
    let mut pooled = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let pos = row
            .iter()
            .position(|&t| t == eos)
            .context("a tokenized prompt has no end-of-text token")?;
        pooled.push(hidden.get(i)?.get(pos)?);
    }
    clip.project_text(&Tensor::stack(&pooled, 0)?)
}

/// Learns the inclusive tokens of `cfg.attribute`; `progress(step, losses)` hears every step.
/// Returns the concept (see [`imprint_concepts::inclusive`]) and the last step's losses.
pub fn train_iti_gen(
    clip: &mut ClipModel,
    cfg: &ItiGenConfig,
    mut progress: impl FnMut(usize, ItiGenLosses),
) -> Result<(Concept, ItiGenLosses)> {
    let m = cfg.categories.len();
    if m < 2 {
        bail!(
            "attribute '{}' needs at least two category folders, found {m}",
            cfg.attribute
        )
    }
    if cfg.tokens_per_category == 0 || cfg.steps == 0 {
        bail!("--tokens and --steps must be at least 1")
    }
    let device = clip.text_model.device().clone();
    let n = cfg.tokens_per_category;

    // The image side: each category's mean normalized CLIP image feature (fixed).
    let mut image_means = Vec::with_capacity(m);
    for (name, images) in &cfg.categories {
        if images.is_empty() {
            bail!("category '{name}' has no images")
        }
        let mut feats = Vec::new();
        for chunk in images.chunks(32) {
            let px = clip.processor.preprocess_batch(chunk, &device)?;
            feats.push(unit(&clip.image_features(&px)?)?);
        }
        image_means.push(Tensor::cat(&feats, 0)?.mean(0)?);
    }
    let image_means = Tensor::stack(&image_means, 0)?;

    // The words: `<attribute-category>`, `…_1`, … appended to the prompt.
    let mut all_ids = Vec::with_capacity(m * n);
    let mut prompts = Vec::with_capacity(m);
    for (name, _) in &cfg.categories {
        let names = token_names(&trigger_for(&cfg.attribute, name), n);
        for w in &names {
            if clip.tokenizer.token_id(w).is_some() {
                bail!("token '{w}' is already in the tokenizer's vocabulary")
            }
            all_ids.push(clip.tokenizer.add_token(w)?);
        }
        prompts.push(format!("{} {}", cfg.prompt, names.join(" ")));
    }
    let max = clip.tokenizer.model_max_length();
    let mut rows = Vec::with_capacity(m);
    for p in &prompts {
        let len = clip.tokenizer.encode_unpadded(p)?.len();
        if len > max {
            bail!("prompt '{p}' is {len} tokens with the inclusive tokens; CLIP reads at most {max}: shorten --prompt or use fewer --tokens")
        }
        rows.push(Tensor::new(clip.tokenizer.encode(p)?, &device)?);
    }
    let ids = Tensor::stack(&rows, 0)?;
    let eos = clip.tokenizer.eos_id();
    let plain_ids = Tensor::new(clip.tokenizer.encode(&cfg.prompt)?, &device)?.unsqueeze(0)?;
    let plain = text_features(
        clip,
        &clip.text_model.embed_tokens(&plain_ids)?,
        &plain_ids,
        eos,
    )?
    .detach();

    // Start from the table's mean row with small noise (the noise breaks the categories'
    // symmetry; identical tokens would give zero text directions).
    let table = clip.text_model.token_embedding.to_dtype(DType::F32)?;
    let dim = table.dim(1)?;
    let mean_row: Vec<f32> = table.mean(0)?.to_vec1()?;
    let std = table.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()? as f64;
    let normal = Normal::new(0.0, 0.1 * std.max(1e-6))?;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(cfg.seed);
    let init: Vec<f32> = (0..m * n)
        .flat_map(|_| {
            mean_row
                .iter()
                .map(|&v| v + normal.sample(&mut rng) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let vectors = Var::from_tensor(&Tensor::from_vec(init, (m * n, dim), &device)?)?;
    let mut opt = crate::optim::AdamW::new(
        vec![vectors.clone()],
        crate::optim::AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    // Category pairs i < j.
    let pairs: Vec<(u32, u32)> = (0..m as u32)
        .flat_map(|i| (i + 1..m as u32).map(move |j| (i, j)))
        .collect();
    let left = Tensor::new(pairs.iter().map(|p| p.0).collect::<Vec<_>>(), &device)?;
    let right = Tensor::new(pairs.iter().map(|p| p.1).collect::<Vec<_>>(), &device)?;
    let image_dirs =
        (image_means.index_select(&left, 0)? - image_means.index_select(&right, 0)?)?;
    let dir_norms: Vec<f32> = image_dirs.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec1()?;
    if let Some(k) = dir_norms.iter().position(|n| *n < 1e-6) {
        let (i, j) = pairs[k];
        bail!(
            "categories '{}' and '{}' look the same to CLIP (identical reference images?): no direction to learn between them",
            cfg.categories[i as usize].0,
            cfg.categories[j as usize].0
        )
    }

    let mut last = ItiGenLosses {
        direction: 0.0,
        consistency: 0.0,
    };
    for step in 0..cfg.steps {
        let embeds = substitute_tokens(&clip.text_model, &ids, &all_ids, vectors.as_tensor())?;
        // Unit text features, as the image side, before their differences (ITI-GEN's model.py);
        // the pairs' losses are summed and divided by M − 1 as there.
        let text = unit(&text_features(clip, &embeds, &ids, eos)?)?;
        let text_dirs = (text.index_select(&left, 0)? - text.index_select(&right, 0)?)?;
        let direction = ((1.0 - cosine(&text_dirs, &image_dirs)?)?.sum_all()? / (m - 1) as f64)?;
        let consistency = (cfg.consistency - cosine(&text, &plain.broadcast_as(text.shape())?)?)?
            .relu()?
            .mean_all()?;
        let loss = (&direction + &consistency)?;
        let grads = loss.backward()?;
        let g = grads
            .get(vectors.as_tensor())
            .context("no gradient reached the inclusive tokens")?
            .clone();
        opt.step(&[g], cfg.lr)?;
        last = ItiGenLosses {
            direction: direction.to_scalar::<f32>()? as f64,
            consistency: consistency.to_scalar::<f32>()? as f64,
        };
        if !(last.direction.is_finite() && last.consistency.is_finite()) {
            bail!("ITI-GEN diverged at step {step} (loss is not finite); try a smaller --lr")
        }
        progress(step, last);
    }
    let learned = vectors.as_tensor().to_device(&candle_core::Device::Cpu)?;
    let per_category: Vec<(String, Tensor)> = cfg
        .categories
        .iter()
        .enumerate()
        .map(|(k, (name, _))| Ok((name.clone(), learned.narrow(0, k * n, n)?)))
        .collect::<Result<_>>()?;
    let mut concept = inclusive_concept(&cfg.attribute, per_category)?;
    concept
        .metadata
        .insert("inclusive.prompt".into(), cfg.prompt.clone());
    concept
        .metadata
        .insert("training.steps".into(), cfg.steps.to_string());
    Ok((concept, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::path::PathBuf;

    fn tiny_clip() -> ClipModel {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval/clip");
        ClipModel::load(&dir, &Device::Cpu).unwrap()
    }

    fn solid(rgb: [u8; 3], k: u32) -> RgbImage {
        RgbImage::from_fn(32, 32, |x, y| {
            if (x + y + k) % 7 == 0 {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb(rgb)
            }
        })
    }

    fn config(steps: usize) -> ItiGenConfig {
        ItiGenConfig {
            attribute: "color".into(),
            categories: vec![
                (
                    "red".into(),
                    (0..3).map(|k| solid([220, 20, 20], k)).collect(),
                ),
                (
                    "blue".into(),
                    (0..3).map(|k| solid([20, 20, 220], k)).collect(),
                ),
                (
                    "green".into(),
                    (0..3).map(|k| solid([20, 200, 20], k)).collect(),
                ),
            ],
            prompt: "a photo".into(),
            tokens_per_category: 2,
            steps,
            lr: 5e-2,
            consistency: DEFAULT_LAMBDA,
            seed: 0,
        }
    }

    #[test]
    fn training_aligns_text_directions_with_image_directions() {
        let mut first = None;
        let (concept, last) = train_iti_gen(&mut tiny_clip(), &config(40), |step, l| {
            if step == 0 {
                first = Some(l)
            }
        })
        .unwrap();
        let first = first.unwrap();
        assert!(
            last.direction < 0.5 * first.direction,
            "direction loss {} → {}",
            first.direction,
            last.direction
        );
        let tokens = imprint_concepts::inclusive::inclusive_tokens(&concept).unwrap();
        assert_eq!(tokens.categories.len(), 3);
        assert_eq!(concept.num_vectors(), 2);
        assert_eq!(concept.extra_tokens.len(), 2);
    }

    #[test]
    fn a_single_category_or_an_empty_one_is_refused() {
        let mut cfg = config(1);
        cfg.categories.truncate(1);
        assert!(train_iti_gen(&mut tiny_clip(), &cfg, |_, _| {}).is_err());
        let mut cfg = config(1);
        cfg.categories[1].1.clear();
        let e = train_iti_gen(&mut tiny_clip(), &cfg, |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("blue"), "{e}");
    }
}
