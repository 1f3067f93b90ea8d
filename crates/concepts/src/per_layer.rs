//! Per-layer token embeddings applied to a model: Extended Textual Inversion (P+, Voynov et al.
//! 2023) and style mixing.
//!
//! A P+ concept gives its trigger other vectors in every UNet cross-attention layer. Applying it
//! registers the trigger's tokens like Textual Inversion does ([`crate::apply`]; the table rows hold
//! the first layer's vectors) and remembers the vectors of every layer. Encoding a prompt that
//! names such a trigger then runs the text encoder once over a batch of the distinct per-layer
//! variants of the prompt and hands each cross-attention layer its own states; the other words of
//! the prompt are unchanged in every layer. A concept whose layers all hold the same vectors
//! encodes to exactly the Textual Inversion result (one variant, shared states).
//!
//! **Style mixing** (the paper's §6): a concept applied to a subset of layers (`FILE@down` on the
//! command line, [`select_layers`]) and another applied to the complementary subset form a mix:
//! wherever either trigger appears, each layer takes the vectors of the concept applied there.
//! Outside every other concept's layers, a restricted concept keeps its own vectors.

use crate::apply::apply_textual_inversion;
use crate::formats::kohya_xti::KOHYA_LAYERS;
use crate::{Concept, TEXT_ENCODER};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use imprint_models::clip::ClipTextTransformer;
use imprint_models::tokenizer::ClipTokenizer;
use imprint_models::TextStates;

/// Token embeddings `[B, S, D]` for `ids [B, S]` with the positions of `token_ids[k]` taken from
/// row `k` of `vectors [n, dim]` (differentiable in `vectors`); other positions read the table.
/// Ids past the table (tokens registered only in the tokenizer, as training does) are allowed
/// when they are among `token_ids`.
pub fn substitute_tokens(
    te: &ClipTextTransformer,
    ids: &Tensor,
    token_ids: &[u32],
    vectors: &Tensor,
) -> Result<Tensor> {
    let vocab = te.token_embedding.dim(0)? as i64;
    let ids64 = ids.to_dtype(DType::I64)?;
    let in_table = ids64.lt(vocab)?;
    let base_ids = in_table.where_cond(&ids64, &ids64.zeros_like()?)?;
    let mut keep = in_table.to_dtype(DType::F32)?;
    let mut masks = Vec::with_capacity(token_ids.len());
    for &id in token_ids {
        let mask = ids64.eq(id as i64)?.to_dtype(DType::F32)?;
        keep = (keep - &mask)?.relu()?;
        masks.push(mask.unsqueeze(2)?);
    }
    let mut embeds = te
        .embed_tokens(&base_ids)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&keep.unsqueeze(2)?)?;
    let vectors = vectors.to_dtype(DType::F32)?;
    for (k, mask) in masks.iter().enumerate() {
        let row = vectors.narrow(0, k, 1)?.unsqueeze(0)?;
        embeds = (embeds + mask.broadcast_mul(&row)?)?;
    }
    Ok(embeds.to_dtype(te.dtype())?)
}

/// Which of a UNet's cross-attention layers a spec names. `keys` are the UNet's layer keys in
/// forward order (`UNet2DConditionModel::embedding_keys`). A spec is a comma-separated list of
/// `down`, `mid`, `up`, a module path prefix (`up_blocks.1`, `down_blocks.0.attentions.1`),
/// kohya's XTI names (`IN01`…`OUT11`, on the 16-layer SD 1.x/2.x UNet), layer indices or ranges
/// (`0-5`, in forward order).
pub fn select_layers(spec: &str, keys: &[String]) -> Result<Vec<bool>> {
    if keys.is_empty() {
        bail!("this UNet has no cross-attention layers to select")
    }
    let mut on = vec![false; keys.len()];
    for item in spec.split(',').map(str::trim) {
        if item.is_empty() {
            bail!("layer list '{spec}' has an empty entry")
        }
        let prefix = match item {
            "down" => Some("down_blocks."),
            "mid" => Some("mid_block."),
            "up" => Some("up_blocks."),
            _ => None,
        };
        let mut hit = false;
        if let Some(p) = prefix {
            for (i, k) in keys.iter().enumerate() {
                if k.starts_with(p) {
                    on[i] = true;
                    hit = true;
                }
            }
        } else if let Some(pos) = KOHYA_LAYERS
            .iter()
            .position(|k| k.eq_ignore_ascii_case(item))
        {
            if keys.len() != KOHYA_LAYERS.len() {
                bail!("layer '{item}' is a kohya XTI name, which needs the 16 cross-attention layers of SD 1.x/2.x; this UNet has {}", keys.len())
            }
            on[pos] = true;
            hit = true;
        } else if let Some((a, b)) = item.split_once('-') {
            let (a, b): (usize, usize) = (
                a.trim()
                    .parse()
                    .with_context(|| format!("layer range '{item}'"))?,
                b.trim()
                    .parse()
                    .with_context(|| format!("layer range '{item}'"))?,
            );
            if a > b || b >= keys.len() {
                bail!("layer range '{item}' is outside 0-{}", keys.len() - 1)
            }
            on[a..=b].iter_mut().for_each(|v| *v = true);
            hit = true;
        } else if let Ok(i) = item.parse::<usize>() {
            if i >= keys.len() {
                bail!("layer {i} is outside 0-{}", keys.len().saturating_sub(1))
            }
            on[i] = true;
            hit = true;
        } else {
            for (i, k) in keys.iter().enumerate() {
                if k == item || k.starts_with(&format!("{item}.")) {
                    on[i] = true;
                    hit = true;
                }
            }
        }
        if !hit {
            bail!(
                "layer '{item}' names none of this UNet's cross-attention layers ({})",
                keys.join(", ")
            )
        }
    }
    Ok(on)
}

/// One applied concept whose vectors vary by layer (or that is restricted to some layers).
#[derive(Clone)]
struct Applied {
    token_ids: Vec<u32>,
    /// The distinct `[n, dim]` vectors it uses (on the text encoder's device and dtype, scaled).
    variants: Vec<Tensor>,
    /// For each layer, its index in `variants`.
    variant_of_layer: Vec<usize>,
    /// The layers it is applied to (`None`: all).
    only: Option<Vec<bool>>,
}

/// The per-layer concepts applied to one model, and the encoding of prompts through them.
#[derive(Default, Clone)]
pub struct PerLayerTokens {
    applied: Vec<Applied>,
}

impl PerLayerTokens {
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }

    /// Registers `concept`'s tokens in `tokenizer` and `te` and remembers its per-layer vectors.
    /// `keys` are the UNet's layer keys in forward order; `only` restricts the concept to some
    /// layers (style mixing). A P+ concept must have exactly the UNet's layers. Returns the new
    /// token names. Nothing changes when it fails.
    pub fn apply(
        &mut self,
        tokenizer: &mut ClipTokenizer,
        te: &mut ClipTextTransformer,
        concept: &Concept,
        scale: f64,
        keys: &[String],
        only: Option<Vec<bool>>,
    ) -> Result<Vec<String>> {
        concept.validate()?;
        let name = &concept.trigger;
        if keys.is_empty() {
            bail!("concept '{name}': this UNet has no cross-attention layers for per-layer words")
        }
        let per_layer: Vec<Tensor> = if concept.layer_embeddings.is_empty() {
            let e = concept.embedding(TEXT_ENCODER).with_context(|| {
                format!("concept '{name}' has no token embeddings to apply per layer")
            })?;
            vec![e.vectors.clone(); keys.len()]
        } else {
            let have: Vec<&str> = concept
                .layer_embeddings
                .iter()
                .map(|l| l.layer.as_str())
                .collect();
            if let Some(extra) = have.iter().find(|h| !keys.iter().any(|k| k == *h)) {
                bail!("concept '{name}' has vectors for layer '{extra}', which this UNet does not have; its cross-attention layers are {} (was it trained for another base model?)", keys.join(", "))
            }
            keys.iter()
                .map(|k| {
                    concept
                        .layer_embeddings
                        .iter()
                        .find(|l| &l.layer == k)
                        .map(|l| l.vectors.clone())
                        .with_context(|| {
                            format!(
                                "concept '{name}' has no vectors for layer '{k}' (it has {})",
                                have.join(", ")
                            )
                        })
                })
                .collect::<Result<_>>()?
        };
        if let Some(o) = &only {
            if o.len() != keys.len() || !o.iter().any(|v| *v) {
                bail!("concept '{name}': the layer selection names no layer")
            }
        }
        let width = te.token_embedding.dim(1)?;
        if concept.dim() != width {
            bail!(
                "concept '{name}' has {}-dim vectors; this text encoder takes {width} (was it trained for another base model?)",
                concept.dim()
            )
        }
        // Distinct vectors, compared by value, so identical layers share one encoder pass.
        let mut variants: Vec<Tensor> = vec![];
        let mut values: Vec<Vec<f32>> = vec![];
        let mut variant_of_layer = vec![];
        for v in &per_layer {
            let flat = v.flatten_all()?.to_vec1::<f32>()?;
            let i = match values.iter().position(|x| *x == flat) {
                Some(i) => i,
                None => {
                    values.push(flat);
                    variants.push(v.clone());
                    variants.len() - 1
                }
            };
            variant_of_layer.push(i);
        }
        let registered = Concept::textual_inversion(name, per_layer[0].clone())?;
        let tokens = apply_textual_inversion(tokenizer, te, &registered, scale)?;
        let token_ids = tokens
            .iter()
            .map(|t| tokenizer.token_id(t).context("registered token vanished"))
            .collect::<Result<Vec<_>>>()?;
        let (device, dtype) = (te.device().clone(), te.dtype());
        let variants = variants
            .iter()
            .map(|v| Ok((v.to_device(&device)? * scale)?.to_dtype(dtype)?))
            .collect::<Result<Vec<_>>>()?;
        self.applied.push(Applied {
            token_ids,
            variants,
            variant_of_layer,
            only,
        });
        Ok(tokens)
    }

    /// The concept and variant whose vectors concept `c`'s tokens take in layer `l`.
    fn source(&self, c: usize, l: usize) -> (usize, usize) {
        let me = &self.applied[c];
        let outside = me.only.as_ref().is_some_and(|o| !o[l]);
        if outside {
            let n = me.token_ids.len();
            if let Some((j, other)) = self.applied.iter().enumerate().find(|(j, a)| {
                *j != c && a.token_ids.len() == n && a.only.as_ref().is_some_and(|o| o[l])
            }) {
                return (j, other.variant_of_layer[l]);
            }
        }
        (c, me.variant_of_layer[l])
    }

    /// Text states for `ids [B, S]`: shared when the ids name no per-layer concept, else one
    /// tensor per layer, from one encoder pass over the distinct variants.
    pub fn encode(
        &self,
        te: &ClipTextTransformer,
        ids: &Tensor,
        clip_skip: usize,
        num_layers: usize,
    ) -> Result<TextStates> {
        let flat = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let present: Vec<usize> = (0..self.applied.len())
            .filter(|&c| {
                self.applied[c]
                    .token_ids
                    .iter()
                    .any(|&t| flat.contains(&(t as i64)))
            })
            .collect();
        if present.is_empty() {
            return Ok(TextStates::Shared(
                te.forward(ids, clip_skip)?.last_hidden_state,
            ));
        }
        let mut signatures: Vec<Vec<(usize, usize)>> = vec![];
        let mut of_layer = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let sig: Vec<(usize, usize)> = present.iter().map(|&c| self.source(c, l)).collect();
            let i = match signatures.iter().position(|s| *s == sig) {
                Some(i) => i,
                None => {
                    signatures.push(sig);
                    signatures.len() - 1
                }
            };
            of_layer.push(i);
        }
        let mut batch = vec![];
        for sig in &signatures {
            let mut token_ids = vec![];
            let mut rows = vec![];
            for (&c, &(src, var)) in present.iter().zip(sig) {
                token_ids.extend(&self.applied[c].token_ids);
                rows.push(self.applied[src].variants[var].clone());
            }
            let vectors = Tensor::cat(&rows, 0)?;
            batch.push(substitute_tokens(te, ids, &token_ids, &vectors)?);
        }
        let b = ids.dim(0)?;
        let v = batch.len();
        let embeds = Tensor::cat(&batch, 0)?;
        let all_ids = Tensor::cat(&vec![ids.clone(); v], 0)?;
        let states = te
            .forward_embeds(&embeds, &all_ids, clip_skip)?
            .last_hidden_state;
        let variants: Vec<Tensor> = (0..v)
            .map(|i| states.narrow(0, i * b, b))
            .collect::<candle_core::Result<_>>()?;
        Ok(TextStates::per_layer(
            of_layer.iter().map(|&i| variants[i].clone()).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        [
            "down_blocks.0.attentions.0",
            "down_blocks.0.attentions.1",
            "mid_block.attentions.0",
            "up_blocks.1.attentions.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn layer_specs_select_by_block_path_and_index() {
        let k = keys();
        assert_eq!(
            select_layers("down", &k).unwrap(),
            [true, true, false, false]
        );
        assert_eq!(
            select_layers("mid,up", &k).unwrap(),
            [false, false, true, true]
        );
        assert_eq!(
            select_layers("down_blocks.0.attentions.1", &k).unwrap(),
            [false, true, false, false]
        );
        assert_eq!(
            select_layers("1-2", &k).unwrap(),
            [false, true, true, false]
        );
        assert_eq!(select_layers("3", &k).unwrap(), [false, false, false, true]);
        assert!(select_layers("up_blocks.3", &k).is_err());
        assert!(select_layers("5", &k).is_err());
        let e = select_layers("IN01", &k).unwrap_err().to_string();
        assert!(e.contains("16 cross-attention layers"), "{e}");
    }
}
