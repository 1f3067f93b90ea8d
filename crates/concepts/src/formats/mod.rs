//! Concept files: one translator per ecosystem, all to and from [`Concept`].
//!
//! [`detect`] recognises a file by its content (never by its extension alone), [`load_any`] reads
//! any supported file, and [`save`] writes one format atomically (a temporary sibling, then a
//! rename), so an interrupted write never leaves a half-written concept under the requested name.

pub mod a1111;
pub mod custom_diffusion;
pub mod diffusers;
pub mod diffusers_lora;
pub mod ip_adapter;
pub mod kohya;
pub mod kohya_xti;
pub mod lycoris;
pub mod native;
pub mod pt;
pub mod svdiff;

use crate::Concept;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The concept file formats imprint reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// imprint's own `.safetensors` with metadata ([`native`]).
    Native,
    /// diffusers' files: `learned_embeds.safetensors` / `.bin`, `{"<token>": [n, dim]}`
    /// ([`diffusers`]) for token embeddings, `pytorch_lora_weights.safetensors` with PEFT's
    /// `lora_A`/`lora_B` keys ([`diffusers_lora`]) for LoRA.
    Diffusers,
    /// Automatic1111 / kohya embeddings: `emb_params`, SDXL `clip_l`/`clip_g`, pickled `.pt`
    /// ([`a1111`]).
    A1111,
    /// kohya-ss LoRA: `lora_unet_…`/`lora_te_…` keys, optionally with bundled embeddings
    /// ([`kohya`]). A concept with only token embeddings is written as [`Format::A1111`], which
    /// kohya's scripts also read; per-layer embeddings (P+) as kohya's XTI file ([`kohya_xti`]).
    Kohya,
    /// SVDiff's `spectral_shifts.safetensors` folder.
    Svdiff,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Diffusers => "diffusers",
            Format::A1111 => "a1111",
            Format::Kohya => "kohya",
            Format::Svdiff => "svdiff",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "native" | "imprint" => Format::Native,
            "diffusers" => Format::Diffusers,
            "a1111" => Format::A1111,
            "kohya" => Format::Kohya,
            "svdiff" => Format::Svdiff,
            other => {
                bail!(
                    "unknown concept format '{other}' (expected native, diffusers, a1111, kohya or svdiff)"
                )
            }
        })
    }
}

/// The content of a concept file before interpretation: its tensors (converted to candle) and
/// string metadata (safetensors' `__metadata__`, or a pickle's string/number fields).
#[derive(Debug, Default)]
pub(crate) struct RawFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    /// The file is a pickled PyTorch archive rather than safetensors.
    pub pickled: bool,
    /// For pickled files: the top-level object, for formats that need nested fields.
    pub pickle: Option<pt::Value>,
}

/// Cap on the size of a concept file read whole into memory: embeddings are kilobytes, and a
/// multi-gigabyte file handed to `--concept` is almost certainly a model checkpoint.
const MAX_FILE_BYTES: u64 = 1 << 30;

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!(
            "{}: {len} bytes is too large for a concept file (is it a model checkpoint?)",
            path.display()
        )
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// The value of a one-element tensor (kohya's `.alpha`: 0-d, f32, f16 or an integer).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    if t.elem_count() != 1 {
        bail!("expected one number, got shape {:?}", t.dims())
    }
    let v = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?[0];
    if !v.is_finite() {
        bail!("{v} is not a finite number")
    }
    Ok(v)
}

/// safetensors files start with an 8-byte little-endian header length followed by a JSON object.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

/// PyTorch's `torch.save` writes a zip archive (since torch 1.6).
fn looks_like_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04")
}

pub(crate) fn read_safetensors(bytes: &[u8]) -> Result<RawFile> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e}); is it truncated?"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .with_context(|| format!("tensor '{name}'"))?;
        tensors.insert(name, t);
    }
    Ok(RawFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
        pickled: false,
        pickle: None,
    })
}

/// A folder stands for the concept file diffusers would look for in it: `learned_embeds.safetensors`
/// (`load_textual_inversion`), or else `pytorch_lora_weights.safetensors` (`load_lora_weights`).
pub fn resolve(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        if let Some(shifts) = svdiff::resolve(path) {
            return shifts;
        }
        if let Some(weights) = custom_diffusion::resolve(path) {
            return weights;
        }
    }
    let ti = diffusers::resolve(path);
    if path.is_dir() && !ti.exists() && diffusers_lora::resolve(path).exists() {
        return diffusers_lora::resolve(path);
    }
    ti
}

/// Reads the tensors and metadata of a safetensors or pickled PyTorch file (a folder: see
/// [`resolve`]).
pub(crate) fn read_raw(path: &Path) -> Result<RawFile> {
    let path = &resolve(path);
    let bytes = read_bytes(path)?;
    let raw = (|| -> Result<RawFile> {
        if looks_like_safetensors(&bytes) {
            read_safetensors(&bytes)
        } else if looks_like_zip(&bytes) {
            pt::read_archive(&bytes)
        } else if bytes.starts_with(&[0x80]) {
            // A pickle protocol header at offset 0: torch.save's pre-1.6 ("legacy") layout.
            bail!("a PyTorch file in the legacy (pre-1.6) format, which imprint does not read; re-save it with a current torch.save or convert it to safetensors")
        } else {
            bail!("not a concept file: neither safetensors nor a PyTorch archive")
        }
    })();
    raw.with_context(|| path.display().to_string())
}

/// Which format a file is in, by content: native metadata, A1111's key names, or diffusers'
/// single tensor. A file that matches none is an error naming what it holds.
pub fn detect(path: &Path) -> Result<Format> {
    let path = &resolve(path);
    let raw = read_raw(path)?;
    detect_raw(&raw).with_context(|| path.display().to_string())
}

fn detect_raw(raw: &RawFile) -> Result<Format> {
    if native::is_native(raw) {
        return Ok(Format::Native);
    }
    kohya_xti::check_incomplete(raw)?;
    if custom_diffusion::is_custom_diffusion(raw) {
        return Ok(Format::Diffusers);
    }
    if svdiff::is_svdiff(raw) {
        return Ok(Format::Svdiff);
    }
    if kohya::is_kohya(raw) || kohya_xti::is_kohya_xti(raw) {
        return Ok(Format::Kohya);
    }
    if diffusers_lora::is_diffusers_lora(raw) {
        return Ok(Format::Diffusers);
    }
    if a1111::is_a1111(raw) {
        return Ok(Format::A1111);
    }
    if diffusers::is_diffusers(raw) {
        return Ok(Format::Diffusers);
    }
    let names: Vec<&str> = raw.tensors.keys().map(String::as_str).take(8).collect();
    bail!(
        "not a concept file: expected imprint metadata, kohya `lora_unet_…`/`lora_te_…` LoRA keys or the 16 XTI layers `IN01`…`OUT11`, diffusers `….lora_A.weight` LoRA keys, A1111 `emb_params`/`string_to_param`/`clip_l`+`clip_g`, or one diffusers token tensor; found {} tensors ({}{})",
        raw.tensors.len(),
        names.join(", "),
        if raw.tensors.len() > names.len() { ", ..." } else { "" }
    )
}

/// Loads a concept from any supported file, recognised by content.
pub fn load_any(path: &Path) -> Result<Concept> {
    Ok(load_with_format(path)?.0)
}

/// [`load_any`], also saying which format the file was in.
pub fn load_with_format(path: &Path) -> Result<(Concept, Format)> {
    let path = &resolve(path);
    let raw = read_raw(path)?;
    let result = (|| -> Result<(Concept, Format)> {
        let format = detect_raw(&raw)?;
        let concept = match format {
            Format::Native => native::from_raw(raw)?,
            Format::Diffusers if custom_diffusion::is_custom_diffusion(&raw) => {
                custom_diffusion::from_raw(raw, path)?
            }
            Format::Diffusers if diffusers_lora::is_diffusers_lora(&raw) => {
                diffusers_lora::from_raw(raw)?
            }
            Format::Diffusers => diffusers::from_raw(raw)?,
            Format::A1111 => a1111::from_raw(raw, path)?,
            Format::Kohya if kohya_xti::is_kohya_xti(&raw) => kohya_xti::from_raw(raw, path)?,
            Format::Kohya => kohya::from_raw(raw)?,
            Format::Svdiff => svdiff::from_raw(raw, path)?,
        };
        concept.validate()?;
        Ok((concept, format))
    })();
    result.with_context(|| path.display().to_string())
}

/// Writes `concept` to `path` in `format`, atomically.
pub fn save(concept: &Concept, path: &Path, format: Format) -> Result<()> {
    concept
        .validate()
        .with_context(|| format!("{}: cannot save", path.display()))?;
    let has_lora = !concept.lora.is_empty();
    if !concept.spectral_shifts.is_empty() || format == Format::Svdiff {
        return match format {
            Format::Native => native::save(concept, path),
            Format::Svdiff => svdiff::save(concept, path),
            _ => bail!(
                "{}: concept '{}' holds SVDiff spectral shifts, which only imprint's native format and the svdiff folder hold",
                path.display(),
                concept.trigger
            ),
        };
    }
    if !concept.lycoris.is_empty() {
        bail!(
            "{}: imprint applies LyCORIS modules (generate, model merge) but does not write them; keep the original file",
            path.display()
        )
    }
    if format != Format::Native && concept.perfusion.is_some() {
        bail!(
            "{}: Perfusion concepts exist only in imprint's native format (no other tool reads them); use --format native",
            path.display()
        )
    }
    if !concept.projections.is_empty() {
        return match format {
            Format::Native => native::save(concept, path),
            Format::Diffusers => custom_diffusion::save(concept, path),
            _ => bail!(
                "{}: concept '{}' holds whole projection weights (Custom Diffusion), which only imprint's native format and diffusers' Custom Diffusion folder hold",
                path.display(),
                concept.trigger
            ),
        };
    }
    if !concept.layer_embeddings.is_empty() {
        return match format {
            Format::Native => native::save(concept, path),
            Format::Kohya if !has_lora => kohya_xti::save(concept, path),
            _ => bail!(
                "{}: concept '{}' has per-layer embeddings (P+), which only imprint's native format and kohya's XTI file hold; use --format native or kohya",
                path.display(),
                concept.trigger
            ),
        };
    }
    match format {
        Format::Native => native::save(concept, path),
        Format::Diffusers if has_lora => diffusers_lora::save(concept, path),
        Format::Diffusers => diffusers::save(concept, path),
        Format::A1111 if has_lora => bail!(
            "{}: A1111 embedding files hold no LoRA weights; use --format kohya (A1111 loads kohya LoRAs), diffusers or native",
            path.display()
        ),
        Format::A1111 => a1111::save(concept, path),
        Format::Kohya if has_lora => kohya::save(concept, path),
        Format::Kohya => a1111::save(concept, path),
        Format::Svdiff => svdiff::save(concept, path),
    }
}

#[cfg(test)]
mod tests;
