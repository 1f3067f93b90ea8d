//! kohya-ss Extended Textual Inversion files (`sd-scripts` `train_textual_inversion_XTI.py`, read
//! by its `gen_img_diffusers.py --XTI_embeddings`).
//!
//! Exactly 16 tensors, one per cross-attention layer of the SD 1.x/2.x UNet, each `[n, dim]`,
//! keyed by the layer's name in the original LDM UNet: `IN01 IN02 IN04 IN05 IN07 IN08` (input
//! blocks with attention), `MID`, `OUT03` … `OUT11` (output blocks with attention). No metadata;
//! the trigger is the file's stem, as for A1111 embeddings. Reading maps keys by name (never by
//! position) to the diffusers transformer paths in [`DIFFUSERS_LAYERS`].

use super::RawFile;
use crate::{Concept, LayerEmbedding};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use imprint_models::io::save_safetensors_atomic;
use std::collections::HashMap;
use std::path::Path;

/// kohya's layer names, in the UNet's forward order.
pub const KOHYA_LAYERS: [&str; 16] = [
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06",
    "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
];

/// The diffusers transformer each kohya name stands for (same order as [`KOHYA_LAYERS`]).
pub const DIFFUSERS_LAYERS: [&str; 16] = [
    "down_blocks.0.attentions.0",
    "down_blocks.0.attentions.1",
    "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1",
    "down_blocks.2.attentions.0",
    "down_blocks.2.attentions.1",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
    "up_blocks.2.attentions.2",
    "up_blocks.3.attentions.0",
    "up_blocks.3.attentions.1",
    "up_blocks.3.attentions.2",
];

/// A file whose tensors are exactly the 16 kohya layer names.
pub(crate) fn is_kohya_xti(raw: &RawFile) -> bool {
    raw.tensors.len() == KOHYA_LAYERS.len()
        && KOHYA_LAYERS.iter().all(|k| raw.tensors.contains_key(*k))
}

/// A file of kohya layer names that lacks some of them: an error naming what is missing.
pub(crate) fn check_incomplete(raw: &RawFile) -> Result<()> {
    let all_kohya = raw
        .tensors
        .keys()
        .all(|k| KOHYA_LAYERS.contains(&k.as_str()));
    if !raw.tensors.is_empty() && all_kohya && !is_kohya_xti(raw) {
        let missing: Vec<&str> = KOHYA_LAYERS
            .iter()
            .filter(|k| !raw.tensors.contains_key(**k))
            .copied()
            .collect();
        bail!(
            "a kohya XTI file needs all 16 layers IN01…OUT11; this one lacks {}",
            missing.join(", ")
        )
    }
    Ok(())
}

pub(crate) fn from_raw(raw: RawFile, path: &Path) -> Result<Concept> {
    let trigger = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .context("kohya XTI embeddings are named by their file name, and this path has none")?;
    let layers = KOHYA_LAYERS
        .iter()
        .zip(DIFFUSERS_LAYERS)
        .map(|(k, d)| {
            let t = raw
                .tensors
                .get(*k)
                .with_context(|| format!("kohya XTI file without layer {k}"))?;
            LayerEmbedding::new(d, t.clone()).with_context(|| format!("layer {k}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut concept = Concept::extended_textual_inversion(&trigger, layers);
    concept
        .metadata
        .insert("source_format".into(), "kohya-xti".into());
    Ok(concept)
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let have: Vec<&str> = concept
        .layer_embeddings
        .iter()
        .map(|l| l.layer.as_str())
        .collect();
    if have.len() != DIFFUSERS_LAYERS.len() || !DIFFUSERS_LAYERS.iter().all(|d| have.contains(d)) {
        bail!(
            "{}: kohya XTI files hold the 16 cross-attention layers of SD 1.x/2.x; concept '{}' has {} layers ({})",
            path.display(),
            concept.trigger,
            have.len(),
            have.join(", ")
        )
    }
    for l in &concept.layer_embeddings {
        let i = DIFFUSERS_LAYERS
            .iter()
            .position(|d| *d == l.layer)
            .context("checked above")?;
        tensors.insert(KOHYA_LAYERS[i].to_string(), l.vectors.clone());
    }
    save_safetensors_atomic(path, &tensors, None)
}
