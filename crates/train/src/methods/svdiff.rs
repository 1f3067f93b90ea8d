//! SVDiff (Han et al. 2023, "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning"): tune
//! only the singular values of the base weights. Every linear and conv weight of the UNet (and with
//! `--train-text-encoder` of the text encoder) becomes `U · diag(relu(σ + δ)) · Vᵀ` (conv kernels
//! as `out × in·k·k`) and every norm weight `γ · relu(‖γ‖ + δ) / ‖γ‖`; only the δs train.
//!
//! * **Trainable**: one δ per singular value (~1 MB per concept on SD 1.5) and one per norm.
//! * **Forward**: the base layer plus an adapter `x ↦ ((x Vᵀ) ⊙ (relu(σ + δ) − σ)) Uᵀ` (for convs
//!   a rank-r conv with the kernel `Vᵀ`, its channels scaled by `relu(σ + δ) − σ`, then a 1×1
//!   mix by U), so δ = 0 is the base model exactly and the SVD's rounding never enters the
//!   output.
//! * **Loss**: DreamBooth's (instance prompt with a rare word, prior preservation with class
//!   images through the shared loop's `--class-prompt`).
//! * **Defaults**: the public implementation's README (svdiff-pytorch): lr 1e-3 (1e-6 for the
//!   norms' δ), 500 steps, batch 1, constant schedule.
//! * **Output**: imprint's native file; `imprint concept convert --format svdiff` writes the
//!   public `spectral_shifts.safetensors` folder.
//!
//! * **Cut-Mix-Unmix** (§3.3, `--second-images DIR --subjects "A,B"`): two subjects trained
//!   together; besides each subject's own images, cut-mix images (one subject's centre strip on
//!   the left, the other's on the right, captioned "a photo of a A on the left and a B on the
//!   right") and the unmix regularizer, which penalizes each subject's tokens' cross-attention
//!   where the other subject lies ([`imprint_models::attention::UnmixProbe`]; the data in
//!   [`crate::data::cut_mix`], the loss in the shared loop).
//!
//! The text encoder's embedding tables are shifted when a file has them (generation), but not
//! trained here.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use imprint_concepts::spectral::{self, SpectralShift, SVDIFF};
use imprint_concepts::{Concept, TEXT_ENCODER, UNET};
use imprint_models::visit::{Projection, VisitProjections};
use imprint_ops::{Adapter, Conv2d, Conv2dConfig, Linear, ScaledAdapter};
use imprint_pipeline::StableDiffusion;
use std::sync::Arc;

pub const DEFAULT_LR: f64 = 1e-3;
/// The norms' δ learning rate, 1e-6, as a multiple of [`DEFAULT_LR`].
pub const NORM_LR_SCALE: f64 = 1e-3;
pub const DEFAULT_STEPS: usize = 500;

/// The spectral-shift adapter of one linear or conv layer.
#[derive(Debug)]
pub struct SpectralAdapter {
    /// `U [out, r]` and `Vᵀ [r, in]` (`[r, in, k, k]` for a conv). Under mixed precision they are
    /// cast once, on first use, and kept in the activations' dtype: a cast per forward would
    /// keep a half copy of every layer's bases alive until the backward pass.
    bases: std::sync::RwLock<(Tensor, Tensor)>,
    /// `[r]`.
    s: Tensor,
    /// The trained δ `[r]` (a `Var`'s tensor: it sees every optimizer update).
    delta: Tensor,
    conv: Option<Conv2dConfig>,
}

impl SpectralAdapter {
    fn new(u: Tensor, s: Tensor, vt: Tensor, delta: Tensor, conv: Option<Conv2dConfig>) -> Self {
        Self {
            bases: std::sync::RwLock::new((u, vt)),
            s,
            delta,
            conv,
        }
    }

    /// `(U, Vᵀ)` in `dtype`.
    fn bases_in(&self, dtype: candle_core::DType) -> candle_core::Result<(Tensor, Tensor)> {
        fn poisoned<E>(_: E) -> candle_core::Error {
            candle_core::Error::Msg("svdiff: bases poisoned".into())
        }
        {
            let b = self.bases.read().map_err(poisoned)?;
            if b.0.dtype() == dtype {
                return Ok(b.clone());
            }
        }
        let mut b = self.bases.write().map_err(poisoned)?;
        if b.0.dtype() != dtype {
            *b = (b.0.to_dtype(dtype)?, b.1.to_dtype(dtype)?);
        }
        Ok(b.clone())
    }
}

impl Adapter for SpectralAdapter {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let d = (self.s.broadcast_add(&self.delta)?.relu()? - &self.s)?.to_dtype(x.dtype())?;
        let (u, vt) = self.bases_in(x.dtype())?;
        // U and Vᵀ are frozen: they go through imprint's frozen-weight linear and conv, whose
        // backward returns only the input gradient. candle's matmul would also compute (and keep
        // until the backward pass ends) a basis-sized gradient for each of them, on SD 1.5 the
        // UNet's weights over again.
        let u = Linear::from_weights("svdiff.u", u, None);
        match self.conv {
            None => {
                let h = Linear::from_weights("svdiff.vt", vt, None)
                    .forward_base(x)?
                    .broadcast_mul(&d)?;
                u.forward_base(&h)
            }
            Some(cfg) => {
                // conv(x, diag(d)·Vᵀ) = d ⊙ conv(x, Vᵀ): scaling the rank-r output channels
                // keeps no kernel-sized temporary per layer.
                let r = d.dim(0)?;
                let h = Conv2d::from_weights("svdiff", vt, None, cfg)
                    .forward_base(x)?
                    .broadcast_mul(&d.reshape((1, r, 1, 1))?)?;
                // The 1×1 mix by U over the channels, as a linear on channels-last.
                u.forward_base(&h.permute((0, 2, 3, 1))?)?
                    .permute((0, 3, 1, 2))?
                    .contiguous()
            }
        }
    }
}

/// One trained δ.
struct Shift {
    network: &'static str,
    module: String,
    delta: Var,
    norm: bool,
}

/// SVDiff in the shared loop.
pub struct SvdiffMethod {
    shifts: Vec<Shift>,
    pub instance_prompt: Option<String>,
    pub token: Option<String>,
}

/// Attaches zero shifts to every projection and norm of `model`.
fn attach_network(
    model: &mut dyn VisitProjections,
    network: &'static str,
    out: &mut Vec<Shift>,
) -> Result<()> {
    let weights = spectral::projection_weights(model)?;
    let bar = indicatif::ProgressBar::new(weights.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "SVD of the {msg} weights {bar:30} {pos}/{len} (once per model, then cached)",
        )
        .expect("valid template"),
    );
    bar.set_message(network);
    let bases = spectral::bases(network, &weights, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let mut failure: Option<anyhow::Error> = None;
    model.visit_projections(&mut |p| {
        if failure.is_some() {
            return;
        }
        let made = (|| -> Result<()> {
            let (name, device, dtype, conv, adapters) = match p {
                Projection::Linear(l) => (
                    l.name.clone(),
                    l.weight.device().clone(),
                    l.weight.dtype(),
                    None,
                    &mut l.adapters,
                ),
                Projection::Conv2d(c) => (
                    c.name.clone(),
                    c.weight.device().clone(),
                    c.weight.dtype(),
                    Some((c.config, c.weight.dims().to_vec())),
                    &mut c.adapters,
                ),
            };
            let svd = bases
                .get(&name)
                .with_context(|| format!("no SVD for {name}"))?;
            let r = svd.s.dim(0)?;
            let to = |t: &Tensor| t.to_device(&device).and_then(|t| t.to_dtype(dtype));
            let vt = match &conv {
                None => to(&svd.vt)?,
                Some((_, dims)) => to(&svd.vt)?.reshape((r, dims[1], dims[2], dims[3]))?,
            };
            let delta = Var::zeros(r, dtype, &device)?;
            adapters.push(ScaledAdapter {
                adapter: Arc::new(SpectralAdapter::new(
                    to(&svd.u)?,
                    to(&svd.s)?,
                    vt,
                    delta.as_tensor().clone(),
                    conv.map(|(c, _)| c),
                )),
                scale: 1.0,
            });
            out.push(Shift {
                network,
                module: name,
                delta,
                norm: false,
            });
            Ok(())
        })();
        if let Err(e) = made {
            failure = Some(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    model.visit_norms(&mut |mut n| {
        let name = n.name().to_string();
        let (w, shift) = n.parts();
        match Var::zeros(1, w.dtype(), w.device()) {
            Ok(delta) => {
                *shift = Some(delta.as_tensor().clone());
                out.push(Shift {
                    network,
                    module: name,
                    delta,
                    norm: true,
                });
            }
            Err(e) => failure = Some(e.into()),
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl SvdiffMethod {
    pub fn attach(
        sd: &mut StableDiffusion,
        train_text_encoder: bool,
        instance_prompt: Option<String>,
        token: Option<String>,
    ) -> Result<Self> {
        let mut shifts = vec![];
        attach_network(&mut sd.unet, UNET, &mut shifts)?;
        if train_text_encoder {
            attach_network(&mut sd.text_encoder, TEXT_ENCODER, &mut shifts)?;
        }
        if shifts.is_empty() {
            bail!("the model has no weights for SVDiff to shift")
        }
        Ok(Self {
            shifts,
            instance_prompt,
            token,
        })
    }

    /// How many δs train.
    pub fn parameter_count(&self) -> usize {
        self.shifts.iter().map(|s| s.delta.elem_count()).sum()
    }
}

impl super::Method for SvdiffMethod {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.shifts
            .iter()
            .map(|s| (format!("{}.{}.delta", s.network, s.module), s.delta.clone()))
            .collect()
    }

    fn lr_scale(&self, name: &str) -> f64 {
        let is_norm = self
            .shifts
            .iter()
            .any(|s| s.norm && name == format!("{}.{}.delta", s.network, s.module));
        if is_norm {
            NORM_LR_SCALE
        } else {
            1.0
        }
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        _rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        super::instance_caption(image, &self.instance_prompt)
    }

    fn concept(&self, base_model: Option<String>) -> Result<Concept> {
        let spectral_shifts = self
            .shifts
            .iter()
            .map(|s| {
                Ok(SpectralShift {
                    network: s.network.to_string(),
                    module: s.module.clone(),
                    delta: s
                        .delta
                        .as_tensor()
                        .to_device(&candle_core::Device::Cpu)?
                        .to_dtype(candle_core::DType::F32)?,
                })
            })
            .collect::<Result<_>>()?;
        // The trigger: --token, else the prompt's first word that is not an article, "photo",
        // "picture" or "of" (DreamBooth-style prompts name the rare word first: "a photo of sks dog").
        const COMMON: [&str; 6] = ["a", "an", "the", "photo", "picture", "of"];
        let trigger = self
            .token
            .clone()
            .or_else(|| {
                self.instance_prompt.as_deref().and_then(|p| {
                    p.split_whitespace()
                        .find(|w| !COMMON.contains(&w.to_ascii_lowercase().as_str()))
                        .map(str::to_string)
                })
            })
            .unwrap_or_default();
        let mut concept = Concept {
            trigger,
            method: SVDIFF.to_string(),
            spectral_shifts,
            base_model,
            ..Default::default()
        };
        if let Some(p) = &self.instance_prompt {
            concept.metadata.insert("instance_prompt".into(), p.clone());
        }
        Ok(concept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imprint_ops::grad_check;

    /// The adapter's change equals `(U diag(d) Vt)` applied as a dense layer, and its gradient in
    /// δ matches finite differences (linear and conv).
    #[test]
    fn adapter_matches_the_dense_change_and_its_gradient() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w =
            Tensor::randn(0f64, 1.0, (5, 3 * 2 * 2), &dev)?.to_dtype(candle_core::DType::F32)?;
        let svd = spectral::thin_svd(&w)?;
        let delta = Var::new(&[0.3f32, -0.2, 0.1, 0.05, -0.4], &dev)?;
        let conv = SpectralAdapter::new(
            svd.u.clone(),
            svd.s.clone(),
            svd.vt.reshape((5, 3, 2, 2))?,
            delta.as_tensor().clone(),
            Some(Conv2dConfig {
                padding: 1,
                stride: 1,
            }),
        );
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev)?;
        let dense = spectral::weight_change(&svd, delta.as_tensor())?.reshape((5, 3, 2, 2))?;
        let want = x.conv2d(&dense, 1, 1, 1, 1)?;
        let got = conv.forward(&x)?;
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "conv adapter differs by {err}");
        let lin = SpectralAdapter::new(
            svd.u.clone(),
            svd.s.clone(),
            svd.vt.clone(),
            delta.as_tensor().clone(),
            None,
        );
        let xl = Tensor::randn(0f32, 1.0, (3, 12), &dev)?;
        let want = xl.matmul(&spectral::weight_change(&svd, delta.as_tensor())?.t()?)?;
        let err = (lin.forward(&xl)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(err < 1e-4, "linear adapter differs by {err}");
        // The gradient in δ (conv and linear), in f64 against central differences.
        let to64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
        let d64 = Tensor::new(&[0.3f64, -0.2, 0.1, 0.05, -0.4], &dev)?;
        let (x64, xl64) = (to64(&x)?, to64(&xl)?);
        for is_conv in [true, false] {
            grad_check::check_input_grad(
                &d64,
                |d| {
                    let a = SpectralAdapter::new(
                        to64(&svd.u)?,
                        to64(&svd.s)?,
                        if is_conv {
                            to64(&svd.vt)?.reshape((5, 3, 2, 2))?
                        } else {
                            to64(&svd.vt)?
                        },
                        d.clone(),
                        is_conv.then_some(Conv2dConfig {
                            padding: 1,
                            stride: 1,
                        }),
                    );
                    a.forward(if is_conv { &x64 } else { &xl64 })?
                        .sqr()?
                        .sum_all()
                },
                1e-5,
            )?;
        }
        Ok(())
    }
}
