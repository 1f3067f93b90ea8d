//! IP-Adapter weight files in the h94/IP-Adapter layout: a `.safetensors` with `image_proj.*` and
//! `ip_adapter.{1,3,…}.to_k_ip.weight` / `to_v_ip.weight` keys, or the pickled `.bin` holding the
//! two dicts `{"image_proj": {...}, "ip_adapter": {...}}` (read without unpickling, see [`super::pt`]).

use super::pt::Value;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// Every tensor of an IP-Adapter file, named `image_proj.…` / `ip_adapter.…` whichever layout it
/// came in.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let raw = super::read_raw(path)?;
    let mut out = BTreeMap::new();
    if let Some(Value::Dict(items)) = &raw.pickle {
        for (k, v) in items {
            let (Value::Str(group), Value::Dict(inner)) = (k, v) else {
                continue;
            };
            for (name, t) in inner {
                if let (Value::Str(name), Value::Tensor(t)) = (name, t) {
                    out.insert(format!("{group}.{name}"), t.clone());
                }
            }
        }
    }
    out.extend(raw.tensors);
    let has = |p: &str| out.keys().any(|k| k.starts_with(p));
    if !has("image_proj.") || !has("ip_adapter.") {
        bail!(
            "{}: not an IP-Adapter file (expected image_proj.* and ip_adapter.* weights, as h94/IP-Adapter's files hold)",
            path.display()
        )
    }
    Ok(out)
}
