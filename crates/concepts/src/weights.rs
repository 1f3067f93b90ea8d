//! Whole-weight parts of a concept and changes to a network's weights.
//!
//! Custom Diffusion fine-tunes whole projections (the cross-attention keys and values): a
//! concept carries them as [`ProjectionWeights`], either the fine-tuned weights themselves (what
//! diffusers' folder holds, which replace the model's) or their changes (imprint's native file).
//! Applying at a scale `s` gives `W + s·(W' − W)`, or `W + s·ΔW`. [`WeightChanges`] collects the
//! changes of any part (these, LyCORIS) for one network, checked before any weight changes.

use crate::lora::flat_name;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::visit::{Projection, VisitProjections};
use std::collections::HashMap;

/// A projection's weight (and bias) a concept brings.
#[derive(Clone, Debug)]
pub struct ProjectionWeights {
    /// `unet` or `text_encoder`.
    pub network: String,
    /// The projection's module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`.
    pub module: String,
    /// `[out, in]` (f32, CPU): the weight itself, or its change when `delta`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub delta: bool,
}

fn finite(t: &Tensor, what: &str) -> Result<Tensor> {
    let t = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    if !t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite())
    {
        bail!("{what} contains NaN or infinite values")
    }
    Ok(t)
}

impl ProjectionWeights {
    pub fn new(
        network: &str,
        module: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        delta: bool,
    ) -> Result<Self> {
        if weight.rank() != 2 {
            bail!(
                "{module}: weight of shape {:?} is not a linear layer's",
                weight.dims()
            )
        }
        let weight = finite(&weight, module)?;
        let bias = match bias {
            Some(b) => {
                if b.dims() != [weight.dim(0)?] {
                    bail!(
                        "{module}: bias {:?} does not fit weight {:?}",
                        b.dims(),
                        weight.dims()
                    )
                }
                Some(finite(&b, module)?)
            }
            None => None,
        };
        Ok(Self {
            network: network.to_string(),
            module: module.to_string(),
            weight,
            bias,
            delta,
        })
    }
}

/// Changes to one network's projection weights: projection name → (ΔW, Δbias).
#[derive(Default)]
pub struct WeightChanges {
    changes: HashMap<String, (Tensor, Option<Tensor>)>,
}

impl WeightChanges {
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Adds a change of projection `name` (summed with earlier ones).
    pub fn add(&mut self, name: &str, weight: Tensor, bias: Option<Tensor>) -> Result<()> {
        let merged = match self.changes.remove(name) {
            None => (weight, bias),
            Some((w, b)) => (
                (w + weight)?,
                match (b, bias) {
                    (Some(a), Some(c)) => Some((a + c)?),
                    (a, c) => a.or(c),
                },
            ),
        };
        self.changes.insert(name.to_string(), merged);
        Ok(())
    }

    /// Adds the changes into `model`'s weights (the model they were prepared for).
    pub fn apply(&self, model: &mut dyn VisitProjections) -> Result<usize> {
        let mut failure = None;
        model.visit_projections(&mut |p| {
            let (name, w, b) = match p {
                Projection::Linear(l) => (l.name.clone(), &mut l.weight, &mut l.bias),
                Projection::Conv2d(c) => (c.name.clone(), &mut c.weight, &mut c.bias),
            };
            let Some((dw, db)) = self.changes.get(&name) else {
                return;
            };
            let add = |t: &Tensor, d: &Tensor| {
                d.to_device(t.device())
                    .and_then(|d| d.to_dtype(t.dtype()))
                    .and_then(|d| t.clone() + d)
            };
            match add(w, dw) {
                Ok(n) => *w = n,
                Err(e) => failure = Some(e),
            }
            match (b.as_ref(), db) {
                (Some(bias), Some(d)) => match add(bias, d) {
                    Ok(n) => *b = Some(n),
                    Err(e) => failure = Some(e),
                },
                (None, Some(d)) => {
                    match d.to_device(w.device()).and_then(|d| d.to_dtype(w.dtype())) {
                        Ok(n) => *b = Some(n),
                        Err(e) => failure = Some(e),
                    }
                }
                _ => {}
            }
        });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(self.changes.len()),
        }
    }
}

/// The changes that `projections` on `network` make at `scale` to `model`'s weights, checked
/// (every module exists, shapes fit); nothing changes until [`WeightChanges::apply`].
pub fn prepare_projections(
    model: &mut dyn VisitProjections,
    network: &str,
    projections: &[ProjectionWeights],
    scale: f64,
) -> Result<WeightChanges> {
    let mut out = WeightChanges::default();
    let mine: Vec<&ProjectionWeights> = projections
        .iter()
        .filter(|p| p.network == network)
        .collect();
    if mine.is_empty() {
        return Ok(out);
    }
    let mut current: HashMap<String, (String, Tensor, Option<Tensor>)> = HashMap::new();
    model.visit_projections(&mut |p| {
        if let Projection::Linear(l) = p {
            current.insert(
                flat_name(&l.name),
                (l.name.clone(), l.weight.clone(), l.bias.clone()),
            );
        }
    });
    for p in mine {
        let Some((name, w, b)) = current.get(&flat_name(&p.module)) else {
            bail!("'{}' is not a linear projection of this {network}: was the concept made for another model?", p.module)
        };
        if p.weight.dims() != w.dims() {
            bail!(
                "'{}': weight {:?} does not fit the model's {:?} (was the concept made for another base model?)",
                p.module,
                p.weight.dims(),
                w.dims()
            )
        }
        let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let dw = if p.delta {
            (&p.weight * scale)?
        } else {
            ((&p.weight - &w)? * scale)?
        };
        let db = match (&p.bias, b) {
            (None, _) => None,
            (Some(nb), Some(b)) if !p.delta => {
                let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                Some(((nb - b)? * scale)?)
            }
            (Some(nb), _) => Some((nb * scale)?),
        };
        out.add(name, dw, db)
            .with_context(|| format!("'{}'", p.module))?;
    }
    Ok(out)
}
