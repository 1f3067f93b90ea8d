//! LoRA: low-rank deltas on a network's projections, the part of a [`Concept`](crate::Concept)
//! that LoRA and DreamBooth-LoRA train.
//!
//! A LoRA on one projection `W [out, in]` is a pair `down [r, in]`, `up [out, r]` and an `alpha`;
//! the layer then computes `W x + s · (alpha / r) · up (down x)`, `s` being the user's scale
//! (diffusers' `set_adapters(.., adapter_weights=s)` / `cross_attention_kwargs={"scale": s}`, the
//! `:0.7` of A1111's `<lora:name:0.7>`). On a convolution (kohya's LoCon) `down` is a `k×k`
//! convolution `[r, in, k, k]` with the base layer's stride and padding and `up` a `1×1`
//! convolution `[out, r, 1, 1]`.
//!
//! Targets are named by the reference's module path (diffusers' names for the UNet, transformers'
//! `text_model.…` names for the text encoder) and tagged with their network; the file formats
//! translate those names ([`crate::formats::kohya`], [`crate::formats::diffusers_lora`]).
//! [`apply_lora`] attaches a [`LoraAdapter`] to each target through the models' adapter hook
//! ([`VisitProjections`]); [`LoraModule::delta_weight`] gives the dense delta that `model merge`
//! bakes into the weights.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::visit::{Projection, VisitProjections};
use imprint_ops::{Adapter, Conv2dConfig, ScaledAdapter};
use std::collections::HashMap;
use std::sync::Arc;

/// The method name LoRA concepts carry (`Concept::method`).
pub const LORA: &str = "lora";
/// The network name of the denoising UNet.
pub const UNET: &str = "unet";

/// The low-rank delta on one projection.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The network the projection belongs to: [`UNET`], [`crate::TEXT_ENCODER`] or
    /// [`crate::TEXT_ENCODER_2`].
    pub network: String,
    /// The module path in the reference, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
    /// or `text_model.encoder.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in]`, or `[r, in, k, k]` on a convolution. f32 on the CPU.
    pub down: Tensor,
    /// `[out, r]`, or `[out, r, 1, 1]` on a convolution. f32 on the CPU.
    pub up: Tensor,
    /// The delta is scaled by `alpha / r` (kohya's `.alpha`, PEFT's `lora_alpha`).
    pub alpha: f64,
}

impl LoraModule {
    /// Checks and normalizes a pair: ranks agree, shapes are linear or conv, values are finite.
    /// `what` names the pair in errors (a file key).
    pub fn new(
        network: &str,
        module: &str,
        down: Tensor,
        up: Tensor,
        alpha: f64,
        what: &str,
    ) -> Result<Self> {
        let f32 = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?)
        };
        let (down, up) = (f32(down)?, f32(up)?);
        let (d, u) = (down.dims().to_vec(), up.dims().to_vec());
        let ok = match (d.len(), u.len()) {
            (2, 2) => d[0] == u[1],
            (4, 4) => d[0] == u[1] && u[2] == 1 && u[3] == 1 && d[2] == d[3],
            // Some trainers save a linear's pair as 1×1 convolutions.
            (2, 4) | (4, 2) => false,
            _ => false,
        };
        if !ok {
            bail!("LoRA {what}: down {d:?} and up {u:?} are not a low-rank pair (expected down [r, in] and up [out, r], or down [r, in, k, k] and up [out, r, 1, 1])")
        }
        let rank = d[0];
        if rank == 0 || d[1] == 0 || u[0] == 0 {
            bail!("LoRA {what}: empty weights (down {d:?}, up {u:?})")
        }
        // The delta has at most min(out, in·k·k) independent directions (a convolution's input
        // side is its whole receptive field, as LoCon counts it).
        let fan_in: usize = d[1..].iter().product();
        if rank > fan_in || rank > u[0] {
            bail!(
                "LoRA {what}: rank {rank} is larger than the layer ({} in, {} out)",
                d[1],
                u[0]
            )
        }
        if !alpha.is_finite() {
            bail!("LoRA {what}: alpha {alpha} is not a finite number")
        }
        for (name, t) in [("down", &down), ("up", &up)] {
            let finite = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                bail!("LoRA {what}: {name} weights contain NaN or infinite values")
            }
        }
        Ok(Self {
            network: network.to_string(),
            module: module.to_string(),
            down,
            up,
            alpha,
        })
    }

    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `alpha / r`: what the delta is multiplied by at scale 1.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    pub fn is_conv(&self) -> bool {
        self.down.rank() == 4
    }

    pub fn in_dim(&self) -> usize {
        self.down.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.up.dims()[0]
    }

    /// The kernel size of the base convolution (1 for a linear layer).
    pub fn kernel(&self) -> usize {
        if self.is_conv() {
            self.down.dims()[2]
        } else {
            1
        }
    }

    /// The dense delta `(alpha / r) · up · down` in the base weight's shape: `[out, in]` for a
    /// linear layer, `[out, in, k, k]` for a convolution.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let r = self.rank();
        let (out, inp, k) = (self.out_dim(), self.in_dim(), self.kernel());
        let up = self.up.reshape((out, r))?;
        let down = self.down.reshape((r, inp * k * k))?;
        let delta = (up.matmul(&down)? * self.scale())?;
        Ok(if self.is_conv() {
            delta.reshape((out, inp, k, k))?
        } else {
            delta
        })
    }
}

/// Every LoRA pair of a concept.
#[derive(Clone, Debug, Default)]
pub struct LoraWeights {
    pub modules: Vec<LoraModule>,
}

impl LoraWeights {
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The networks the LoRA touches, in first-seen order.
    pub fn networks(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for m in &self.modules {
            if !out.contains(&m.network.as_str()) {
                out.push(&m.network);
            }
        }
        out
    }

    /// The modules on one network.
    pub fn on<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a LoraModule> + 'a {
        self.modules.iter().filter(move |m| m.network == network)
    }

    /// The most common rank and alpha (what kohya's `ss_network_dim`/`ss_network_alpha` record).
    pub fn typical_rank_alpha(&self) -> Option<(usize, f64)> {
        let mut counts: Vec<((usize, u64), usize)> = Vec::new();
        for m in &self.modules {
            let key = (m.rank(), m.alpha.to_bits());
            match counts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => counts.push((key, 1)),
            }
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|((r, a), _)| (r, f64::from_bits(a)))
    }

    /// Checks that no module appears twice.
    pub fn validate(&self) -> Result<()> {
        for (i, m) in self.modules.iter().enumerate() {
            if self.modules[..i]
                .iter()
                .any(|o| o.network == m.network && o.module == m.module)
            {
                bail!("LoRA has two deltas for {} {}", m.network, m.module)
            }
        }
        Ok(())
    }
}

/// kohya's flat spelling of a module path: every '.' becomes '_'. Matching on it lets a module
/// found by any route (kohya's names, a guessed split, a transformers-5 path) meet the model's.
pub fn flat_name(module: &str) -> String {
    module.replace('.', "_")
}

/// `up(down(x)) · alpha / r`, the delta a LoRA adds to its projection's output.
#[derive(Debug)]
pub struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    /// `alpha / r`; the user's scale is the [`ScaledAdapter`]'s.
    scale: f64,
    /// The base convolution's stride and padding (`None` on a linear layer).
    conv: Option<Conv2dConfig>,
}

impl LoraAdapter {
    /// The adapter for `module`, with weights moved to the model's device and dtype.
    pub fn new(
        module: &LoraModule,
        conv: Option<Conv2dConfig>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let to = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let (mut down, mut up) = (to(&module.down)?, to(&module.up)?);
        // A linear-shaped pair on a 1×1 convolution (proj_in/proj_out of SD 1.x) is the same map.
        if conv.is_some() && down.rank() == 2 {
            down = down.unsqueeze(2)?.unsqueeze(3)?;
            up = up.unsqueeze(2)?.unsqueeze(3)?;
        }
        Ok(Self {
            down,
            up,
            scale: module.scale(),
            conv,
        })
    }
}

impl Adapter for LoraAdapter {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match self.conv {
            None => x
                .broadcast_matmul(&self.down.t()?)?
                .broadcast_matmul(&self.up.t()?)?,
            Some(c) => x
                .conv2d(&self.down, c.padding, c.stride, 1, 1)?
                .conv2d(&self.up, 0, 1, 1, 1)?,
        };
        if self.scale == 1.0 {
            Ok(y)
        } else {
            y * self.scale
        }
    }

    fn low_rank(&self) -> Option<imprint_ops::LowRank> {
        self.conv.is_none().then(|| imprint_ops::LowRank {
            down: self.down.clone(),
            up: self.up.clone(),
            scale: self.scale,
        })
    }
}

/// What a projection of the model is, for matching a LoRA against it.
struct Slot {
    name: String,
    conv: Option<Conv2dConfig>,
    /// `[out, in]` or `[out, in, k, k]`.
    weight_dims: Vec<usize>,
}

/// Attaches every module of `lora` on `network` to the matching projection of `model` at
/// `scale`. All modules are checked (name, kind, shape) before any is attached, so a LoRA that
/// does not fit leaves the model unchanged. Returns the number of projections adapted.
pub fn apply_lora(
    model: &mut dyn VisitProjections,
    network: &str,
    lora: &LoraWeights,
    scale: f64,
) -> Result<usize> {
    if !scale.is_finite() {
        bail!("LoRA scale {scale} is not a finite number")
    }
    let prepared = prepare_lora(model, network, lora)?;
    Ok(prepared.attach(model, scale))
}

/// Adapters checked against a model and ready to attach ([`prepare_lora`]): lets a caller check
/// several networks before changing any.
pub struct PreparedLora {
    /// By the model's projection name.
    adapters: HashMap<String, LoraAdapter>,
}

impl PreparedLora {
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Adds the adapters to their projections at `scale`; returns how many were attached.
    pub fn attach(mut self, model: &mut dyn VisitProjections, scale: f64) -> usize {
        let mut n = 0;
        model.visit_projections(&mut |p| {
            let (name, list) = match p {
                Projection::Linear(l) => (l.name.clone(), &mut l.adapters),
                Projection::Conv2d(c) => (c.name.clone(), &mut c.adapters),
            };
            if let Some(a) = self.adapters.remove(&name) {
                list.push(ScaledAdapter {
                    adapter: Arc::new(a),
                    scale,
                });
                n += 1;
            }
        });
        n
    }
}

/// Matches every module of `lora` on `network` with a projection of `model` by kohya's flat name
/// (the model's names with '.' → '_'), and checks kinds and shapes. A module that is none of the
/// model's projections is an error naming it: a LoRA for another architecture.
pub fn prepare_lora(
    model: &mut dyn VisitProjections,
    network: &str,
    lora: &LoraWeights,
) -> Result<PreparedLora> {
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let mut device_dtype = None;
    model.visit_projections(&mut |p| {
        let (name, conv, w) = match &p {
            Projection::Linear(l) => (l.name.clone(), None, &l.weight),
            Projection::Conv2d(c) => (c.name.clone(), Some(c.config), &c.weight),
        };
        device_dtype.get_or_insert((w.device().clone(), w.dtype()));
        slots.insert(
            flat_name(&name),
            Slot {
                name,
                conv,
                weight_dims: w.dims().to_vec(),
            },
        );
    });
    let Some((device, dtype)) = device_dtype else {
        bail!("the {network} has no projections to apply a LoRA to")
    };
    let mut adapters: HashMap<String, LoraAdapter> = HashMap::new();
    for m in lora.on(network) {
        let Some(slot) = slots.get(&flat_name(&m.module)) else {
            bail!("LoRA module '{}' is not a projection of this {network}: is it a LoRA for another architecture?", m.module)
        };
        check_fits(m, slot).with_context(|| format!("LoRA module '{}'", m.module))?;
        adapters.insert(
            slot.name.clone(),
            LoraAdapter::new(m, slot.conv, &device, dtype)?,
        );
    }
    Ok(PreparedLora { adapters })
}

fn check_fits(m: &LoraModule, slot: &Slot) -> Result<()> {
    let w = &slot.weight_dims;
    match (m.is_conv(), slot.conv.is_some()) {
        (true, false) => bail!(
            "a convolution LoRA for a linear layer {w:?}: is it a LoRA for another architecture?"
        ),
        (false, true) if w[2] != 1 || w[3] != 1 => bail!(
            "a linear LoRA for a {}×{} convolution: is it a LoRA for another architecture?",
            w[2],
            w[3]
        ),
        _ => {}
    }
    if m.out_dim() != w[0] || m.in_dim() != w[1] || (m.is_conv() && m.kernel() != w[2]) {
        bail!(
            "delta shape down {:?} / up {:?} does not fit the layer's weight {w:?}: is it a LoRA for another architecture?",
            m.down.dims(),
            m.up.dims()
        )
    }
    Ok(())
}

/// The module paths of a network's projections (kohya's names are matched against these).
pub fn projection_names(model: &mut dyn VisitProjections) -> Vec<String> {
    let mut names = Vec::new();
    model.visit_projections(&mut |p| names.push(p.name().to_string()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use imprint_ops::{Conv2d, Linear};

    fn t(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0) - 0.5)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    struct Net(Linear, Conv2d);
    impl VisitProjections for Net {
        fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
            f(Projection::Linear(&mut self.0));
            f(Projection::Conv2d(&mut self.1));
        }
    }

    fn net() -> Net {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
        };
        Net(
            Linear::from_weights("a.to_q", t(&[6, 5], 1), None),
            Conv2d::from_weights("b.conv1", t(&[4, 3, 3, 3], 2), None, cfg),
        )
    }

    #[test]
    fn adapters_equal_the_merged_delta() {
        let mut n = net();
        let lora = LoraWeights {
            modules: vec![
                LoraModule::new(UNET, "a.to_q", t(&[2, 5], 3), t(&[6, 2], 4), 3.0, "q").unwrap(),
                LoraModule::new(
                    UNET,
                    "b.conv1",
                    t(&[2, 3, 3, 3], 5),
                    t(&[4, 2, 1, 1], 6),
                    1.0,
                    "c",
                )
                .unwrap(),
            ],
        };
        assert_eq!(apply_lora(&mut n, UNET, &lora, 0.7).unwrap(), 2);
        let x = t(&[2, 5], 7);
        let merged =
            (&n.0.weight + (lora.modules[0].delta_weight().unwrap() * 0.7).unwrap()).unwrap();
        let d = (n.0.forward(&x).unwrap() - x.matmul(&merged.t().unwrap()).unwrap()).unwrap();
        assert!(
            d.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
        let x = t(&[1, 3, 6, 6], 8);
        let merged =
            (&n.1.weight + (lora.modules[1].delta_weight().unwrap() * 0.7).unwrap()).unwrap();
        let d = (n.1.forward(&x).unwrap() - x.conv2d(&merged, 1, 2, 1, 1).unwrap()).unwrap();
        assert!(
            d.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
    }

    #[test]
    fn bad_pairs_and_foreign_modules_are_refused() {
        let e = LoraModule::new(UNET, "a", t(&[2, 5], 1), t(&[6, 3], 1), 1.0, "k").unwrap_err();
        assert!(e.to_string().contains("not a low-rank pair"), "{e}");
        let e = LoraModule::new(UNET, "a", t(&[7, 5], 1), t(&[6, 7], 1), 1.0, "k").unwrap_err();
        assert!(e.to_string().contains("rank 7 is larger"), "{e}");
        let mut n = net();
        let lora = LoraWeights {
            modules: vec![
                LoraModule::new(UNET, "x.to_k", t(&[2, 5], 3), t(&[6, 2], 4), 2.0, "k").unwrap(),
            ],
        };
        let e = apply_lora(&mut n, UNET, &lora, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another architecture"), "{e}");
        let lora = LoraWeights {
            modules: vec![
                LoraModule::new(UNET, "a.to_q", t(&[2, 4], 3), t(&[6, 2], 4), 2.0, "k").unwrap(),
            ],
        };
        assert!(apply_lora(&mut n, UNET, &lora, 1.0).is_err());
        assert!(n.0.adapters.is_empty());
    }
}
