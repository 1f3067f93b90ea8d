//! The SVDiff layout of the public implementation (svdiff-pytorch): a folder with
//! `spectral_shifts.safetensors` (the UNet's) and optionally `spectral_shifts_te.safetensors`
//! (the text encoder's), each mapping `<module path>.delta` to that weight's shifts — `[r]` for a
//! linear, conv or embedding weight, `[1]` for a norm. No trigger is stored: prompts use the rare
//! word the concept was trained with (e.g. "sks").

use super::RawFile;
use crate::spectral::{SpectralShift, SVDIFF};
use crate::{Concept, TEXT_ENCODER, UNET};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use imprint_models::io::save_safetensors_atomic;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const UNET_FILE: &str = "spectral_shifts.safetensors";
pub const TEXT_ENCODER_FILE: &str = "spectral_shifts_te.safetensors";
const SUFFIX: &str = ".delta";

/// The UNet file of an SVDiff folder.
pub fn resolve(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(UNET_FILE);
    p.is_file().then_some(p)
}

/// Every tensor is a `….delta` and there is no imprint metadata.
pub(crate) fn is_svdiff(raw: &RawFile) -> bool {
    !raw.pickled && !raw.tensors.is_empty() && raw.tensors.keys().all(|k| k.ends_with(SUFFIX))
}

fn shifts(raw: RawFile, network: &str) -> Result<Vec<SpectralShift>> {
    raw.tensors
        .into_iter()
        .map(|(name, t)| {
            let module = name.strip_suffix(SUFFIX).expect("checked suffix");
            Ok(SpectralShift {
                network: network.to_string(),
                module: module.to_string(),
                delta: t.to_dtype(DType::F32)?.flatten_all()?,
            })
        })
        .collect()
}

/// Reads `path` (a `spectral_shifts*.safetensors`) and, beside the UNet's, the text encoder's.
pub(crate) fn from_raw(raw: RawFile, path: &Path) -> Result<Concept> {
    let te_file = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy() == TEXT_ENCODER_FILE);
    let mut all = shifts(raw, if te_file { TEXT_ENCODER } else { UNET })?;
    if !te_file {
        let te = path.with_file_name(TEXT_ENCODER_FILE);
        if te.is_file() {
            let raw = super::read_raw(&te)?;
            if !is_svdiff(&raw) {
                bail!("{}: not a spectral-shifts file", te.display())
            }
            all.extend(shifts(raw, TEXT_ENCODER)?);
        }
    }
    Ok(Concept {
        trigger: String::new(),
        method: SVDIFF.to_string(),
        spectral_shifts: all,
        ..Default::default()
    })
}

/// Writes the folder `dir` (created if missing).
pub fn save(concept: &Concept, dir: &Path) -> Result<()> {
    if concept.spectral_shifts.is_empty() {
        bail!(
            "{}: concept '{}' holds no spectral shifts (SVDiff)",
            dir.display(),
            concept.trigger
        )
    }
    if concept.has_tokens() || !concept.lora.is_empty() || !concept.projections.is_empty() {
        bail!("{}: the SVDiff folder holds spectral shifts only; this concept has more (use --format native)", dir.display())
    }
    // Both files are written to a fresh folder first; then each replaces its old copy, and an
    // old text-encoder file the concept has no counterpart for is removed (it would otherwise be
    // read back as part of this concept).
    let tmp = PathBuf::from(format!("{}.partial-{}", dir.display(), std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut written = vec![];
    for (network, file) in [(UNET, UNET_FILE), (TEXT_ENCODER, TEXT_ENCODER_FILE)] {
        let t: HashMap<String, Tensor> = concept
            .spectral_shifts
            .iter()
            .filter(|s| s.network == network)
            .map(|s| (format!("{}{SUFFIX}", s.module), s.delta.clone()))
            .collect();
        if !t.is_empty() {
            save_safetensors_atomic(&tmp.join(file), &t, None)?;
            written.push(file);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for file in [UNET_FILE, TEXT_ENCODER_FILE] {
        if written.contains(&file) {
            std::fs::rename(tmp.join(file), dir.join(file))?;
        } else if dir.join(file).exists() {
            std::fs::remove_file(dir.join(file))?;
        }
    }
    let _ = std::fs::remove_dir(&tmp);
    Ok(())
}
