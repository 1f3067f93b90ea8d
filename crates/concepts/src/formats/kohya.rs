//! kohya-ss LoRA files (`sd-scripts` `networks/lora.py`), the format A1111, ComfyUI and most
//! shared SD LoRAs use.
//!
//! Keys are `<prefix><module path with '.' → '_'>.<part>`:
//!
//! - prefix `lora_unet_` for the UNet, `lora_te_` for the text encoder (`lora_te1_`/`lora_te2_`
//!   for SDXL's two), the text encoder's path starting at `text_model`
//!   (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`);
//! - parts `lora_down.weight` `[r, in(, k, k)]`, `lora_up.weight` `[out, r(, 1, 1)]` and `alpha`
//!   (a 0-d tensor). The delta is `up · down · alpha / r`; a missing or zero alpha means `alpha = r`
//!   (kohya's `LoRAModule` and A1111 both treat it so).
//! - metadata `ss_*` strings: `ss_network_module` = `networks.lora`, `ss_network_dim`,
//!   `ss_network_alpha`, `ss_base_model_version`, ...
//! - optionally bundled Textual Inversion vectors, `bundle_emb.<name>.string_to_param.*`
//!   (`bundle_emb.<name>.clip_l`/`clip_g` for SDXL), which A1111 loads with the LoRA.
//!
//! Flattening loses where the dots were. Reading splits the flat name back into the module
//! vocabulary of diffusers' UNet and transformers' CLIP ([`unflatten`]); when the LoRA is applied,
//! modules are matched against the model's own projection names flattened the same way, so the
//! model has the final word, and a name that is none of its projections is refused as a LoRA for
//! another architecture.

use super::RawFile;
use crate::lora::{flat_name, LoraModule, LoraWeights, UNET};
use crate::{Concept, TokenEmbedding, TEXT_ENCODER, TEXT_ENCODER_2};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use imprint_models::io::save_safetensors_atomic;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const DOWN: &str = ".lora_down.weight";
const UP: &str = ".lora_up.weight";
const ALPHA: &str = ".alpha";
const BUNDLE: &str = "bundle_emb.";

/// `(key prefix, network)`; `lora_te_` is tried after the longer SDXL prefixes.
const PREFIXES: [(&str, &str); 4] = [
    ("lora_unet_", UNET),
    ("lora_te1_", TEXT_ENCODER),
    ("lora_te2_", TEXT_ENCODER_2),
    ("lora_te_", TEXT_ENCODER),
];

/// The words diffusers' UNet and transformers' CLIP text model name their modules with. Flat names
/// are split greedily into the longest of these (so `proj_in` stays one word) and numbers.
const WORDS: &[&str] = &[
    // UNet2DConditionModel
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "transformer_blocks",
    "attn1",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff",
    "net",
    "proj",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers",
    "upsamplers",
    "conv",
    "conv_in",
    "conv_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    // CLIPTextModel
    "text_model",
    "encoder",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "mlp",
    "fc1",
    "fc2",
];

pub(crate) fn is_kohya(raw: &RawFile) -> bool {
    !raw.pickled
        && raw
            .tensors
            .keys()
            .any(|k| PREFIXES.iter().any(|(p, _)| k.starts_with(p)))
}

/// Splits a flat kohya name back into a module path: `down_blocks_0_attentions_0_proj_in` →
/// `down_blocks.0.attentions.0.proj_in`. `None` when a piece is no known module word.
pub fn unflatten(flat: &str) -> Option<String> {
    let tokens: Vec<&str> = flat.split('_').collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let found = (i + 1..=tokens.len()).rev().find(|&j| {
            let word = tokens[i..j].join("_");
            WORDS.contains(&word.as_str())
                || (j == i + 1 && !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()))
        })?;
        parts.push(tokens[i..found].join("_"));
        i = found;
    }
    Some(parts.join("."))
}

pub(crate) fn from_raw(raw: RawFile) -> Result<Concept> {
    // Every module's parts: `lora_down.weight`, `lora_up.weight`, `alpha` for LoRA, LyCORIS's
    // `hada_w1_a`, `lokr_w1`, `oft_blocks`, … (see [`super::lycoris`]).
    let mut groups: BTreeMap<(String, String), BTreeMap<String, Tensor>> = BTreeMap::new();
    let mut bundled: BTreeMap<String, Vec<TokenEmbedding>> = BTreeMap::new();
    for (key, t) in raw.tensors {
        if let Some(rest) = key.strip_prefix(BUNDLE) {
            let (name, encoder) = match rest.rsplit_once('.') {
                Some((n, "clip_l")) => (n, TEXT_ENCODER),
                Some((n, "clip_g")) => (n, TEXT_ENCODER_2),
                _ => match rest.split_once(".string_to_param.") {
                    Some((n, _)) => (n, TEXT_ENCODER),
                    None => bail!(
                        "bundled embedding '{key}' is neither string_to_param nor clip_l/clip_g"
                    ),
                },
            };
            bundled
                .entry(name.to_string())
                .or_default()
                .push(TokenEmbedding::new(encoder, t).with_context(|| format!("tensor '{key}'"))?);
            continue;
        }
        let Some((prefix, network)) = PREFIXES.iter().find(|(p, _)| key.starts_with(p)) else {
            bail!("unexpected tensor '{key}' in a kohya LoRA file (expected lora_unet_… or lora_te_… keys)")
        };
        let rest = &key[prefix.len()..];
        let Some((flat, part)) = rest.split_once('.') else {
            bail!("kohya key '{key}' names no part (expected <module>.lora_down.weight, .alpha, …)")
        };
        groups
            .entry((network.to_string(), flat.to_string()))
            .or_default()
            .insert(part.to_string(), t);
    }
    let mut lora = LoraWeights::default();
    let mut lycoris = vec![];
    for ((network, flat), mut parts) in groups {
        let prefix = PREFIXES
            .iter()
            .find(|(_, n)| *n == network)
            .map_or("", |(p, _)| p);
        let key = format!("{prefix}{flat}");
        if super::lycoris::is_lycoris(&parts) {
            let Some(module) = unflatten(&flat) else {
                bail!("kohya key '{key}' names no {network} module imprint knows: is it for another architecture (SDXL's input_blocks, a DiT, ...)?")
            };
            lycoris.push(super::lycoris::from_parts(&network, &module, &key, parts)?);
            continue;
        }
        let down = parts.remove(&DOWN[1..]);
        let up = parts.remove(&UP[1..]);
        let alpha = parts.remove(&ALPHA[1..]);
        if let Some(part) = parts.keys().next() {
            bail!("kohya key '{key}.{part}': unknown module type (imprint applies LoRA, LoHa, LoKr, (IA)³ and diag-OFT)")
        }
        let (Some(down), Some(up)) = (down, up) else {
            bail!(
                "kohya LoRA '{key}' lacks its {} tensor",
                if alpha.is_some() {
                    "lora_down/lora_up"
                } else {
                    "lora_up"
                }
            )
        };
        let Some(module) = unflatten(&flat) else {
            bail!("kohya key '{key}{DOWN}' names no {network} module imprint knows: is it a LoRA for another architecture (SDXL's input_blocks, a DiT, ...)?")
        };
        let rank = down.dims().first().copied().unwrap_or(0) as f64;
        let alpha = match alpha {
            Some(a) => super::scalar(&a).with_context(|| format!("tensor '{key}{ALPHA}'"))?,
            None => rank,
        };
        let alpha = if alpha == 0.0 { rank } else { alpha };
        lora.modules
            .push(LoraModule::new(&network, &module, down, up, alpha, &key)?);
    }
    let mut concept = Concept::lora("", lora);
    concept.lycoris = lycoris;
    if bundled.len() > 1 {
        bail!(
            "kohya file bundles {} embeddings ({}); imprint concepts hold one trigger",
            bundled.len(),
            bundled.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
    if let Some((name, embeddings)) = bundled.into_iter().next() {
        concept.trigger = name;
        concept.embeddings = embeddings;
    }
    concept.metadata = raw
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("ss_") || k.starts_with("modelspec."))
        .collect();
    if let Some(b) = concept.metadata.get("ss_sd_model_name") {
        concept.base_model = Some(b.clone());
    }
    Ok(concept)
}

/// kohya's `ss_base_model_version` from the UNet's cross-attention width, when recognisable.
fn base_model_version(concept: &Concept) -> Option<&'static str> {
    let width = concept
        .lora
        .on(UNET)
        .find(|m| m.module.ends_with("attn2.to_k"))?
        .in_dim();
    match width {
        768 => Some("sd_v1"),
        1024 => Some("sd_v2"),
        _ => None,
    }
}

pub(crate) fn save(concept: &Concept, path: &Path) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for m in &concept.lora.modules {
        let prefix = match m.network.as_str() {
            UNET => "lora_unet_",
            TEXT_ENCODER if concept.lora.networks().contains(&TEXT_ENCODER_2) => "lora_te1_",
            TEXT_ENCODER => "lora_te_",
            TEXT_ENCODER_2 => "lora_te2_",
            other => bail!(
                "{}: kohya LoRA files have no place for network '{other}'",
                path.display()
            ),
        };
        let mut module = m.module.clone();
        if m.network != UNET && !module.starts_with("text_model.") {
            module = format!("text_model.{module}");
        }
        let key = format!("{prefix}{}", flat_name(&module));
        tensors.insert(format!("{key}{DOWN}"), m.down.clone());
        tensors.insert(format!("{key}{UP}"), m.up.clone());
        tensors.insert(
            format!("{key}{ALPHA}"),
            Tensor::new(m.alpha as f32, &Device::Cpu)?,
        );
    }
    if !concept.embeddings.is_empty() {
        let sdxl = concept.embedding(TEXT_ENCODER_2).is_some();
        for e in &concept.embeddings {
            let key = match (sdxl, e.encoder.as_str()) {
                (false, _) => format!("{BUNDLE}{}.string_to_param.*", concept.trigger),
                (true, TEXT_ENCODER) => format!("{BUNDLE}{}.clip_l", concept.trigger),
                (true, _) => format!("{BUNDLE}{}.clip_g", concept.trigger),
            };
            tensors.insert(key, e.vectors.clone());
        }
    }
    let mut meta: HashMap<String, String> = concept
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_") || k.starts_with("modelspec."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("ss_network_module".into(), "networks.lora".into());
    if let Some((rank, alpha)) = concept.lora.typical_rank_alpha() {
        meta.insert("ss_network_dim".into(), rank.to_string());
        meta.insert("ss_network_alpha".into(), alpha.to_string());
    }
    if let Some(v) = base_model_version(concept) {
        meta.insert("ss_base_model_version".into(), v.into());
    }
    if let Some(b) = &concept.base_model {
        meta.entry("ss_sd_model_name".into())
            .or_insert_with(|| b.clone());
    }
    save_safetensors_atomic(path, &tensors, Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_names_split_into_module_words() {
        for path in [
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "mid_block.attentions.0.proj_in",
            "up_blocks.3.resnets.2.conv_shortcut",
            "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "time_embedding.linear_1",
            "down_blocks.0.downsamplers.0.conv",
            "text_model.encoder.layers.11.self_attn.q_proj",
            "text_model.encoder.layers.0.mlp.fc2",
        ] {
            assert_eq!(unflatten(&flat_name(path)).as_deref(), Some(path));
        }
        assert_eq!(unflatten("input_blocks_4_1_proj_in"), None);
    }
}
