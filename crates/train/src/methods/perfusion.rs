//! Perfusion (Tewel et al. 2023, "Key-Locked Rank One Editing for Text-to-Image
//! Personalization"): the new word's embedding plus a gated rank-1 edit of every cross-attention
//! key and value projection (the edit's math: `imprint_concepts::perfusion`).
//!
//! * **Trainable**: the word's embedding (one vector, started at the superclass word's) and the
//!   value target output `o*_V` of every cross-attention layer (started at `W_V e_super`). The key
//!   targets stay `o*_K = W_K e_super`: keys are locked to the superclass.
//! * **Target input** `i*`: an exponential moving average (0.99 per step) of the text encoder's
//!   output at the word's position, started at `e_super`, the superclass word's output in
//!   "a photo of a {superclass}". Kept in checkpoints for an exact resume.
//! * **C**: the uncentered covariance of text-encoder outputs over [`covariance_captions`], every
//!   position from the start token through the first end token (padding positions are left out:
//!   they repeat the end token and would dominate C), plus a ridge of 1e-3 · tr(C)/dim so C is
//!   invertible on real models. Computed once per base model and cached as C⁻¹ beside the model
//!   (`<model>/.imprint-cache/`), never inside a concept.
//! * **Loss**: the shared denoising loss, masked to the subject where `IMAGE.mask.png` exists.
//! * **Defaults** (paper §5): 400 steps, batch 16 (1 × accumulation 16), lr 6e-3 for the
//!   embedding and 3e-2 for `o*_V`, training gate β 0.75, τ 0.1 (the concept stores the
//!   inference gate β 0.7, τ 0.15).

use super::textual_inversion::TextualInversion;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use imprint_concepts::perfusion::{
    solve, GateParams, PerfusionAdapter, DEFAULT_BETA, DEFAULT_TAU, PERFUSION,
};
use imprint_concepts::{Concept, PerfusionEdit, PerfusionLayer, TokenEmbedding, TEXT_ENCODER};
use imprint_models::visit::{Projection, VisitProjections};
use imprint_models::TextStates;
use imprint_ops::ScaledAdapter;
use imprint_pipeline::StableDiffusion;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const DEFAULT_LR: f64 = 6e-3;
pub const DEFAULT_VALUE_LR: f64 = 3e-2;
pub const DEFAULT_STEPS: usize = 400;
pub const DEFAULT_BATCH: usize = 1;
pub const DEFAULT_GRAD_ACCUM: usize = 16;
pub const TRAIN_BETA: f64 = 0.75;
pub const TRAIN_TAU: f64 = 0.1;
/// The target input's moving-average decay per step.
pub const EMA_DECAY: f64 = 0.99;
/// Bump when the corpus or the covariance's construction changes (invalidates caches).
const COVARIANCE_VERSION: &str = "1";
const COVARIANCE_CAPTIONS: usize = 512;

/// The captions `C` is estimated from: [`crate::templates::everyday_captions`].
pub fn covariance_captions() -> Vec<String> {
    crate::templates::everyday_captions(COVARIANCE_CAPTIONS)
}

/// `C⁻¹` `[dim, dim]` (f32, on the model's device) for `sd`'s text encoder, from the cache beside
/// the model when it is there and current, else computed and cached.
pub fn covariance_inverse(sd: &StableDiffusion, model: &Path) -> Result<Tensor> {
    let fingerprint = text_encoder_fingerprint(model)?;
    let path = cache_path(model);
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) {
            let meta = meta.metadata().clone().unwrap_or_default();
            let current = meta.get("version").map(String::as_str) == Some(COVARIANCE_VERSION)
                && meta.get("text_encoder") == Some(&fingerprint);
            if current {
                let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
                if let Some(inv) = t.get("covariance_inverse") {
                    return Ok(inv.to_device(&sd.device)?);
                }
            }
        }
    }
    let inv = compute_covariance_inverse(sd)?;
    let meta = std::collections::HashMap::from([
        ("version".to_string(), COVARIANCE_VERSION.to_string()),
        ("text_encoder".to_string(), fingerprint),
        ("captions".to_string(), COVARIANCE_CAPTIONS.to_string()),
    ]);
    let tensors = std::collections::HashMap::from([(
        "covariance_inverse".to_string(),
        inv.to_device(&Device::Cpu)?,
    )]);
    let saved = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(anyhow::Error::from)
        .and_then(|_| imprint_models::io::save_safetensors_atomic(&path, &tensors, Some(meta)));
    if let Err(e) = saved {
        eprintln!(
            "warning: could not cache the text covariance at {}: {e:#}",
            path.display()
        );
    }
    Ok(inv)
}

/// Where the covariance is cached: `<model>/.imprint-cache/`.
pub fn cache_path(model: &Path) -> PathBuf {
    model
        .join(".imprint-cache")
        .join("perfusion-covariance-inverse.safetensors")
}

/// The text encoder's weight files by name, size and modification time.
fn text_encoder_fingerprint(model: &Path) -> Result<String> {
    let dir = model.join("text_encoder");
    let mut parts = vec![];
    for e in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        parts.push(format!(
            "{}:{}:{modified}",
            e.file_name().to_string_lossy(),
            m.len()
        ));
    }
    parts.sort();
    Ok(parts.join(";"))
}

/// Computes `(C + λI)⁻¹` over the caption corpus (see the module docs).
pub fn compute_covariance_inverse(sd: &StableDiffusion) -> Result<Tensor> {
    let te = &sd.text_encoder;
    let dim = te.token_embedding.dim(1)?;
    let eos = te.config.eos_token_id;
    let mut cov = vec![0f64; dim * dim];
    let mut count = 0usize;
    for chunk in covariance_captions().chunks(32) {
        let ids = chunk
            .iter()
            .map(|c| sd.tokenize(c))
            .collect::<Result<Vec<_>>>()?;
        let ids = Tensor::cat(&ids, 0)?;
        let states = te
            .forward(&ids, 0)?
            .last_hidden_state
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?;
        let id_rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
        for (b, row) in id_rows.iter().enumerate() {
            // Through the first end token: with the legacy eos id 2 (SD configs) the end token is
            // the largest id, as transformers' pooling takes it.
            let end = if eos == 2 {
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&v| v == max).unwrap_or(0)
            } else {
                row.iter()
                    .position(|&v| v == eos as i64)
                    .unwrap_or(row.len() - 1)
            };
            let x = states.get(b)?.narrow(0, 0, end + 1)?; // [p, dim]
            let gram = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f64>()?;
            cov.iter_mut().zip(gram).for_each(|(c, g)| *c += g);
            count += end + 1;
        }
    }
    let n = count.max(1) as f64;
    cov.iter_mut().for_each(|c| *c /= n);
    let trace: f64 = (0..dim).map(|i| cov[i * dim + i]).sum();
    let ridge = 1e-3 * trace / dim as f64;
    let rows: Vec<Vec<f64>> = (0..dim)
        .map(|i| {
            let mut r = cov[i * dim..(i + 1) * dim].to_vec();
            r[i] += ridge;
            r
        })
        .collect();
    let identity: Vec<Vec<f64>> = (0..dim)
        .map(|i| (0..dim).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let inv = solve(&rows, &identity).context("the text covariance is singular")?;
    let flat: Vec<f32> = inv.into_iter().flatten().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(flat, (dim, dim), &Device::Cpu)?.to_device(&sd.device)?)
}

/// One cross-attention layer's edit during training.
struct TrainedLayer {
    /// The `attn2` module path.
    module: String,
    w_k: Tensor,
    w_v: Tensor,
    key_output: Tensor,
    value_output: Var,
    key_adapter: Arc<PerfusionAdapter>,
    value_adapter: Arc<PerfusionAdapter>,
}

/// Perfusion in the shared loop.
pub struct PerfusionMethod {
    pub ti: TextualInversion,
    pub templates: crate::templates::TemplateSet,
    pub superclass: String,
    value_lr_scale: f64,
    cov_inverse: Tensor,
    /// `i*` `[dim]`, f32.
    target_input: Mutex<Tensor>,
    /// The word's encodings seen since the last step (detached, `[dim]` each).
    pending: Mutex<Vec<Tensor>>,
    training: AtomicBool,
    layers: Vec<TrainedLayer>,
    beta: f64,
    tau: f64,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("perfusion state poisoned by an earlier failure"))
}

impl PerfusionMethod {
    /// Registers the word, computes `e_super`, attaches a training adapter to every
    /// cross-attention `to_k` / `to_v` of `sd.unet`.
    #[allow(clippy::too_many_arguments)]
    pub fn attach(
        sd: &mut StableDiffusion,
        model: &Path,
        token: &str,
        superclass: &str,
        templates: crate::templates::TemplateSet,
        value_lr_scale: f64,
        beta: f64,
        tau: f64,
    ) -> Result<Self> {
        let ti = TextualInversion::new(&mut sd.tokenizer, &sd.text_encoder, token, superclass, 1)
            .with_context(|| format!("--superclass '{superclass}'"))?;
        let e_super = superclass_encoding(sd, superclass)?;
        let cov_inverse = covariance_inverse(sd, model)?;
        let mut projections: Vec<(String, Tensor)> = vec![];
        sd.unet.visit_projections(&mut |p| {
            if let Projection::Linear(l) = p {
                if l.name.ends_with(".attn2.to_k") || l.name.ends_with(".attn2.to_v") {
                    projections.push((l.name.clone(), l.weight.clone()));
                }
            }
        });
        let weight = |name: String| -> Result<Tensor> {
            projections
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, w)| w.to_dtype(DType::F32))
                .with_context(|| format!("the UNet has no {name}"))?
                .map_err(Into::into)
        };
        let column = e_super.unsqueeze(1)?;
        let mut layers = vec![];
        for l in sd.unet.cross_attention_layers() {
            let module = l.attn2();
            let w_k = weight(format!("{module}.to_k"))?;
            let w_v = weight(format!("{module}.to_v"))?;
            let key_output = w_k.matmul(&column)?.squeeze(1)?;
            let value_output = Var::from_tensor(&w_v.matmul(&column)?.squeeze(1)?)?;
            let placeholder = || -> Result<Arc<PerfusionAdapter>> {
                let z = Tensor::zeros((1, 1), DType::F32, &sd.device)?;
                Ok(Arc::new(PerfusionAdapter::new(GateParams {
                    dual: z.clone(),
                    w_input: z.clone(),
                    outputs: z,
                    beta: Tensor::zeros(1, DType::F32, &sd.device)?,
                    tau: Tensor::ones(1, DType::F32, &sd.device)?,
                })))
            };
            layers.push(TrainedLayer {
                module,
                w_k,
                w_v,
                key_output,
                value_output,
                key_adapter: placeholder()?,
                value_adapter: placeholder()?,
            });
        }
        if layers.is_empty() {
            bail!("the UNet has no cross-attention layers to edit")
        }
        let method = Self {
            ti,
            templates,
            superclass: superclass.to_string(),
            value_lr_scale,
            cov_inverse,
            target_input: Mutex::new(e_super),
            pending: Mutex::new(vec![]),
            training: AtomicBool::new(false),
            layers,
            beta,
            tau,
        };
        method.refresh()?;
        sd.unet.visit_projections(&mut |p| {
            let Projection::Linear(lin) = p else { return };
            for l in &method.layers {
                let adapter = if lin.name == format!("{}.to_k", l.module) {
                    l.key_adapter.clone()
                } else if lin.name == format!("{}.to_v", l.module) {
                    l.value_adapter.clone()
                } else {
                    continue;
                };
                lin.adapters.push(ScaledAdapter {
                    adapter,
                    scale: 1.0,
                });
            }
        });
        Ok(method)
    }

    /// `C⁻¹ i*` for the current target input.
    fn target_input_cinv(&self, i: &Tensor) -> Result<Tensor> {
        Ok(self.cov_inverse.matmul(&i.unsqueeze(1)?)?.squeeze(1)?)
    }

    /// Rebuilds every adapter's gate from the current `i*` (and the current `o*_V`).
    fn refresh(&self) -> Result<()> {
        let i = lock(&self.target_input)?.clone();
        let cinv = self.target_input_cinv(&i)?;
        let denom = (&i * &cinv)?.sum_all()?.to_scalar::<f32>()? as f64;
        if !(denom > 0.0) {
            bail!("perfusion: i*ᵀC⁻¹i* = {denom} is not positive")
        }
        let dual = (cinv / denom)?.unsqueeze(0)?;
        let column = i.unsqueeze(1)?;
        let beta = Tensor::new(&[self.beta as f32], i.device())?;
        let tau = Tensor::new(&[self.tau as f32], i.device())?;
        for l in &self.layers {
            for (adapter, w, outputs) in [
                (&l.key_adapter, &l.w_k, l.key_output.clone()),
                (&l.value_adapter, &l.w_v, l.value_output.as_tensor().clone()),
            ] {
                let params = GateParams {
                    dual: dual.clone(),
                    w_input: w.matmul(&column)?.squeeze(1)?.unsqueeze(0)?,
                    outputs: outputs.unsqueeze(0)?,
                    beta: beta.clone(),
                    tau: tau.clone(),
                };
                *adapter
                    .params
                    .write()
                    .map_err(|_| anyhow::anyhow!("perfusion adapter poisoned"))? = params;
            }
        }
        Ok(())
    }
}

/// The superclass word's text-encoder output in "a photo of a {superclass}" `[dim]`.
pub fn superclass_encoding(sd: &StableDiffusion, superclass: &str) -> Result<Tensor> {
    let word = sd.tokenizer.tokenize(superclass);
    let [id] = word.as_slice() else {
        bail!(
            "superclass '{superclass}' is {} tokens; choose a word that is a single token (e.g. 'toy', 'dog')",
            word.len()
        )
    };
    let ids = sd.tokenize(&format!("a photo of a {superclass}"))?;
    let row: Vec<i64> = ids.flatten_all()?.to_vec1()?;
    let pos = row
        .iter()
        .position(|&v| v == *id as i64)
        .context("superclass token not found in its prompt")?;
    let states = sd.text_encoder.forward(&ids, 0)?.last_hidden_state;
    Ok(states.get(0)?.get(pos)?.to_dtype(DType::F32)?)
}

impl super::Method for PerfusionMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = vec![("token_embeddings".to_string(), self.ti.vectors.clone())];
        for l in &self.layers {
            out.push((format!("value_output.{}", l.module), l.value_output.clone()));
        }
        out
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name.starts_with("value_output.") {
            self.value_lr_scale
        } else {
            1.0
        }
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        crate::templates::caption_for_image(
            self.templates,
            image.caption.as_deref(),
            &self.ti.token,
            &self.ti.placeholder_string(),
            rng,
        )
    }

    fn prompt(&self, prompt: &str) -> String {
        prompt.replace(&self.ti.token, &self.ti.placeholder_string())
    }

    fn begin_forward(&self, key: Option<u64>) {
        self.training.store(key.is_some(), Ordering::SeqCst);
    }

    fn text_states(&self, sd: &StableDiffusion, ids: &Tensor) -> Result<TextStates> {
        let states = self.ti.encode(&sd.text_encoder, ids)?;
        if self.training.load(Ordering::SeqCst) {
            let id = self.ti.token_ids[0] as i64;
            let rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
            let detached = states.detach();
            let mut seen = vec![];
            for (b, row) in rows.iter().enumerate() {
                for (s, &v) in row.iter().enumerate() {
                    if v == id {
                        seen.push(detached.get(b)?.get(s)?.to_dtype(DType::F32)?);
                    }
                }
            }
            lock(&self.pending)?.extend(seen);
        }
        Ok(TextStates::Shared(states))
    }

    fn after_step(&self) -> Result<()> {
        let seen = std::mem::take(&mut *lock(&self.pending)?);
        if seen.is_empty() {
            return Ok(());
        }
        let mean = Tensor::stack(&seen, 0)?.mean(0)?;
        {
            let mut i = lock(&self.target_input)?;
            *i = ((&*i * EMA_DECAY)? + (mean * (1.0 - EMA_DECAY))?)?;
        }
        self.refresh()
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            "target_input".to_string(),
            lock(&self.target_input)?.clone(),
        )])
    }

    fn restore_state(&self, state: &[(String, Tensor)]) -> Result<()> {
        let (_, t) = state
            .iter()
            .find(|(n, _)| n == "target_input")
            .context("the checkpoint lacks Perfusion's target input")?;
        *lock(&self.target_input)? = t.to_device(&self.cov_inverse.device().clone())?;
        self.refresh()
    }

    fn concept(&self, base_model: Option<String>) -> Result<Concept> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let i = lock(&self.target_input)?.clone();
        let cinv = self.target_input_cinv(&i)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(PerfusionLayer {
                    module: l.module.clone(),
                    key_output: cpu(&l.key_output)?,
                    value_output: cpu(l.value_output.as_tensor())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Concept {
            trigger: self.ti.token.clone(),
            method: PERFUSION.to_string(),
            embeddings: vec![TokenEmbedding::new(
                TEXT_ENCODER,
                cpu(self.ti.vectors.as_tensor())?,
            )?],
            perfusion: Some(PerfusionEdit {
                target_input: cpu(&i)?,
                target_input_cinv: cpu(&cinv)?,
                layers,
                superclass: self.superclass.clone(),
                beta: DEFAULT_BETA,
                tau: DEFAULT_TAU,
            }),
            base_model,
            ..Default::default()
        })
    }
}
