//! Baking LoRA deltas into a model folder (`imprint model merge`), as diffusers' `fuse_lora` then
//! `save_pretrained` would: `W ← W + scale · (alpha / r) · up · down` for every target, the other
//! files copied unchanged.
//!
//! The result is a complete diffusers folder that needs no LoRA support to load. It is built in a
//! temporary sibling of the output and renamed into place at the end, so a failure leaves no
//! half-written model under the requested name.

use crate::lora::{LoraModule, UNET};
use crate::lycoris::LycorisModule;
use crate::{Concept, TEXT_ENCODER};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::loading::weight_files;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where a network's weights live in a diffusers folder: `(subfolder, file stem)`.
fn component(network: &str) -> Result<(&'static str, &'static str)> {
    Ok(match network {
        UNET => ("unet", "diffusion_pytorch_model"),
        TEXT_ENCODER => ("text_encoder", "model"),
        other => bail!("the LoRA has weights for '{other}', which Stable Diffusion 1.x/2.x does not have: is it a LoRA for another architecture (SDXL)?"),
    })
}

/// One weight change to bake: a LoRA pair or a LyCORIS module.
#[derive(Clone, Copy)]
enum Change<'a> {
    Lora(&'a LoraModule),
    Lycoris(&'a LycorisModule),
}

impl Change<'_> {
    fn network(&self) -> &str {
        match self {
            Change::Lora(m) => &m.network,
            Change::Lycoris(m) => &m.network,
        }
    }

    fn module(&self) -> &str {
        match self {
            Change::Lora(m) => &m.module,
            Change::Lycoris(m) => &m.module,
        }
    }

    /// `ΔW` at `scale` for the base weight `w`.
    fn delta(&self, w: &Tensor, scale: f64) -> Result<Tensor> {
        match self {
            Change::Lora(m) => Ok((m.delta_weight()? * scale)?),
            Change::Lycoris(m) => m.delta(w, scale),
        }
    }

    /// The weight names the module's `.weight` may have: the text encoder's with or without the
    /// `text_model.` level (transformers < 5 and 5 save it differently).
    fn weight_keys(&self) -> Vec<String> {
        let mut keys = vec![format!("{}.weight", self.module())];
        if self.network() != UNET {
            if let Some(rest) = self.module().strip_prefix("text_model.") {
                keys.push(format!("{rest}.weight"));
            }
        }
        keys
    }
}

/// Copies `model` to `out` with every concept's LoRA (at its scale) added into the weights.
/// Refuses an existing `out`. Returns the number of weights changed.
pub fn merge_into_folder(model: &Path, concepts: &[(Concept, f64)], out: &Path) -> Result<usize> {
    if out.exists() {
        bail!("{}: already exists; choose a new --out", out.display())
    }
    if !model.join("model_index.json").is_file() {
        bail!(
            "{}: not a diffusers model folder (no model_index.json)",
            model.display()
        )
    }
    // Every delta, grouped by network, checked before anything is written.
    let mut by_network: HashMap<&'static str, Vec<(Change, f64)>> = HashMap::new();
    for (concept, scale) in concepts {
        if !scale.is_finite() {
            bail!("scale {scale} is not a finite number")
        }
        if concept.lora.is_empty() && concept.lycoris.is_empty() {
            bail!(
                "concept '{}' holds no LoRA or LyCORIS weights to merge",
                concept.trigger
            )
        }
        let changes = concept
            .lora
            .modules
            .iter()
            .map(Change::Lora)
            .chain(concept.lycoris.iter().map(Change::Lycoris));
        for c in changes {
            let (sub, _) = component(c.network())?;
            let net = if sub == "unet" { UNET } else { TEXT_ENCODER };
            by_network.entry(net).or_default().push((c, *scale));
        }
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<usize> {
        copy_dir(model, &tmp)?;
        let mut changed = 0;
        for (net, deltas) in &by_network {
            let (sub, stem) = component(net)?;
            changed += merge_component(&model.join(sub), &tmp.join(sub), stem, net, deltas)?;
        }
        std::fs::rename(&tmp, out).with_context(|| {
            format!("{}: cannot move the merged model into place", out.display())
        })?;
        Ok(changed)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))?
    {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("{}: cannot copy", src.display()))?;
        }
    }
    Ok(())
}

fn merge_component(
    src_dir: &Path,
    dst_dir: &Path,
    stem: &str,
    network: &str,
    deltas: &[(Change, f64)],
) -> Result<usize> {
    let files = weight_files(src_dir, stem)?;
    let mut pending: Vec<(Change, f64)> = deltas.to_vec();
    let mut changed = 0;
    for file in &files {
        let bytes =
            std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
        let raw =
            crate::formats::read_safetensors(&bytes).with_context(|| file.display().to_string())?;
        let mut tensors = raw.tensors;
        let mut touched = false;
        let mut rest = Vec::new();
        for (m, scale) in pending {
            let Some(key) = m
                .weight_keys()
                .into_iter()
                .find(|k| tensors.contains_key(k))
            else {
                rest.push((m, scale));
                continue;
            };
            let w = &tensors[&key];
            let delta = m.delta(w, scale)?;
            let delta = if delta.dims() != w.dims()
                && delta.elem_count() == w.elem_count()
                && w.rank() == 4
            {
                // A linear-shaped pair on a 1×1 convolution.
                delta.reshape(w.dims())?
            } else {
                delta
            };
            if delta.dims() != w.dims() {
                bail!(
                    "module '{}': its delta {:?} does not fit the weight '{key}' {:?} in {}: is it for another architecture?",
                    m.module(),
                    delta.dims(),
                    w.dims(),
                    file.display()
                )
            }
            let dtype = w.dtype();
            let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
            tensors.insert(key, merged);
            touched = true;
            changed += 1;
        }
        pending = rest;
        if touched {
            let dst: PathBuf =
                dst_dir.join(file.file_name().context("weight file without a name")?);
            let tensors: HashMap<String, Tensor> = tensors
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
                .collect::<Result<_>>()?;
            let meta = if raw.metadata.is_empty() {
                None
            } else {
                Some(raw.metadata.clone())
            };
            imprint_models::io::save_safetensors_atomic(&dst, &tensors, meta)?;
        }
    }
    if let Some((m, _)) = pending.first() {
        bail!(
            "module '{}' has no weight in this model's {network} ({}): is it for another architecture?",
            m.module(),
            src_dir.display()
        )
    }
    Ok(changed)
}
