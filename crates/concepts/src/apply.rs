//! Applying a Textual Inversion concept to a tokenizer and text encoder, as diffusers'
//! `TextualInversionLoaderMixin.load_textual_inversion` does:
//!
//! - an `n`-vector trigger `t` becomes `n` new tokens named `t`, `t_1`, …, `t_{n-1}` (diffusers'
//!   `_extend_tokens_and_embeddings`), added in that order so their ids are consecutive from the
//!   current tokenizer length;
//! - the embedding table is resized to `len(tokenizer) + n` rows (`resize_token_embeddings`) and
//!   the vectors become the new rows;
//! - prompts are rewritten before tokenizing: each trigger occurrence becomes
//!   `t t_1 … t_{n-1}` ([`expand_prompt`], diffusers' `maybe_convert_prompt`).

use crate::{Concept, TEXT_ENCODER};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use imprint_models::clip::ClipTextTransformer;
use imprint_models::tokenizer::ClipTokenizer;

/// The token names of an `n`-vector trigger, as diffusers names them.
pub fn token_names(trigger: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i == 0 {
                trigger.to_string()
            } else {
                format!("{trigger}_{i}")
            }
        })
        .collect()
}

/// Adds the concept's trigger tokens to `tokenizer` and its vectors (× `scale`) as new rows of
/// `text_encoder.token_embedding`. Returns the new token names. Nothing is changed when the
/// concept does not fit (trigger already known, wrong dimension, no embedding for this encoder).
pub fn apply_textual_inversion(
    tokenizer: &mut ClipTokenizer,
    text_encoder: &mut ClipTextTransformer,
    concept: &Concept,
    scale: f64,
) -> Result<Vec<String>> {
    concept.validate()?;
    let name = &concept.trigger;
    if !scale.is_finite() {
        bail!("concept '{name}': scale {scale} is not a finite number")
    }
    let Some(embedding) = concept.embedding(TEXT_ENCODER) else {
        let have: Vec<&str> = concept
            .embeddings
            .iter()
            .map(|e| e.encoder.as_str())
            .collect();
        bail!(
            "concept '{name}' has no embedding for {TEXT_ENCODER} (it has {})",
            have.join(", ")
        )
    };
    let (rows, width) = text_encoder.token_embedding.dims2()?;
    if embedding.dim() != width {
        bail!(
            "concept '{name}' has {}-dim vectors; this text encoder takes {width} (was it trained for another base model?)",
            embedding.dim()
        )
    }
    let tokens = token_names(name, embedding.num_vectors());
    // diffusers refuses a trigger already in the vocabulary, and a multi-vector trigger whose
    // `_1` token exists; we check every name before changing anything.
    if let Some(t) = tokens.iter().find(|t| tokenizer.token_id(t).is_some()) {
        bail!("concept '{name}': token '{t}' is already in the tokenizer's vocabulary (is the concept applied twice, or does its trigger collide with a word?); rename it with `imprint concept convert --trigger`")
    }
    let vocab = tokenizer.vocab_size();
    if rows < vocab {
        bail!("the text encoder has {rows} embeddings for a tokenizer of {vocab} tokens")
    }
    // diffusers resizes the table to len(tokenizer) + n: rows past the tokenizer are dropped.
    let table = text_encoder.token_embedding.narrow(0, 0, vocab)?;
    let new_rows =
        (embedding.vectors.to_device(table.device())? * scale)?.to_dtype(table.dtype())?;
    let table = Tensor::cat(&[&table, &new_rows], 0)?;
    for (i, t) in tokens.iter().enumerate() {
        let id = tokenizer
            .add_token(t)
            .with_context(|| format!("concept '{name}'"))?;
        if id as usize != vocab + i {
            bail!(
                "concept '{name}': token '{t}' got id {id}, expected {}",
                vocab + i
            )
        }
    }
    text_encoder.token_embedding = table;
    Ok(tokens)
}

/// Rewrites a prompt for multi-vector triggers, as diffusers' `maybe_convert_prompt`: every
/// occurrence of a trigger with `n > 1` vectors becomes `trigger trigger_1 … trigger_{n-1}`.
/// `applied` lists `(trigger, n)`. Like diffusers' `str.replace`, matching is exact and also inside
/// longer words (the tokenizer matches added tokens anywhere too).
pub fn expand_prompt(prompt: &str, applied: &[(String, usize)]) -> String {
    let mut prompt = prompt.to_string();
    for (trigger, n) in applied {
        if *n > 1 && !trigger.is_empty() && prompt.contains(trigger.as_str()) {
            prompt = prompt.replace(trigger.as_str(), &token_names(trigger, *n).join(" "));
        }
    }
    prompt
}

/// A warning when concepts are applied but the prompt names none of their triggers (they would
/// then have no effect on the image).
pub fn missing_trigger_warning(prompt: &str, applied: &[(String, usize)]) -> Option<String> {
    if applied.is_empty() || applied.iter().any(|(t, _)| prompt.contains(t.as_str())) {
        return None;
    }
    let triggers: Vec<&str> = applied.iter().map(|(t, _)| t.as_str()).collect();
    Some(format!(
        "the prompt contains none of the applied concepts' triggers ({}); they will have no effect",
        triggers.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_vector_tokens_are_named_like_diffusers() {
        assert_eq!(token_names("<cat>", 3), ["<cat>", "<cat>_1", "<cat>_2"]);
        assert_eq!(token_names("<cat>", 1), ["<cat>"]);
    }

    #[test]
    fn prompts_expand_every_occurrence() {
        let applied = vec![("<cat>".to_string(), 3), ("<dog>".to_string(), 1)];
        assert_eq!(
            expand_prompt("a <cat> and a <dog>, <cat>!", &applied),
            "a <cat> <cat>_1 <cat>_2 and a <dog>, <cat> <cat>_1 <cat>_2!"
        );
        assert_eq!(expand_prompt("a photo", &applied), "a photo");
    }

    use candle_core::{DType, Device};
    use imprint_models::init::{write_random_model, KnownConfig};
    use imprint_models::loading::ModelFolder;

    fn tiny() -> (tempfile::TempDir, ClipTokenizer, ClipTextTransformer) {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(KnownConfig::Tiny, dir.path(), 0).unwrap();
        let folder = ModelFolder::open(dir.path()).unwrap();
        let te = folder.load_text_encoder(DType::F32, &Device::Cpu).unwrap();
        let tok = folder.tokenizer().unwrap();
        (dir, tok, te)
    }

    fn concept(trigger: &str, n: usize, dim: usize) -> Concept {
        let v: Vec<f32> = (0..n * dim).map(|i| i as f32 * 0.01).collect();
        Concept::textual_inversion(
            trigger,
            Tensor::from_vec(v, (n, dim), &Device::Cpu).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn applying_adds_tokens_and_rows() {
        let (_dir, mut tok, mut te) = tiny();
        let vocab = tok.vocab_size();
        let dim = te.token_embedding.dim(1).unwrap();
        let c = concept("<toy>", 2, dim);
        let names = apply_textual_inversion(&mut tok, &mut te, &c, 2.0).unwrap();
        assert_eq!(names, ["<toy>", "<toy>_1"]);
        assert_eq!(tok.token_id("<toy>_1"), Some(vocab as u32 + 1));
        assert_eq!(te.token_embedding.dim(0).unwrap(), vocab + 2);
        let row = te
            .token_embedding
            .get(vocab + 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = (dim..2 * dim).map(|i| i as f32 * 0.01 * 2.0).collect();
        assert_eq!(row, want);
        // The expanded prompt tokenizes to the new ids, in order.
        let ids = tok.tokenize(&expand_prompt("a <toy>", &[("<toy>".into(), 2)]));
        assert_eq!(&ids[ids.len() - 2..], &[vocab as u32, vocab as u32 + 1]);
    }

    #[test]
    fn clashes_and_mismatches_are_refused_unchanged() {
        let (_dir, mut tok, mut te) = tiny();
        let vocab = tok.vocab_size();
        let dim = te.token_embedding.dim(1).unwrap();
        let e = apply_textual_inversion(&mut tok, &mut te, &concept("<x>", 1, dim + 8), 1.0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("concept '<x>' has {}-dim vectors; this text encoder takes {dim} (was it trained for another base model?)", dim + 8)
        );
        let e = apply_textual_inversion(&mut tok, &mut te, &concept("cat", 1, dim), 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already in the tokenizer"), "{e}");
        apply_textual_inversion(&mut tok, &mut te, &concept("<y>", 1, dim), 1.0).unwrap();
        let e = apply_textual_inversion(&mut tok, &mut te, &concept("<y>", 1, dim), 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'<y>'"), "{e}");
        assert_eq!(tok.vocab_size(), vocab + 1);
        assert_eq!(te.token_embedding.dim(0).unwrap(), vocab + 1);
        let mut xl = concept("<z>", 1, dim);
        xl.embeddings[0].encoder = crate::TEXT_ENCODER_2.into();
        let e = apply_textual_inversion(&mut tok, &mut te, &xl, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no embedding for text_encoder"), "{e}");
    }

    #[test]
    fn warning_when_no_trigger_is_used() {
        let applied = vec![("<cat>".to_string(), 2)];
        assert!(missing_trigger_warning("a photo of a <cat>", &applied).is_none());
        assert!(missing_trigger_warning("a photo", &applied).is_some());
        assert!(missing_trigger_warning("a photo", &[]).is_none());
    }
}
