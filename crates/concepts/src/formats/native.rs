//! imprint's native concept file: one `.safetensors`.
//!
//! Tensors: `<encoder>.token_embeddings` `[n, dim]` f32 for each text encoder the concept feeds
//! (`text_encoder.token_embeddings`, and `text_encoder_2.token_embeddings` for SDXL). Metadata:
//! `imprint.format` = `concept`, `imprint.version` = `1`, `imprint.method`, `imprint.trigger`,
//! `imprint.base_model` (when known), and the concept's free metadata under its own keys.

use super::RawFile;
use crate::{Concept, TokenEmbedding};
use anyhow::{bail, Context, Result};
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
    for (name, t) in raw.tensors {
        let Some(encoder) = name.strip_suffix(SUFFIX) else {
            bail!("unexpected tensor '{name}' in an imprint concept file")
        };
        embeddings
            .push(TokenEmbedding::new(encoder, t).with_context(|| format!("tensor '{name}'"))?);
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
        base_model: meta.get(BASE_MODEL_KEY).cloned(),
        metadata,
    })
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let tensors: HashMap<String, _> = concept
        .embeddings
        .iter()
        .map(|e| (format!("{}{SUFFIX}", e.encoder), e.vectors.clone()))
        .collect();
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
