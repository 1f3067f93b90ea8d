//! Automatic1111 (stable-diffusion-webui) and kohya embeddings.
//!
//! A1111's `textual_inversion.py` (`create_embedding_from_data`) recognises, and this module reads:
//! - `.safetensors` (or `.pt`) holding `emb_params` `[n, dim]`: what kohya's sd-scripts and
//!   A1111's own safetensors export write;
//! - SDXL embeddings: `clip_l` `[n, 768]` and `clip_g` `[n, 1280]`, one per text encoder;
//! - pickled `.pt` from A1111's trainer: `{"string_to_token": {"*": 265}, "string_to_param":
//!   {"*": tensor}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}` (in old files
//!   `string_to_param` is a `torch.nn.ParameterDict`), read by the restricted parser in
//!   [`super::pt`].
//!
//! A1111 names an embedding after its **file stem**, whatever the file says inside (`name` is
//! informational), so the trigger of a loaded file is its stem and exporting writes no name: the
//! file name is the trigger. Export writes the safetensors form (`emb_params`, or `clip_l` +
//! `clip_g`), which both A1111 and kohya load.

use super::pt::Value;
use super::RawFile;
use crate::{Concept, TokenEmbedding, TEXTUAL_INVERSION, TEXT_ENCODER, TEXT_ENCODER_2};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use imprint_models::io::save_safetensors_atomic;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const EMB_PARAMS: &str = "emb_params";
const CLIP_L: &str = "clip_l";
const CLIP_G: &str = "clip_g";

fn is_sdxl(raw: &RawFile) -> bool {
    raw.tensors.len() == 2 && raw.tensors.contains_key(CLIP_L) && raw.tensors.contains_key(CLIP_G)
}

pub(crate) fn is_a1111(raw: &RawFile) -> bool {
    let string_to_param = raw
        .pickle
        .as_ref()
        .is_some_and(|p| p.get("string_to_param").is_some());
    string_to_param || raw.tensors.contains_key(EMB_PARAMS) || is_sdxl(raw)
}

/// The single tensor of A1111's `string_to_param` (A1111 asserts there is exactly one; its key is
/// `*`).
fn string_to_param(pickle: &Value) -> Result<Tensor> {
    let Some(Value::Dict(items)) = pickle.get("string_to_param") else {
        bail!("A1111 embedding: `string_to_param` is not a dict")
    };
    match items.as_slice() {
        [(_, Value::Tensor(t))] => Ok(t.clone()),
        _ => bail!(
            "A1111 embedding: `string_to_param` must hold exactly one tensor, it holds {} entries",
            items.len()
        ),
    }
}

pub(crate) fn from_raw(raw: RawFile, path: &Path) -> Result<Concept> {
    let trigger = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .context("A1111 embeddings are named by their file name, and this path has none")?;
    let embeddings = if is_sdxl(&raw) {
        vec![
            TokenEmbedding::new(TEXT_ENCODER, raw.tensors[CLIP_L].clone()).context(CLIP_L)?,
            TokenEmbedding::new(TEXT_ENCODER_2, raw.tensors[CLIP_G].clone()).context(CLIP_G)?,
        ]
    } else if let Some(t) = raw.tensors.get(EMB_PARAMS) {
        vec![TokenEmbedding::new(TEXT_ENCODER, t.clone()).context(EMB_PARAMS)?]
    } else {
        let pickle = raw
            .pickle
            .as_ref()
            .context("A1111 embedding without tensors")?;
        let t = string_to_param(pickle)?;
        vec![TokenEmbedding::new(TEXT_ENCODER, t).context("string_to_param")?]
    };
    // The trainer's bookkeeping (name, step, checkpoint) is kept as notes.
    let metadata: BTreeMap<String, String> = raw
        .metadata
        .iter()
        .map(|(k, v)| (format!("a1111.{k}"), v.clone()))
        .collect();
    Ok(Concept {
        trigger,
        method: TEXTUAL_INVERSION.to_string(),
        embeddings,
        lora: Default::default(),
        base_model: raw.metadata.get("sd_checkpoint_name").cloned(),
        metadata,
        ..Default::default()
    })
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let first = concept.embedding(TEXT_ENCODER);
    let second = concept.embedding(TEXT_ENCODER_2);
    let tensors: HashMap<String, Tensor> = match (first, second) {
        (Some(l), None) => HashMap::from([(EMB_PARAMS.to_string(), l.vectors.clone())]),
        (Some(l), Some(g)) => HashMap::from([
            (CLIP_L.to_string(), l.vectors.clone()),
            (CLIP_G.to_string(), g.vectors.clone()),
        ]),
        _ => bail!(
            "{}: concept '{}' has no embeddings for {TEXT_ENCODER}, which A1111 files require",
            path.display(),
            concept.trigger
        ),
    };
    if concept.embeddings.len() > tensors.len() {
        bail!(
            "{}: concept '{}' has embeddings A1111 files cannot hold",
            path.display(),
            concept.trigger
        )
    }
    save_safetensors_atomic(path, &tensors, None)
}
