//! imprint's native concept file: one `.safetensors`.
//!
//! Tensors: `<encoder>.token_embeddings` `[n, dim]` f32 for each text encoder the concept feeds
//! (`text_encoder.token_embeddings`, and `text_encoder_2.token_embeddings` for SDXL). Metadata:
//! `imprint.format` = `concept`, `imprint.version` = `1`, `imprint.method`, `imprint.trigger`,
//! `imprint.base_model` (when known), and the concept's free metadata under its own keys.
//!
//! LoRA modules sit beside the embeddings, so one file holds a hybrid concept:
//! `<network>.<module path>.lora_down.weight` `[r, in(, k, k)]`, `….lora_up.weight`
//! `[out, r(, 1, 1)]` and `….alpha` (a 0-d f32 tensor), e.g.
//! `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight` or
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha`.

use super::RawFile;
use crate::lora::{LoraModule, LoraWeights};
use crate::{Concept, TokenEmbedding};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use imprint_models::io::save_safetensors_atomic;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const FORMAT_KEY: &str = "imprint.format";
const VERSION_KEY: &str = "imprint.version";
const METHOD_KEY: &str = "imprint.method";
const TRIGGER_KEY: &str = "imprint.trigger";
const BASE_MODEL_KEY: &str = "imprint.base_model";
const VERSION: &str = "1";
const SUFFIX: &str = ".token_embeddings";
const DOWN: &str = ".lora_down.weight";
const UP: &str = ".lora_up.weight";
const ALPHA: &str = ".alpha";

pub(crate) fn is_native(raw: &RawFile) -> bool {
    !raw.pickled && raw.metadata.get(FORMAT_KEY).map(String::as_str) == Some("concept")
}

pub(crate) fn from_raw(raw: RawFile) -> Result<Concept> {
    let meta = &raw.metadata;
    let version = meta.get(VERSION_KEY).map(String::as_str).unwrap_or("");
    if version != VERSION {
        bail!("imprint concept file version '{version}' is not supported (this build reads version {VERSION}); use a newer imprint")
    }
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .with_context(|| format!("imprint concept file without '{k}' metadata"))
    };
    let mut embeddings = Vec::new();
    let mut pairs: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, t) in raw.tensors {
        if let Some(encoder) = name.strip_suffix(SUFFIX) {
            embeddings
                .push(TokenEmbedding::new(encoder, t).with_context(|| format!("tensor '{name}'"))?);
            continue;
        }
        let slot = [DOWN, UP, ALPHA]
            .iter()
            .position(|s| name.ends_with(s))
            .with_context(|| format!("unexpected tensor '{name}' in an imprint concept file"))?;
        let target = name[..name.len() - [DOWN, UP, ALPHA][slot].len()].to_string();
        pairs.entry(target).or_default()[slot] = Some(t);
    }
    let mut lora = LoraWeights::default();
    for (target, [down, up, alpha]) in pairs {
        let (Some(down), Some(up), Some(alpha)) = (down, up, alpha) else {
            bail!("LoRA module '{target}' lacks one of {DOWN}, {UP}, {ALPHA}")
        };
        let Some((network, module)) = target.split_once('.') else {
            bail!("LoRA tensor '{target}' names no network")
        };
        let alpha = super::scalar(&alpha).with_context(|| format!("tensor '{target}{ALPHA}'"))?;
        lora.modules
            .push(LoraModule::new(network, module, down, up, alpha, &target)?);
    }
    let metadata: BTreeMap<String, String> = meta
        .iter()
        .filter(|(k, _)| !k.starts_with("imprint."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Concept {
        trigger: get(TRIGGER_KEY)?,
        method: get(METHOD_KEY)?,
        embeddings,
        lora,
        base_model: meta.get(BASE_MODEL_KEY).cloned(),
        metadata,
    })
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let mut tensors: HashMap<String, _> = concept
        .embeddings
        .iter()
        .map(|e| (format!("{}{SUFFIX}", e.encoder), e.vectors.clone()))
        .collect();
    for m in &concept.lora.modules {
        let target = format!("{}.{}", m.network, m.module);
        tensors.insert(format!("{target}{DOWN}"), m.down.clone());
        tensors.insert(format!("{target}{UP}"), m.up.clone());
        tensors.insert(
            format!("{target}{ALPHA}"),
            Tensor::new(m.alpha as f32, &Device::Cpu)?,
        );
    }
    let mut meta: HashMap<String, String> = concept
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("imprint."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(FORMAT_KEY.into(), "concept".into());
    meta.insert(VERSION_KEY.into(), VERSION.into());
    meta.insert(METHOD_KEY.into(), concept.method.clone());
    meta.insert(TRIGGER_KEY.into(), concept.trigger.clone());
    if let Some(b) = &concept.base_model {
        meta.insert(BASE_MODEL_KEY.into(), b.clone());
    }
    save_safetensors_atomic(path, &tensors, Some(meta))
}
