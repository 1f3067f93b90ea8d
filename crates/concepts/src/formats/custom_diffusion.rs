//! Custom Diffusion output folders, as diffusers' `examples/custom_diffusion/train_custom_diffusion.py`
//! writes them (Kumari et al. 2023):
//!
//! - `pytorch_custom_diffusion_weights.safetensors` (or the pickled `.bin`, read without
//!   unpickling code): per cross-attention layer `<attn2 path>.processor.to_k_custom_diffusion.weight`
//!   and `….to_v_custom_diffusion.weight` `[hidden, cross_dim]`, with `--freeze_model crossattn`
//!   also `to_q_custom_diffusion.weight` and `to_out_custom_diffusion.0.weight` / `.bias`. These
//!   are the fine-tuned projections themselves, which replace the model's (diffusers'
//!   `CustomDiffusionAttnProcessor`). The `.bin` may hold empty entries for the `attn1`
//!   processors; the `.safetensors` drops them.
//! - one `<token>.safetensors` per modifier token: `{"<new1>": [dim]}`, metadata `{"format": "pt"}`,
//!   loaded by `load_textual_inversion(DIR, weight_name="<new1>.safetensors")`.
//!
//! A folder is read whole: the weights and every token file beside them.

use super::RawFile;
use crate::{Concept, ProjectionWeights, UNET};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use imprint_models::io::save_safetensors_atomic;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The weights file diffusers writes and looks for in a folder.
pub const WEIGHTS: &str = "pytorch_custom_diffusion_weights.safetensors";
pub const WEIGHTS_BIN: &str = "pytorch_custom_diffusion_weights.bin";
/// The method name Custom Diffusion concepts carry.
pub const CUSTOM_DIFFUSION: &str = "custom-diffusion";

const PROCESSOR: &str = ".processor.";
/// `(processor parameter, the attention's own projection)`.
const PARTS: [(&str, &str); 4] = [
    ("to_k_custom_diffusion", "to_k"),
    ("to_v_custom_diffusion", "to_v"),
    ("to_q_custom_diffusion", "to_q"),
    ("to_out_custom_diffusion.0", "to_out.0"),
];

/// The weights file of a Custom Diffusion folder, when there is one.
pub fn resolve(dir: &Path) -> Option<PathBuf> {
    [WEIGHTS, WEIGHTS_BIN]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

pub(crate) fn is_custom_diffusion(raw: &RawFile) -> bool {
    raw.tensors
        .keys()
        .any(|k| k.contains(".processor.to_k_custom_diffusion."))
}

/// The projections of a weights file; `attn1` entries without tensors are skipped.
pub(crate) fn projections(raw: &RawFile) -> Result<Vec<ProjectionWeights>> {
    let mut by_module: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in &raw.tensors {
        let Some((layer, rest)) = key.split_once(PROCESSOR) else {
            bail!("unexpected tensor '{key}' in a Custom Diffusion weights file")
        };
        let Some((param, own)) = PARTS
            .iter()
            .find(|(p, _)| rest.starts_with(&format!("{p}.")))
        else {
            bail!("unexpected tensor '{key}' in a Custom Diffusion weights file (expected to_k/to_v/to_q/to_out custom_diffusion parameters)")
        };
        let slot = by_module.entry(format!("{layer}.{own}")).or_default();
        match &rest[param.len() + 1..] {
            "weight" => slot.0 = Some(t.clone()),
            "bias" => slot.1 = Some(t.clone()),
            other => bail!("unexpected tensor '{key}' ('{other}')"),
        }
    }
    by_module
        .into_iter()
        .map(|(module, (weight, bias))| {
            let weight = weight
                .with_context(|| format!("Custom Diffusion layer '{module}' has no weight"))?;
            ProjectionWeights::new(UNET, &module, weight, bias, false)
        })
        .collect()
}

/// Reads a folder (or its weights file): the projections, and the modifier tokens of every
/// token file beside the weights.
pub(crate) fn from_raw(raw: RawFile, weights_path: &Path) -> Result<Concept> {
    let projections = projections(&raw)?;
    if projections.is_empty() {
        bail!("a Custom Diffusion weights file without any weights")
    }
    let dir = weights_path.parent().unwrap_or(Path::new("."));
    let mut tokens: Vec<(String, Tensor)> = vec![];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.as_path() != weights_path)
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "bin")
            )
        })
        .collect();
    entries.sort();
    // Token files: one tensor named as the file's stem (`<new1>.safetensors` holds "<new1>").
    // Anything else beside the weights is not part of the concept.
    for p in entries {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(raw) = super::read_raw(&p) else {
            eprintln!(
                "warning: {}: not a readable token file; skipped",
                p.display()
            );
            continue;
        };
        if raw.tensors.len() == 1 && raw.tensors.contains_key(&stem) {
            if tokens.iter().any(|(n, _)| *n == stem) {
                continue; // the same token as .bin and .safetensors
            }
            let t = raw.tensors.into_values().next().context("one tensor")?;
            tokens.push((stem, t));
        }
    }
    // `<new2>` before `<new10>`: by the number in the name, then by name.
    let number = |s: &str| -> u64 {
        s.chars()
            .filter(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    };
    tokens.sort_by(|a, b| number(&a.0).cmp(&number(&b.0)).then_with(|| a.0.cmp(&b.0)));
    let mut concept = Concept {
        method: CUSTOM_DIFFUSION.to_string(),
        projections,
        ..Default::default()
    };
    let mut tokens = tokens.into_iter();
    if let Some((trigger, vectors)) = tokens.next() {
        concept.trigger = trigger;
        concept.embeddings = vec![crate::TokenEmbedding::new(crate::TEXT_ENCODER, vectors)?];
    }
    for (name, vectors) in tokens {
        concept.extra_tokens.push((name, vectors));
    }
    Ok(concept)
}

/// Writes the folder diffusers' script writes. The projections must be whole weights (deltas
/// need the base model: see `ProjectionWeights::delta`).
pub(crate) fn save(concept: &Concept, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for p in &concept.projections {
        if p.delta {
            bail!("{}: concept '{}' holds weight changes, not the fine-tuned weights diffusers' folder needs; write it from training (which knows the base model) or apply it to the model first", dir.display(), concept.trigger)
        }
        let Some((layer, own)) = p.module.rsplit_once(".to_") else {
            bail!(
                "{}: '{}' is not a cross-attention projection",
                dir.display(),
                p.module
            )
        };
        let own = format!("to_{own}");
        let (param, _) = PARTS
            .iter()
            .find(|(_, o)| *o == own)
            .with_context(|| format!("'{}' is no Custom Diffusion parameter", p.module))?;
        tensors.insert(
            format!("{layer}{PROCESSOR}{param}.weight"),
            p.weight.clone(),
        );
        if let Some(b) = &p.bias {
            tensors.insert(format!("{layer}{PROCESSOR}{param}.bias"), b.clone());
        }
    }
    save_safetensors_atomic(&dir.join(WEIGHTS), &tensors, None)?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let write_token = |name: &str, vectors: &Tensor| -> Result<()> {
        let row = if vectors.rank() == 2 && vectors.dim(0)? == 1 {
            vectors.squeeze(0)?
        } else {
            vectors.clone()
        };
        let t = HashMap::from([(name.to_string(), row)]);
        save_safetensors_atomic(
            &dir.join(format!("{name}.safetensors")),
            &t,
            Some(meta.clone()),
        )
    };
    if let Some(e) = concept.embedding(crate::TEXT_ENCODER) {
        write_token(&concept.trigger, &e.vectors)?;
    }
    for (name, v) in &concept.extra_tokens {
        write_token(name, v)?;
    }
    Ok(())
}
