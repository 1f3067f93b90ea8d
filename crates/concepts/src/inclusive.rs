//! Inclusive tokens (ITI-GEN, Zhang et al. 2023, "ITI-GEN: Inclusive Text-to-Image Generation"):
//! for each category of an attribute, a few learned token embeddings that, appended to a prompt,
//! steer generation toward that category; sampling the categories in equal proportion
//! (`generate --balance ATTRIBUTE`) corrects a model's bias on the attribute.
//!
//! One concept holds a whole attribute: the first category's words are the concept's token
//! embedding (trigger `<attribute-category>`), the others its further words
//! ([`Concept::extra_tokens`]); metadata `inclusive.attribute`, `inclusive.categories` and
//! `inclusive.triggers` (comma-separated, in category order) say which words belong to which
//! category, so the native file carries everything `--balance` needs.

use crate::{Concept, TokenEmbedding, TEXT_ENCODER};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The method name of inclusive-token concepts.
pub const ITI_GEN: &str = "iti-gen";
const ATTRIBUTE_KEY: &str = "inclusive.attribute";
const CATEGORIES_KEY: &str = "inclusive.categories";
const TRIGGERS_KEY: &str = "inclusive.triggers";

/// An attribute's categories and the words that invoke each.
#[derive(Clone, Debug, PartialEq)]
pub struct InclusiveTokens {
    pub attribute: String,
    /// `(category, trigger)` in the order the categories were learned.
    pub categories: Vec<(String, String)>,
}

/// The trigger of one category: `<attribute-category>` with whitespace made dashes (a trigger is
/// one word).
pub fn trigger_for(attribute: &str, category: &str) -> String {
    let word = |s: &str| s.split_whitespace().collect::<Vec<_>>().join("-");
    format!("<{}-{}>", word(attribute), word(category))
}

/// Builds the concept of an attribute from `(category, [n, dim] vectors)` per category.
pub fn inclusive_concept(attribute: &str, categories: Vec<(String, Tensor)>) -> Result<Concept> {
    if categories.len() < 2 {
        bail!(
            "attribute '{attribute}' needs at least two categories to balance, got {}",
            categories.len()
        )
    }
    for (name, _) in &categories {
        if name.contains(',') {
            bail!("category name '{name}' contains a comma; rename its folder")
        }
    }
    let triggers: Vec<String> = categories
        .iter()
        .map(|(c, _)| trigger_for(attribute, c))
        .collect();
    let mut iter = categories.iter().zip(&triggers);
    let ((_, first), first_trigger) = iter.next().expect("two categories");
    let mut concept = Concept {
        trigger: first_trigger.clone(),
        method: ITI_GEN.to_string(),
        embeddings: vec![TokenEmbedding::new(TEXT_ENCODER, first.clone())?],
        ..Default::default()
    };
    for ((_, v), t) in iter {
        concept.extra_tokens.push((t.clone(), v.clone()));
    }
    let names: Vec<&str> = categories.iter().map(|(c, _)| c.as_str()).collect();
    concept
        .metadata
        .insert(ATTRIBUTE_KEY.into(), attribute.to_string());
    concept
        .metadata
        .insert(CATEGORIES_KEY.into(), names.join(","));
    concept
        .metadata
        .insert(TRIGGERS_KEY.into(), triggers.join(","));
    concept.validate()?;
    Ok(concept)
}

/// The inclusive tokens a concept carries, if it is an inclusive-token concept.
pub fn inclusive_tokens(concept: &Concept) -> Option<InclusiveTokens> {
    let attribute = concept.metadata.get(ATTRIBUTE_KEY)?.clone();
    let names: Vec<String> = concept
        .metadata
        .get(CATEGORIES_KEY)?
        .split(',')
        .map(str::to_string)
        .collect();
    let triggers: Vec<String> = concept
        .metadata
        .get(TRIGGERS_KEY)?
        .split(',')
        .map(str::to_string)
        .collect();
    (names.len() == triggers.len() && names.len() >= 2).then(|| InclusiveTokens {
        attribute,
        categories: names.into_iter().zip(triggers).collect(),
    })
}

/// Prompts that sample an attribute's categories in equal proportion: image `i` of `count` gets
/// category `i mod M`'s words appended, as ITI-GEN appends its tokens to the prompt.
pub fn balanced_prompts(prompt: &str, tokens: &InclusiveTokens, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let (_, trigger) = &tokens.categories[i % tokens.categories.len()];
            format!("{prompt} {trigger}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_attribute_round_trips_through_the_native_file() {
        let v = |x: f32| Tensor::full(x, (3, 8), &Device::Cpu).unwrap();
        let c = inclusive_concept(
            "color",
            vec![("red".into(), v(1.0)), ("light blue".into(), v(2.0))],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("color.safetensors");
        crate::formats::save(&c, &p, crate::formats::Format::Native).unwrap();
        let back = crate::formats::load_any(&p).unwrap();
        let t = inclusive_tokens(&back).unwrap();
        assert_eq!(t.attribute, "color");
        assert_eq!(
            t.categories,
            vec![
                ("red".to_string(), "<color-red>".to_string()),
                ("light blue".to_string(), "<color-light-blue>".to_string())
            ]
        );
        assert_eq!(back.extra_tokens.len(), 1);
        assert_eq!(back.num_vectors(), 3);
        let p = balanced_prompts("a circle", &t, 3);
        assert_eq!(
            p,
            [
                "a circle <color-red>",
                "a circle <color-light-blue>",
                "a circle <color-red>"
            ]
        );
    }

    #[test]
    fn one_category_is_refused() {
        let v = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(inclusive_concept("color", vec![("red".into(), v)]).is_err());
    }
}
