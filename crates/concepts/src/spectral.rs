//! SVDiff (Han et al. 2023, "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning"): a
//! concept is a shift δ of the singular values of every weight, `W_δ = U · diag(relu(σ + δ)) · Vᵀ`
//! with `W = U Σ Vᵀ` the base weight's SVD (conv kernels as `out × in·k·k`; a norm's 1-D weight
//! has the single singular value ‖γ‖, so it scales as `γ · relu(‖γ‖ + δ) / ‖γ‖`). Applied at a
//! scale `s`, σ + s·δ.
//!
//! The change is applied as `W + U · diag(relu(σ + sδ) − σ) · Vᵀ`, which is exactly `W` at δ = 0
//! (relu(σ) = σ), so a zero shift reproduces the base model bit for bit rather than to the SVD's
//! rounding.
//!
//! The SVDs are computed once per base model (faer's thin SVD in f64) and cached on disk by a hash
//! of the weights (`$IMPRINT_CACHE_DIR`, else `$XDG_CACHE_HOME/imprint`, else
//! `~/.cache/imprint`, under `svd/`).

use crate::weights::WeightChanges;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::clip::ClipTextTransformer;
use imprint_models::visit::{Projection, VisitProjections};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// The method name of SVDiff concepts.
pub const SVDIFF: &str = "svdiff";
/// The text encoder's embedding tables, which SVDiff shifts like linear weights.
pub const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding";
pub const POSITION_EMBEDDING: &str = "text_model.embeddings.position_embedding";

/// One weight's spectral shift.
#[derive(Clone, Debug)]
pub struct SpectralShift {
    /// `unet` or `text_encoder`.
    pub network: String,
    /// The module path, e.g. `down_blocks.0.resnets.0.conv1` or `…norm1`.
    pub module: String,
    /// `[r]` f32: one shift per singular value (one for a norm).
    pub delta: Tensor,
}

/// A thin SVD `W = U diag(S) Vt` (f32, CPU): `u [m, r]`, `s [r]`, `vt [r, n]`.
#[derive(Clone, Debug)]
pub struct Svd {
    pub u: Tensor,
    pub s: Tensor,
    pub vt: Tensor,
}

/// The weight as a matrix: `[out, in]`, or `[out, in·k·k]` for a conv kernel.
pub fn as_matrix(w: &Tensor) -> Result<Tensor> {
    Ok(match w.rank() {
        2 => w.clone(),
        r if r > 2 => w.flatten_from(1)?,
        _ => bail!("a weight of shape {:?} has no matrix form", w.dims()),
    })
}

/// Thin SVD of a 2-D tensor, computed in f64 by faer.
pub fn thin_svd(w: &Tensor) -> Result<Svd> {
    let (m, n) = w.dims2()?;
    let data: Vec<f64> = w
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let mat = faer::Mat::<f64>::from_fn(m, n, |i, j| data[i * n + j]);
    let svd = mat
        .thin_svd()
        .map_err(|e| anyhow::anyhow!("SVD of a {m}×{n} weight did not converge: {e:?}"))?;
    let r = m.min(n);
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let u: Vec<f32> = (0..m)
        .flat_map(|i| (0..r).map(move |k| u[(i, k)] as f32))
        .collect();
    let s: Vec<f32> = (0..r).map(|k| s[k] as f32).collect();
    let vt: Vec<f32> = (0..r)
        .flat_map(|k| (0..n).map(move |j| v[(j, k)] as f32))
        .collect();
    Ok(Svd {
        u: Tensor::from_vec(u, (m, r), &Device::Cpu)?,
        s: Tensor::from_vec(s, r, &Device::Cpu)?,
        vt: Tensor::from_vec(vt, (r, n), &Device::Cpu)?,
    })
}

/// The change `U diag(relu(σ + δ) − σ) Vt` of a weight (matrix form).
pub fn weight_change(svd: &Svd, delta: &Tensor) -> Result<Tensor> {
    let d = (svd.s.broadcast_add(delta)?.relu()? - &svd.s)?;
    Ok(svd.u.broadcast_mul(&d.unsqueeze(0)?)?.matmul(&svd.vt)?)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IMPRINT_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("imprint"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/imprint"))
}

/// A 64-bit hash of weights' names, shapes and bits (FNV-1a over 8-byte words).
fn fingerprint(weights: &BTreeMap<String, Tensor>) -> Result<u64> {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut mix = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x100000001b3);
    };
    for (name, w) in weights {
        for b in name.bytes() {
            mix(b as u64);
        }
        for &d in w.dims() {
            mix(d as u64);
        }
        let v: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for pair in v.chunks(2) {
            let lo = pair[0].to_bits() as u64;
            let hi = pair.get(1).map(|x| x.to_bits() as u64).unwrap_or(0);
            mix(lo | (hi << 32));
        }
    }
    Ok(h)
}

/// The SVDs of `weights` (matrix forms, by module name), from the cache when this exact set was
/// decomposed before; otherwise computed (with `progress(done, total)`) and cached.
pub fn bases(
    network: &str,
    weights: &BTreeMap<String, Tensor>,
    mut progress: impl FnMut(usize, usize),
) -> Result<HashMap<String, Svd>> {
    let key = fingerprint(weights)?;
    let path = cache_dir().map(|d| {
        d.join("svd")
            .join(format!("{network}-{key:016x}.safetensors"))
    });
    if let Some(p) = path.as_ref().filter(|p| p.is_file()) {
        // Tensor by tensor: reading the whole file first would hold the bases twice (on SD 1.5,
        // 4.3 GB more at the peak).
        if let Ok(t) = imprint_models::loading::SafetensorsReader::open(&[p.clone()]) {
            let mut out = HashMap::new();
            for (name, w) in weights {
                let get = |part: &str| t.read(&format!("{name}.{part}")).ok();
                let Ok(m) = as_matrix(w) else { continue };
                let (rows, cols) = (m.dim(0)?, m.dim(1)?);
                let r = rows.min(cols);
                if let (Some(u), Some(s), Some(vt)) = (get("u"), get("s"), get("vt")) {
                    // A cache that does not fit the weights is recomputed, not trusted.
                    if u.dims() == [rows, r] && s.dims() == [r] && vt.dims() == [r, cols] {
                        out.insert(name.clone(), Svd { u, s, vt });
                    }
                }
            }
            if out.len() == weights.len() {
                return Ok(out);
            }
        }
    }
    let mut out = HashMap::new();
    for (i, (name, w)) in weights.iter().enumerate() {
        progress(i, weights.len());
        let svd = thin_svd(&as_matrix(w)?).with_context(|| format!("{network} {name}"))?;
        out.insert(name.clone(), svd);
    }
    progress(weights.len(), weights.len());
    if let Some(p) = path {
        let mut flat = HashMap::new();
        for (name, s) in &out {
            flat.insert(format!("{name}.u"), s.u.clone());
            flat.insert(format!("{name}.s"), s.s.clone());
            flat.insert(format!("{name}.vt"), s.vt.clone());
        }
        // A cache that cannot be written only costs the next run the same minutes.
        if std::fs::create_dir_all(p.parent().expect("cache file has a folder")).is_ok() {
            if let Err(e) = imprint_models::io::save_safetensors_atomic(&p, &flat, None) {
                eprintln!("warning: could not cache the SVDs at {}: {e}", p.display());
            }
        }
    }
    Ok(out)
}

/// The matrix-form weights of every projection of `model` (f32, CPU), by module name.
pub fn projection_weights(model: &mut dyn VisitProjections) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut failure = None;
    model.visit_projections(&mut |p| {
        let (name, w) = match p {
            Projection::Linear(l) => (l.name.clone(), l.weight.clone()),
            Projection::Conv2d(c) => (c.name.clone(), c.weight.clone()),
        };
        match w
            .to_device(&Device::Cpu)
            .and_then(|w| w.to_dtype(DType::F32))
        {
            Ok(w) => {
                out.insert(name, w);
            }
            Err(e) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// The text encoder's embedding tables by SVDiff's module names: the base vocabulary's rows only
/// (words concepts added stay as they are, and the SVD stays the base model's).
pub fn embedding_weights(te: &ClipTextTransformer) -> Result<BTreeMap<String, Tensor>> {
    let base_rows = te.config.vocab_size.min(te.token_embedding.dim(0)?);
    let mut out = BTreeMap::new();
    for (name, w) in [
        (TOKEN_EMBEDDING, te.token_embedding.narrow(0, 0, base_rows)?),
        (POSITION_EMBEDDING, te.position_embedding.clone()),
    ] {
        out.insert(
            name.to_string(),
            w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        );
    }
    Ok(out)
}

/// What `shifts` on `network` do at `scale`, checked against `model` before anything changes.
pub struct SpectralChanges {
    projections: WeightChanges,
    norms: HashMap<String, Tensor>,
    embeddings: HashMap<String, Tensor>,
}

/// Prepares `shifts` for `network` of `model`; `embeddings` are the text encoder's tables
/// ([`embedding_weights`]) when `network` is the text encoder.
pub fn prepare_spectral(
    model: &mut dyn VisitProjections,
    embeddings: BTreeMap<String, Tensor>,
    network: &str,
    shifts: &[SpectralShift],
    scale: f64,
) -> Result<Option<SpectralChanges>> {
    let mine: Vec<&SpectralShift> = shifts.iter().filter(|s| s.network == network).collect();
    if mine.is_empty() {
        return Ok(None);
    }
    let mut projections = projection_weights(model)?;
    projections.extend(embeddings);
    let mut norms: HashMap<String, Tensor> = HashMap::new();
    model.visit_norms(&mut |mut n| {
        let name = n.name().to_string();
        let (w, _) = n.parts();
        norms.insert(name, w.clone());
    });
    // Only the weights the concept shifts are decomposed (and cached as that set).
    let wanted: BTreeMap<String, Tensor> = mine
        .iter()
        .filter_map(|s| {
            projections
                .get(&s.module)
                .map(|w| (s.module.clone(), w.clone()))
        })
        .collect();
    for s in &mine {
        if !projections.contains_key(&s.module) && !norms.contains_key(&s.module) {
            bail!(
                "'{}' is not a layer of this {network} (was the concept made for another model?)",
                s.module
            )
        }
    }
    let bar = progress_bar(wanted.len());
    let bases = bases(network, &wanted, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let mut out = SpectralChanges {
        projections: WeightChanges::default(),
        norms: HashMap::new(),
        embeddings: HashMap::new(),
    };
    for s in mine {
        let delta = (s.delta.to_dtype(DType::F32)?.to_device(&Device::Cpu)? * scale)?;
        if let Some(svd) = bases.get(&s.module) {
            let r = svd.s.dim(0)?;
            if delta.dims() != [r] {
                bail!("'{}': {} spectral shifts for a weight with {r} singular values (was the concept made for another base model's widths?)", s.module, delta.elem_count())
            }
            let w = &projections[&s.module];
            let dw = weight_change(svd, &delta)?.reshape(w.dims())?;
            if s.module == TOKEN_EMBEDDING || s.module == POSITION_EMBEDDING {
                out.embeddings.insert(s.module.clone(), (w + dw)?);
            } else {
                out.projections.add(&s.module, dw, None)?;
            }
        } else {
            let w = &norms[&s.module];
            if delta.elem_count() != 1 {
                bail!(
                    "'{}': a norm takes one spectral shift, the file has {}",
                    s.module,
                    delta.elem_count()
                )
            }
            let w32 = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            out.norms.insert(
                s.module.clone(),
                imprint_ops::shifted_weight(&w32, Some(&delta))?,
            );
        }
    }
    Ok(Some(out))
}

fn progress_bar(n: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "SVD of the base weights {bar:30} {pos}/{len} (once per model, then cached)",
        )
        .expect("valid template"),
    );
    if n < 50 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

impl SpectralChanges {
    /// Applies the prepared changes to the model they were prepared for (then
    /// [`SpectralChanges::apply_embeddings`] for a text encoder).
    pub fn apply(&self, model: &mut dyn VisitProjections) -> Result<()> {
        self.projections.apply(model)?;
        let mut failure = None;
        model.visit_norms(&mut |mut n| {
            let name = n.name().to_string();
            if let Some(new) = self.norms.get(&name) {
                let (w, _) = n.parts();
                match new
                    .to_device(w.device())
                    .and_then(|t| t.to_dtype(w.dtype()))
                {
                    Ok(t) => *w = t,
                    Err(e) => failure = Some(e),
                }
            }
        });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Replaces the text encoder's shifted embedding tables (the base vocabulary's rows; rows of
    /// added words stay).
    pub fn apply_embeddings(&self, te: &mut ClipTextTransformer) -> Result<()> {
        for (name, new) in &self.embeddings {
            let slot = if name == TOKEN_EMBEDDING {
                &mut te.token_embedding
            } else {
                &mut te.position_embedding
            };
            let new = new.to_device(slot.device())?.to_dtype(slot.dtype())?;
            let (rows, total) = (new.dim(0)?, slot.dim(0)?);
            *slot = if rows < total {
                Tensor::cat(&[new, slot.narrow(0, rows, total - rows)?], 0)?
            } else {
                new
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_svd_reconstructs_and_a_zero_shift_changes_nothing() {
        let w = Tensor::randn(0f32, 1.0, (6, 10), &Device::Cpu).unwrap();
        let svd = thin_svd(&w).unwrap();
        assert_eq!(svd.u.dims(), [6, 6]);
        assert_eq!(svd.vt.dims(), [6, 10]);
        let back = svd
            .u
            .broadcast_mul(&svd.s.unsqueeze(0).unwrap())
            .unwrap()
            .matmul(&svd.vt)
            .unwrap();
        let err = (back - &w).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        let zero =
            weight_change(&svd, &Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(
            zero.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        // Singular values come sorted, non-negative.
        let s: Vec<f32> = svd.s.to_vec1().unwrap();
        assert!(s.windows(2).all(|p| p[0] >= p[1]) && s[5] >= 0.0);
        // δ = −σ₀ removes the leading direction: the change is −σ₀ u₀ v₀ᵀ.
        let mut d = vec![0f32; 6];
        d[0] = -s[0];
        let dw = weight_change(&svd, &Tensor::new(d, &Device::Cpu).unwrap()).unwrap();
        let norm = dw
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((norm - s[0]).abs() < 1e-4 * s[0]);
    }

    #[test]
    fn a_norm_shift_scales_the_weight_by_its_norm() {
        let g = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let w = imprint_ops::shifted_weight(&g, Some(&Tensor::new(&[5f32], &Device::Cpu).unwrap()))
            .unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), [6.0, 8.0]);
        let w =
            imprint_ops::shifted_weight(&g, Some(&Tensor::new(&[-9f32], &Device::Cpu).unwrap()))
                .unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    }
}
