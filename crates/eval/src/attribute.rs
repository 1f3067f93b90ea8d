//! Zero-shot attribute classification of generated images and the KL divergence of its category
//! histogram from uniform: how ITI-GEN (Zhang et al. 2023, §4.1) measures whether a model's samples
//! are balanced over an attribute's categories. 0 means perfectly balanced; a model that always
//! draws one of M categories scores ln M.

use crate::ClipModel;
use anyhow::{bail, Result};
use candle_core::{DType, D};
use image::RgbImage;
use serde::Serialize;

/// How a set of images falls into an attribute's categories.
#[derive(Clone, Debug, Serialize)]
pub struct Histogram {
    pub categories: Vec<String>,
    pub counts: Vec<usize>,
    /// KL(histogram ‖ uniform), natural log.
    pub kl_uniform: f64,
}

/// Fills `template`'s `{}` with each category: the zero-shot classifier's class prompts.
pub fn class_prompts(template: &str, categories: &[String]) -> Result<Vec<String>> {
    if !template.contains("{}") {
        bail!("template '{template}' has no '{{}}' for the category (e.g. \"a {{}} circle\")")
    }
    if categories.len() < 2 {
        bail!(
            "a classifier needs at least two categories, got {}",
            categories.len()
        )
    }
    Ok(categories
        .iter()
        .map(|c| template.replacen("{}", c, 1))
        .collect())
}

/// The category each image is closest to in CLIP space (cosine to the class prompts' features),
/// as CLIP's zero-shot classifier (Radford et al. 2021).
pub fn classify(clip: &ClipModel, images: &[RgbImage], prompts: &[String]) -> Result<Vec<usize>> {
    if images.is_empty() {
        bail!("no images to classify")
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let text = crate::metrics::unit_rows(&clip.prompt_features(&refs)?)?;
    let device = text.device().clone();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(32) {
        let px = clip.processor.preprocess_batch(chunk, &device)?;
        let img = crate::metrics::unit_rows(&clip.image_features(&px)?)?;
        let logits = img.matmul(&text.t()?)?;
        let best: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
        out.extend(best.into_iter().map(|b| b as usize));
    }
    Ok(out)
}

/// KL(p ‖ uniform) of a histogram's counts; empty bins add nothing.
pub fn kl_from_uniform(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 || counts.is_empty() {
        return 0.0;
    }
    let m = counts.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            p * (p * m).ln()
        })
        .sum()
}

/// Classifies `images` among `categories` (class prompts from `template`) and returns the
/// histogram with its KL from uniform.
pub fn histogram(
    clip: &ClipModel,
    images: &[RgbImage],
    categories: &[String],
    template: &str,
) -> Result<Histogram> {
    let prompts = class_prompts(template, categories)?;
    let labels = classify(clip, images, &prompts)?;
    let mut counts = vec![0usize; categories.len()];
    for l in labels {
        counts[l] += 1;
    }
    Ok(Histogram {
        categories: categories.to_vec(),
        kl_uniform: kl_from_uniform(&counts),
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_when_balanced_and_ln_m_when_collapsed() {
        assert!(kl_from_uniform(&[5, 5, 5, 5]).abs() < 1e-12);
        assert!((kl_from_uniform(&[20, 0, 0, 0]) - 4f64.ln()).abs() < 1e-12);
        // 90 % red of four colours.
        let kl = kl_from_uniform(&[18, 1, 1, 0]);
        let p = [0.9f64, 0.05, 0.05];
        let want: f64 = p.iter().map(|p| p * (p * 4.0).ln()).sum();
        assert!((kl - want).abs() < 1e-12);
    }

    #[test]
    fn templates_need_a_slot_and_two_categories() {
        let cats = vec!["red".to_string(), "blue".to_string()];
        assert_eq!(
            class_prompts("a {} circle", &cats).unwrap(),
            ["a red circle", "a blue circle"]
        );
        assert!(class_prompts("a circle", &cats).is_err());
        assert!(class_prompts("a {} circle", &cats[..1]).is_err());
    }
}
