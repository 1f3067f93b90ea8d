//! diffusers' textual-inversion file: `learned_embeds.safetensors` (or the pickled
//! `learned_embeds.bin`).
//!
//! diffusers' `examples/textual_inversion/textual_inversion.py` saves
//! `{placeholder_token: embeddings[first_id ..= last_id]}` (one `[n, dim]` tensor keyed by the
//! trigger) with safetensors metadata `{"format": "pt"}`. `load_textual_inversion` treats any file
//! holding exactly one tensor as this format and also accepts a 1-D `[dim]` tensor (one vector).
//! The format names no text encoder: it is the first (SDXL's second encoder goes to a separate
//! `learned_embeds_2` file in diffusers' SDXL script, which this module does not write).

use super::RawFile;
use crate::{Concept, TEXTUAL_INVERSION, TEXT_ENCODER};
use anyhow::{bail, Result};
use imprint_models::io::save_safetensors_atomic;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file name diffusers writes and looks for in a folder.
pub const FILE_NAME: &str = "learned_embeds.safetensors";

pub(crate) fn is_diffusers(raw: &RawFile) -> bool {
    raw.tensors.len() == 1
}

pub(crate) fn from_raw(raw: RawFile) -> Result<Concept> {
    let Some((trigger, vectors)) = raw.tensors.into_iter().next() else {
        bail!("a diffusers textual-inversion file must hold exactly one tensor")
    };
    let mut concept = Concept::textual_inversion(&trigger, vectors)?;
    // Keep the saver's metadata other than the standard `format` marker.
    concept.metadata = raw
        .metadata
        .into_iter()
        .filter(|(k, _)| k != "format")
        .collect::<BTreeMap<_, _>>();
    concept.method = TEXTUAL_INVERSION.to_string();
    Ok(concept)
}

/// A folder means `folder/learned_embeds.safetensors`, as diffusers resolves it.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let path = resolve(path);
    if concept.embeddings.iter().any(|e| e.encoder != TEXT_ENCODER) {
        bail!(
            "{}: concept '{}' has embeddings for a second text encoder (SDXL), which diffusers' learned_embeds file cannot hold; use --format a1111 or native",
            path.display(),
            concept.trigger
        )
    }
    let Some(e) = concept.embedding(TEXT_ENCODER) else {
        bail!(
            "{}: concept '{}' has no embeddings for {TEXT_ENCODER}",
            path.display(),
            concept.trigger
        )
    };
    let tensors = HashMap::from([(concept.trigger.clone(), e.vectors.clone())]);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors_atomic(&path, &tensors, Some(meta))
}
