//! diffusers / PEFT LoRA files: what `StableDiffusionPipeline.save_lora_weights` writes
//! (`pytorch_lora_weights.safetensors`) and `load_lora_weights` reads.
//!
//! Keys are `<network>.<module path>.<part>`, network `unet`, `text_encoder` (or
//! `text_encoder_2`), parts:
//!
//! - `lora_A.weight` `[r, in(, k, k)]` and `lora_B.weight` `[out, r(, 1, 1)]` (PEFT, diffusers ≥ 0.22);
//! - read only: the older `lora.down.weight` / `lora.up.weight`, the attention-processor spelling
//!   `processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`), and the text encoder's
//!   `lora_linear_layer.down.weight`.
//!
//! The text encoder's module path is transformers' own: with transformers 5 (what diffusers 0.42
//! saves here) it has no `text_model.` level (`text_encoder.encoder.layers.0.self_attn.q_proj`),
//! older files have one. imprint keeps `text_model.…` paths and writes them in the transformers 5
//! spelling, as the pinned reference does; both are read.
//!
//! Alpha: PEFT scales by `lora_alpha / r`. The file carries it only in the safetensors metadata
//! `lora_adapter_metadata`, a JSON object of each network's `LoraConfig` with keys prefixed
//! `unet.` / `text_encoder.` (`unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`,
//! `unet.use_rslora`, ...), written when the trainer passes `unet_lora_adapter_metadata`; files
//! converted from kohya may carry `<network>.<module>.alpha` tensors instead (diffusers'
//! `network_alphas`). With neither, alpha = r (scale 1), as diffusers' `get_peft_kwargs` assumes.
//! With `use_rslora` the scale is `lora_alpha / √r`.

use super::RawFile;
use crate::lora::{LoraModule, LoraWeights, UNET};
use crate::{Concept, TEXT_ENCODER, TEXT_ENCODER_2};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use imprint_models::io::save_safetensors_atomic;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file name diffusers writes and looks for in a folder.
pub const FILE_NAME: &str = "pytorch_lora_weights.safetensors";
/// The safetensors metadata key holding the adapter configs (diffusers' `LORA_ADAPTER_METADATA_KEY`).
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// `(suffix, is_up)` for every spelling of a pair's two halves.
const PARTS: [(&str, bool); 6] = [
    (".lora_A.weight", false),
    (".lora_B.weight", true),
    (".lora.down.weight", false),
    (".lora.up.weight", true),
    (".lora_linear_layer.down.weight", false),
    (".lora_linear_layer.up.weight", true),
];
const ALPHA: &str = ".alpha";

pub(crate) fn is_diffusers_lora(raw: &RawFile) -> bool {
    !raw.pickled
        && raw.tensors.keys().any(|k| {
            PARTS.iter().any(|(s, _)| k.ends_with(s))
                || k.contains("_lora.down.weight")
                || k.ends_with(".lora_magnitude_vector")
        })
}

/// Splits a key's leading network name off; keys without one belong to the UNet, or to the text
/// encoder when they start at `text_model` (files saved from the bare models).
fn split_network(key: &str) -> (&'static str, &str) {
    for net in [TEXT_ENCODER_2, TEXT_ENCODER, UNET] {
        if let Some(rest) = key.strip_prefix(net).and_then(|r| r.strip_prefix('.')) {
            return (net, rest);
        }
    }
    if key.starts_with("text_model.") {
        (TEXT_ENCODER, key)
    } else {
        (UNET, key)
    }
}

/// `down_blocks.0….attn1.processor.to_q_lora` → `down_blocks.0….attn1.to_q`.
fn processor_module(path: &str) -> String {
    match path.rsplit_once(".processor.") {
        Some((block, proj)) => {
            let proj = proj.trim_end_matches("_lora");
            let proj = if proj == "to_out" { "to_out.0" } else { proj };
            format!("{block}.{proj}")
        }
        None => path.to_string(),
    }
}

/// One network's PEFT `LoraConfig` fields that change the scale.
#[derive(Default)]
struct AdapterConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn adapter_configs(raw: &RawFile) -> Result<HashMap<String, AdapterConfig>> {
    let mut out: HashMap<String, AdapterConfig> = HashMap::new();
    let Some(text) = raw.metadata.get(METADATA_KEY) else {
        return Ok(out);
    };
    let map: Map<String, Value> = serde_json::from_str(text)
        .with_context(|| format!("metadata '{METADATA_KEY}' is not a JSON object"))?;
    for (key, value) in map {
        let Some((net, field)) = key.rsplit_once('.') else {
            continue;
        };
        let cfg = out.entry(net.to_string()).or_default();
        match field {
            "lora_alpha" => cfg.lora_alpha = value.as_f64(),
            "use_rslora" => cfg.rslora = value.as_bool().unwrap_or(false),
            "use_dora" if value.as_bool() == Some(true) => {
                bail!("metadata: {net} is a DoRA adapter, which imprint does not support")
            }
            "alpha_pattern" => {
                if let Some(p) = value.as_object() {
                    for (k, v) in p {
                        let v = v
                            .as_f64()
                            .with_context(|| format!("metadata {key}: '{k}' is not a number"))?;
                        cfg.alpha_pattern.push((k.clone(), v));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// PEFT's `alpha_pattern` keys name a module or a dotted suffix of its path.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

pub(crate) fn from_raw(raw: RawFile) -> Result<Concept> {
    let configs = adapter_configs(&raw)?;
    // (network, module as the file names it) -> [down, up, alpha]
    let mut pairs: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, t) in &raw.tensors {
        let (net, rest) = split_network(key);
        let (path, slot) = if let Some(p) = rest.strip_suffix(ALPHA) {
            (p.to_string(), 2)
        } else if let Some((s, up)) = PARTS.iter().find(|(s, _)| rest.ends_with(s)) {
            (rest[..rest.len() - s.len()].to_string(), *up as usize)
        } else if let Some(p) = rest
            .strip_suffix(".down.weight")
            .or_else(|| rest.strip_suffix(".up.weight"))
            .filter(|p| p.ends_with("_lora"))
        {
            (processor_module(p), rest.ends_with(".up.weight") as usize)
        } else if rest.ends_with(".lora_magnitude_vector")
            || rest.contains(".lora_magnitude_vector.")
        {
            bail!("key '{key}': DoRA (lora_magnitude_vector) is not supported")
        } else if rest.contains(".lora_A.") || rest.contains(".lora_B.") {
            bail!("key '{key}': LoRA biases and named adapters are not supported (expected lora_A.weight / lora_B.weight)")
        } else {
            bail!("unexpected tensor '{key}' in a diffusers LoRA file")
        };
        pairs.entry((net.to_string(), path)).or_default()[slot] = Some(t.clone());
    }
    let mut lora = LoraWeights::default();
    for ((net, path), [down, up, alpha]) in pairs {
        let key = format!("{net}.{path}");
        let (Some(down), Some(up)) = (down, up) else {
            bail!("diffusers LoRA '{key}' lacks its lora_A (down) or lora_B (up) tensor")
        };
        let rank = down.dims().first().copied().unwrap_or(0) as f64;
        let cfg = configs.get(&net);
        let alpha = match (alpha, cfg) {
            (Some(a), _) => super::scalar(&a).with_context(|| format!("tensor '{key}{ALPHA}'"))?,
            (None, Some(c)) => {
                let a = c
                    .alpha_pattern
                    .iter()
                    .find(|(p, _)| pattern_matches(p, &path))
                    .map(|(_, a)| *a)
                    .or(c.lora_alpha)
                    .unwrap_or(rank);
                // rsLoRA scales by alpha/√r: the same as alpha·√r over r.
                if c.rslora {
                    a * rank.sqrt()
                } else {
                    a
                }
            }
            (None, None) => rank,
        };
        let module = if net != UNET && !path.starts_with("text_model.") {
            format!("text_model.{path}")
        } else {
            path.clone()
        };
        lora.modules
            .push(LoraModule::new(&net, &module, down, up, alpha, &key)?);
    }
    let mut concept = Concept::lora("", lora);
    concept.metadata = raw
        .metadata
        .iter()
        .filter(|(k, _)| *k != "format" && *k != METADATA_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(concept)
}

/// A folder means `folder/pytorch_lora_weights.safetensors`.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

/// The module path as the pinned diffusers/transformers save it (no `text_model.` level in the
/// text encoder).
fn file_path(m: &LoraModule) -> &str {
    if m.network == UNET {
        &m.module
    } else {
        m.module.strip_prefix("text_model.").unwrap_or(&m.module)
    }
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let path = resolve(path);
    if !concept.embeddings.is_empty() {
        bail!("{}: diffusers keeps token embeddings and LoRA weights in separate files; save the embeddings with a concept holding only them, or use --format native or kohya", path.display())
    }
    let mut tensors = HashMap::new();
    let mut metadata = Map::new();
    for net in concept.lora.networks() {
        let modules: Vec<&LoraModule> = concept.lora.on(net).collect();
        for m in &modules {
            let key = format!("{net}.{}", file_path(m));
            tensors.insert(format!("{key}.lora_A.weight"), m.down.clone());
            tensors.insert(format!("{key}.lora_B.weight"), m.up.clone());
        }
        // The adapter config diffusers' `load_lora_weights` builds its LoraConfig from: the most
        // common rank and alpha, and patterns for the modules that differ.
        let sub = LoraWeights {
            modules: modules.iter().map(|m| (*m).clone()).collect(),
        };
        let (r, alpha) = sub.typical_rank_alpha().unwrap_or((1, 1.0));
        let mut rank_pattern = Map::new();
        let mut alpha_pattern = Map::new();
        for m in &modules {
            if m.rank() != r {
                rank_pattern.insert(file_path(m).to_string(), json!(m.rank()));
            }
            if m.alpha != alpha {
                alpha_pattern.insert(file_path(m).to_string(), number(m.alpha));
            }
        }
        let targets: Vec<&str> = modules.iter().map(|m| file_path(m)).collect();
        metadata.insert(format!("{net}.r"), json!(r));
        metadata.insert(format!("{net}.lora_alpha"), number(alpha));
        metadata.insert(format!("{net}.rank_pattern"), Value::Object(rank_pattern));
        metadata.insert(format!("{net}.alpha_pattern"), Value::Object(alpha_pattern));
        metadata.insert(format!("{net}.target_modules"), json!(targets));
        metadata.insert(format!("{net}.use_dora"), json!(false));
        metadata.insert(format!("{net}.use_rslora"), json!(false));
        metadata.insert(format!("{net}.lora_bias"), json!(false));
    }
    let mut meta: HashMap<String, String> = concept
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("imprint.") && !k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("format".into(), "pt".into());
    meta.insert(
        METADATA_KEY.into(),
        serde_json::to_string_pretty(&Value::Object(metadata))?,
    );
    save_safetensors_atomic(&path, &tensors, Some(meta))
}
