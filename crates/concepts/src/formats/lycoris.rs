//! LyCORIS modules in kohya-prefixed files (`lora_unet_<module>.<part>`, `lora_te_…`), as the
//! LyCORIS kohya wrapper writes them (`lycoris/kohya.py`). The kohya reader ([`super::kohya`])
//! groups a file's tensors by module and hands the groups that are not plain LoRA here. Which
//! kind a module is follows from its part names, as LyCORIS detects it: `hada_w1_a` (LoHa),
//! `lokr_w1`/`lokr_w1_a` (LoKr), `on_input` + `weight` (IA)³, a 3-D `oft_blocks` (diag-OFT). The
//! math is in [`crate::lycoris`].

use crate::lycoris::{Factor, LycorisKind, LycorisModule};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// Whether a module's parts are a LyCORIS module rather than LoRA's `lora_down`/`lora_up`.
pub(crate) fn is_lycoris(parts: &BTreeMap<String, Tensor>) -> bool {
    [
        "hada_w1_a",
        "lokr_w1",
        "lokr_w1_a",
        "on_input",
        "oft_blocks",
        "dora_scale",
    ]
    .iter()
    .any(|k| parts.contains_key(*k))
}

/// Builds one module from its parts. `key` is the module's key prefix, for messages.
pub(crate) fn from_parts(
    network: &str,
    module: &str,
    key: &str,
    mut parts: BTreeMap<String, Tensor>,
) -> Result<LycorisModule> {
    if parts.contains_key("dora_scale") {
        bail!("'{key}' is a DoRA module (dora_scale), which imprint does not apply")
    }
    let alpha = match parts.remove("alpha") {
        Some(a) => Some(super::scalar(&a).with_context(|| format!("tensor '{key}.alpha'"))?),
        None => None,
    };
    let (loha, lokr, ia3) = (
        parts.contains_key("hada_w1_a"),
        parts.contains_key("lokr_w1") || parts.contains_key("lokr_w1_a"),
        parts.contains_key("on_input"),
    );
    let mut take = |name: &str| parts.remove(name);
    let need = |t: Option<Tensor>, name: &str| -> Result<Tensor> {
        t.with_context(|| format!("LyCORIS module '{key}' lacks its '{name}' tensor"))
    };
    let kind = if loha {
        LycorisKind::LoHa {
            w1_a: need(take("hada_w1_a"), "hada_w1_a")?,
            w1_b: need(take("hada_w1_b"), "hada_w1_b")?,
            w2_a: need(take("hada_w2_a"), "hada_w2_a")?,
            w2_b: need(take("hada_w2_b"), "hada_w2_b")?,
            t1: take("hada_t1"),
            t2: take("hada_t2"),
            alpha,
        }
    } else if lokr {
        let mut factor = |n: &str| -> Result<Factor> {
            match (
                take(&format!("lokr_{n}")),
                take(&format!("lokr_{n}_a")),
                take(&format!("lokr_{n}_b")),
            ) {
                (Some(full), None, None) => Ok(Factor::Full(full)),
                (None, Some(a), Some(b)) => Ok(Factor::LowRank { a, b }),
                _ => bail!(
                    "LyCORIS LoKr module '{key}' needs lokr_{n} or both lokr_{n}_a and lokr_{n}_b"
                ),
            }
        };
        let w1 = factor("w1")?;
        let w2 = factor("w2")?;
        LycorisKind::LoKr {
            w1,
            w2,
            t2: take("lokr_t2"),
            alpha,
        }
    } else if ia3 {
        let on_input = super::scalar(&need(take("on_input"), "on_input")?)? != 0.0;
        LycorisKind::Ia3 {
            weight: need(take("weight"), "weight")?,
            on_input,
        }
    } else if let Some(blocks) = take("oft_blocks") {
        if blocks.rank() != 3 {
            bail!("'{key}.oft_blocks' has shape {:?}: a 4-D oft_blocks is BOFT, which imprint does not apply", blocks.dims())
        }
        LycorisKind::DiagOft {
            blocks,
            alpha: alpha.unwrap_or(0.0),
            rescale: take("rescale"),
        }
    } else {
        let names: Vec<&String> = parts.keys().collect();
        bail!("'{key}': unknown module type with parts {names:?} (imprint applies LoRA, LoHa, LoKr, (IA)³ and diag-OFT)")
    };
    if let Some(extra) = parts.keys().next() {
        bail!("LyCORIS module '{key}' has an unexpected part '{extra}'")
    }
    let module = LycorisModule {
        network: network.to_string(),
        module: module.to_string(),
        kind,
    };
    for t in module.tensors() {
        let v = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        if !v.iter().all(|x| x.is_finite()) {
            bail!("LyCORIS module '{key}' has NaN or infinite values")
        }
    }
    Ok(module)
}
