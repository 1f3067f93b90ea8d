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
//!
//! Extended Textual Inversion (P+) keeps one `[n, dim]` tensor per UNet cross-attention layer,
//! `unet.<transformer path>.token_embeddings` (e.g. `unet.down_blocks.0.attentions.1.token_embeddings`),
//! method `extended-textual-inversion`.
//!
//! Perfusion (method `perfusion`; this layout is read by outside tools, keep it):
//! `text_encoder.token_embeddings` `[1, dim]`, `perfusion.target_input` `[dim]` (i*),
//! `perfusion.target_input_cinv` `[dim]` (C⁻¹i*), and per cross-attention layer
//! `unet.<attn2 path>.to_k.target_output` / `….to_v.target_output` `[out]`; metadata
//! `perfusion.superclass` and the inference gate `perfusion.beta` / `perfusion.tau` (optional,
//! defaults 0.7 / 0.15).

use super::RawFile;
use crate::lora::{LoraModule, LoraWeights};
use crate::perfusion::{self, PerfusionEdit, PerfusionLayer};
use crate::{Concept, LayerEmbedding, ProjectionWeights, TokenEmbedding};
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
const UNET_PREFIX: &str = "unet.";
const TARGET_INPUT: &str = "perfusion.target_input";
const TARGET_INPUT_CINV: &str = "perfusion.target_input_cinv";
const KEY_OUTPUT: &str = ".to_k.target_output";
const VALUE_OUTPUT: &str = ".to_v.target_output";
const SUPERCLASS_KEY: &str = "perfusion.superclass";
/// Whole projections (Custom Diffusion): `<network>.<module>.weight_delta` / `.bias_delta`, or
/// the weights themselves as `.weight_full` / `.bias_full`.
const PROJECTION_PARTS: [&str; 4] = [".weight_delta", ".bias_delta", ".weight_full", ".bias_full"];
/// SVDiff: `<network>.<module>.delta` `[r]` (one per singular value; `[1]` for a norm).
const SPECTRAL: &str = ".delta";
/// Further words trained with the trigger: `extra_tokens.<trigger>` `[n, dim]`.
const EXTRA_TOKEN: &str = "extra_tokens.";
const BETA_KEY: &str = "perfusion.beta";
const TAU_KEY: &str = "perfusion.tau";

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
    let mut layer_embeddings = Vec::new();
    let mut pairs: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    let (mut target_input, mut target_input_cinv) = (None, None);
    let mut outputs: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
    let mut projection_parts: BTreeMap<String, [Option<Tensor>; 4]> = BTreeMap::new();
    let mut extra_tokens = vec![];
    let mut spectral_shifts = vec![];
    for (name, t) in raw.tensors {
        if let Some(target) = name.strip_suffix(SPECTRAL) {
            let Some((network, module)) = target.split_once('.') else {
                bail!("spectral shift '{name}' names no network")
            };
            spectral_shifts.push(crate::spectral::SpectralShift {
                network: network.to_string(),
                module: module.to_string(),
                delta: t.to_dtype(candle_core::DType::F32)?.flatten_all()?,
            });
            continue;
        }
        if let Some(trigger) = name.strip_prefix(EXTRA_TOKEN) {
            let e = TokenEmbedding::new(crate::TEXT_ENCODER, t)
                .with_context(|| format!("tensor '{name}'"))?;
            extra_tokens.push((trigger.to_string(), e.vectors));
            continue;
        }
        if let Some(i) = PROJECTION_PARTS.iter().position(|p| name.ends_with(p)) {
            let target = name[..name.len() - PROJECTION_PARTS[i].len()].to_string();
            projection_parts.entry(target).or_default()[i] = Some(t);
            continue;
        }
        if name == TARGET_INPUT {
            target_input = Some(t);
            continue;
        }
        if name == TARGET_INPUT_CINV {
            target_input_cinv = Some(t);
            continue;
        }
        if let Some(rest) = name.strip_prefix(UNET_PREFIX) {
            if let Some(layer) = rest.strip_suffix(SUFFIX) {
                layer_embeddings.push(
                    LayerEmbedding::new(layer, t).with_context(|| format!("tensor '{name}'"))?,
                );
                continue;
            }
            if let Some(module) = rest.strip_suffix(KEY_OUTPUT) {
                outputs.entry(module.to_string()).or_default()[0] = Some(t);
                continue;
            }
            if let Some(module) = rest.strip_suffix(VALUE_OUTPUT) {
                outputs.entry(module.to_string()).or_default()[1] = Some(t);
                continue;
            }
        }
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
    let mut projections = vec![];
    for (target, [wd, bd, wf, bf]) in projection_parts {
        let Some((network, module)) = target.split_once('.') else {
            bail!("projection tensor '{target}' names no network")
        };
        let p = match (wd, bd, wf, bf) {
            (Some(w), b, None, None) => ProjectionWeights::new(network, module, w, b, true)?,
            (None, None, Some(w), b) => ProjectionWeights::new(network, module, w, b, false)?,
            _ => {
                bail!("projection '{target}' mixes changes and whole weights, or lacks its weight")
            }
        };
        projections.push(p);
    }
    let perfusion = match (target_input, target_input_cinv, outputs.is_empty()) {
        (None, None, true) => None,
        (Some(input), Some(cinv), _) => {
            let mut layers = vec![];
            for (module, [key, value]) in outputs {
                let (Some(key_output), Some(value_output)) = (key, value) else {
                    bail!("Perfusion layer '{module}' lacks one of {KEY_OUTPUT}, {VALUE_OUTPUT}")
                };
                layers.push(PerfusionLayer {
                    module,
                    key_output: key_output.to_dtype(candle_core::DType::F32)?,
                    value_output: value_output.to_dtype(candle_core::DType::F32)?,
                });
            }
            let number = |k: &str, default: f64| -> Result<f64> {
                match meta.get(k) {
                    None => Ok(default),
                    Some(v) => v
                        .trim()
                        .parse()
                        .with_context(|| format!("metadata '{k}' = {v:?} is not a number")),
                }
            };
            Some(PerfusionEdit {
                target_input: input.to_dtype(candle_core::DType::F32)?,
                target_input_cinv: cinv.to_dtype(candle_core::DType::F32)?,
                layers,
                superclass: meta.get(SUPERCLASS_KEY).cloned().unwrap_or_default(),
                beta: number(BETA_KEY, perfusion::DEFAULT_BETA)?,
                tau: number(TAU_KEY, perfusion::DEFAULT_TAU)?,
            })
        }
        _ => bail!("a Perfusion concept needs {TARGET_INPUT}, {TARGET_INPUT_CINV} and the layers' target outputs"),
    };
    let metadata: BTreeMap<String, String> = meta
        .iter()
        .filter(|(k, _)| !k.starts_with("imprint."))
        .filter(|(k, _)| {
            perfusion.is_none() || ![SUPERCLASS_KEY, BETA_KEY, TAU_KEY].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Concept {
        trigger: get(TRIGGER_KEY)?,
        method: get(METHOD_KEY)?,
        embeddings,
        lora,
        layer_embeddings,
        perfusion,
        lycoris: vec![],
        projections,
        spectral_shifts,
        extra_tokens,
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
    for p in &concept.projections {
        let base = format!("{}.{}", p.network, p.module);
        let (w, b) = if p.delta {
            (PROJECTION_PARTS[0], PROJECTION_PARTS[1])
        } else {
            (PROJECTION_PARTS[2], PROJECTION_PARTS[3])
        };
        tensors.insert(format!("{base}{w}"), p.weight.clone());
        if let Some(bias) = &p.bias {
            tensors.insert(format!("{base}{b}"), bias.clone());
        }
    }
    for (trigger, v) in &concept.extra_tokens {
        tensors.insert(format!("{EXTRA_TOKEN}{trigger}"), v.clone());
    }
    for s in &concept.spectral_shifts {
        tensors.insert(
            format!("{}.{}{SPECTRAL}", s.network, s.module),
            s.delta.clone(),
        );
    }
    for l in &concept.layer_embeddings {
        tensors.insert(
            format!("{UNET_PREFIX}{}{SUFFIX}", l.layer),
            l.vectors.clone(),
        );
    }
    if let Some(p) = &concept.perfusion {
        tensors.insert(TARGET_INPUT.into(), p.target_input.clone());
        tensors.insert(TARGET_INPUT_CINV.into(), p.target_input_cinv.clone());
        for l in &p.layers {
            let base = format!("{UNET_PREFIX}{}", l.module);
            tensors.insert(format!("{base}{KEY_OUTPUT}"), l.key_output.clone());
            tensors.insert(format!("{base}{VALUE_OUTPUT}"), l.value_output.clone());
        }
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
    if let Some(p) = &concept.perfusion {
        meta.insert(SUPERCLASS_KEY.into(), p.superclass.clone());
        meta.insert(BETA_KEY.into(), p.beta.to_string());
        meta.insert(TAU_KEY.into(), p.tau.to_string());
    }
    save_safetensors_atomic(path, &tensors, Some(meta))
}
