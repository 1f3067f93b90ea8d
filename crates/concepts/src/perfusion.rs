//! Perfusion (Tewel et al. 2023, "Key-Locked Rank One Editing for Text-to-Image
//! Personalization"): a gated rank-1 edit of every cross-attention key and value projection.
//!
//! For a projection `W` (`to_k` or `to_v` of an `attn2`, no bias) and each text-encoder output `e`
//! (every token of every prompt, conditional and unconditional), paper §3–4:
//!
//! ```text
//! s(e) = (C⁻¹i*)ᵀ e / (i*ᵀ C⁻¹ i*)
//! h(e) = W (e − s(e) i*) + σ((s(e) − β) / τ) · o*
//! ```
//!
//! `C` is the uncentered covariance of text-encoder outputs, `i*` the concept's target input and
//! `o*` the layer's target output (for keys the superclass's `W_K e_super`: key-locking). Only
//! `C⁻¹i*` is needed at inference, so a concept stores `i*`, `C⁻¹i*` and the per-layer `o*`s.
//!
//! As an adapter on the frozen projection this is `W e + δ(e)` with
//! `δ(e) = σ((s − β)/τ) o* − s (W i*)`. Several concepts (Appendix B) solve for all `s` at once,
//! `s = G⁻¹ [(C⁻¹i*ₖ)ᵀ e]ₖ` with the Gram matrix `G = I*ᵀ C⁻¹ I*` (which makes the edits
//! orthogonal in the C⁻¹ metric: with one C for all concepts, as for concepts of one base model,
//! concept `j`'s input gives `s = eⱼ`), and sum the gated terms.

use crate::{Concept, UNET};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::visit::{Projection, VisitProjections};
use imprint_ops::{Adapter, ScaledAdapter};
use std::sync::{Arc, RwLock};

/// The method name Perfusion concepts carry (`Concept::method`).
pub const PERFUSION: &str = "perfusion";
/// The paper's inference-time gate: bias β and temperature τ.
pub const DEFAULT_BETA: f64 = 0.7;
pub const DEFAULT_TAU: f64 = 0.15;

/// The target outputs of one cross-attention layer.
#[derive(Clone, Debug)]
pub struct PerfusionLayer {
    /// The cross-attention module, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub module: String,
    /// `o*_K` `[out]`: the superclass's key, kept fixed (key-locking).
    pub key_output: Tensor,
    /// `o*_V` `[out]`: the trained value.
    pub value_output: Tensor,
}

/// A Perfusion concept's edit (its word embedding lives in `Concept::embeddings`).
#[derive(Clone, Debug)]
pub struct PerfusionEdit {
    /// `i*` `[dim]`: the concept's target input.
    pub target_input: Tensor,
    /// `C⁻¹ i*` `[dim]`.
    pub target_input_cinv: Tensor,
    pub layers: Vec<PerfusionLayer>,
    /// The superclass word the keys are locked to (e.g. "toy").
    pub superclass: String,
    /// Gate bias and temperature used when the concept is applied.
    pub beta: f64,
    pub tau: f64,
}

fn vector(t: &Tensor, what: &str) -> Result<Tensor> {
    let t = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    if !t.to_vec1::<f32>()?.iter().all(|x| x.is_finite()) {
        bail!("{what} contains NaN or infinite values")
    }
    Ok(t)
}

impl PerfusionEdit {
    /// Checks shapes and values: `i*` and `C⁻¹i*` are `[dim]` with `i*ᵀC⁻¹i* > 0`, every layer
    /// has both outputs, finite values, a gate with τ > 0.
    pub fn validate(&self, dim: usize) -> Result<()> {
        for (name, t) in [
            ("target_input", &self.target_input),
            ("target_input_cinv", &self.target_input_cinv),
        ] {
            if t.dims() != [dim] {
                bail!(
                    "perfusion.{name} has shape {:?}, the token embedding is {dim}-dimensional",
                    t.dims()
                )
            }
            vector(t, name)?;
        }
        if !(self.denominator()? > 0.0) {
            bail!("i*ᵀC⁻¹i* is not positive: target_input_cinv is not C⁻¹ of target_input")
        }
        if self.layers.is_empty() {
            bail!("no cross-attention layer has target outputs")
        }
        for l in &self.layers {
            if l.key_output.rank() != 1 || l.key_output.dims() != l.value_output.dims() {
                bail!(
                    "{}: to_k / to_v target outputs have shapes {:?} / {:?}, expected two equal [out]",
                    l.module,
                    l.key_output.dims(),
                    l.value_output.dims()
                )
            }
            vector(&l.key_output, &l.module)?;
            vector(&l.value_output, &l.module)?;
        }
        if !(self.tau > 0.0) || !self.beta.is_finite() || !self.tau.is_finite() {
            bail!(
                "the gate needs a finite beta and a positive tau (beta {}, tau {})",
                self.beta,
                self.tau
            )
        }
        Ok(())
    }

    /// `i*ᵀ C⁻¹ i*`.
    pub fn denominator(&self) -> Result<f64> {
        let a = self.target_input.to_dtype(DType::F64)?;
        let b = self.target_input_cinv.to_dtype(DType::F64)?;
        Ok((a * b)?.sum_all()?.to_scalar::<f64>()?)
    }
}

/// Values that define the edit of one projection for `k` concepts, on the model's device.
#[derive(Debug, Clone)]
pub struct GateParams {
    /// `[k, dim]`: rows `G⁻¹ (C⁻¹I)ᵀ`, so `s = e · dualᵀ`.
    pub dual: Tensor,
    /// `[k, out]`: `W i*ₖ`, times each concept's scale.
    pub w_input: Tensor,
    /// `[k, out]`: `o*ₖ`, times each concept's scale (a trainable value during training).
    pub outputs: Tensor,
    /// `[k]`: gate biases and temperatures.
    pub beta: Tensor,
    pub tau: Tensor,
}

/// The gated rank-1 edit of one projection as an adapter: `δ(e) = σ((s − β)/τ) O − s (W I)`.
/// Its parameters sit behind a lock so training can move `i*` (an EMA) between steps.
#[derive(Debug)]
pub struct PerfusionAdapter {
    pub params: Arc<RwLock<GateParams>>,
}

impl PerfusionAdapter {
    pub fn new(params: GateParams) -> Self {
        Self {
            params: Arc::new(RwLock::new(params)),
        }
    }
}

/// `σ(x) = 1 / (1 + e^(−x))` from ops that all have a backward.
fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Adapter for PerfusionAdapter {
    fn forward(&self, e: &Tensor) -> candle_core::Result<Tensor> {
        let p = self
            .params
            .read()
            .map_err(|_| candle_core::Error::Msg("perfusion: parameters poisoned".into()))?;
        let dims = e.dims().to_vec();
        let dim = *dims.last().unwrap_or(&0);
        let rows = e.elem_count() / dim.max(1);
        let e2 = e.reshape((rows, dim))?;
        let dtype = e.dtype();
        let s = e2.matmul(&p.dual.to_dtype(dtype)?.t()?)?; // [rows, k]
        let gate = sigmoid(
            &s.broadcast_sub(&p.beta.to_dtype(dtype)?)?
                .broadcast_div(&p.tau.to_dtype(dtype)?)?,
        )?;
        let delta =
            (gate.matmul(&p.outputs.to_dtype(dtype)?)? - s.matmul(&p.w_input.to_dtype(dtype)?)?)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = delta.dim(1)?;
        delta.reshape(out)
    }
}

/// Solves `G x = b` for a small symmetric positive-definite `G` (Gauss–Jordan with partial
/// pivoting, f64).
pub fn solve(g: &[Vec<f64>], b: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let n = g.len();
    let m = b.first().map_or(0, Vec::len);
    let mut a: Vec<Vec<f64>> = g
        .iter()
        .zip(b)
        .map(|(row, rhs)| row.iter().chain(rhs).copied().collect())
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .context("empty system")?;
        if a[pivot][col].abs() < 1e-300 {
            bail!("singular matrix")
        }
        a.swap(col, pivot);
        let p = a[col][col];
        a[col].iter_mut().for_each(|v| *v /= p);
        for r in 0..n {
            if r != col {
                let f = a[r][col];
                if f != 0.0 {
                    for c in 0..n + m {
                        a[r][c] -= f * a[col][c];
                    }
                }
            }
        }
    }
    Ok(a.into_iter().map(|row| row[n..].to_vec()).collect())
}

/// The dual rows `G⁻¹ (C⁻¹I)ᵀ` `[k, dim]` for target inputs `I` and `C⁻¹I` (rows), f32.
pub fn dual_rows(inputs: &[Tensor], cinvs: &[Tensor]) -> Result<Tensor> {
    let k = inputs.len();
    let rows = |ts: &[Tensor]| -> Result<Vec<Vec<f64>>> {
        ts.iter()
            .map(|t| Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
            .collect()
    };
    let (i, c) = (rows(inputs)?, rows(cinvs)?);
    // G = I*ᵀ C⁻¹ I*: Gⱼₖ = i*ⱼ · (C⁻¹i*ₖ), the Appendix's (and ROME's) orientation.
    let gram: Vec<Vec<f64>> = (0..k)
        .map(|a| {
            (0..k)
                .map(|b| i[a].iter().zip(&c[b]).map(|(x, y)| x * y).sum())
                .collect()
        })
        .collect();
    let dual = solve(&gram, &c).context(
        "the Perfusion concepts' target inputs are linearly dependent in the C⁻¹ metric",
    )?;
    let dim = dual.first().map_or(0, Vec::len);
    let flat: Vec<f32> = dual.into_iter().flatten().map(|v| v as f32).collect();
    Ok(Tensor::from_vec(flat, (k, dim), &Device::Cpu)?)
}

/// One concept's edit as applied: the edit and the scale its gated terms take.
pub struct AppliedEdit<'a> {
    pub edit: &'a PerfusionEdit,
    pub scale: f64,
}

/// Attaches one [`PerfusionAdapter`] per edited `to_k` / `to_v` of `unet` for all `edits` together
/// (Appendix B). Returns the attached adapters (so they can be removed when the set changes).
/// Every edited module must exist in the UNet with matching widths; nothing is attached otherwise.
pub fn apply_perfusion(
    unet: &mut UNet2DConditionModel,
    edits: &[AppliedEdit],
) -> Result<Vec<Arc<dyn Adapter>>> {
    if edits.is_empty() {
        return Ok(vec![]);
    }
    let device = unet.device().clone();
    let dual = dual_rows(
        &edits
            .iter()
            .map(|a| a.edit.target_input.clone())
            .collect::<Vec<_>>(),
        &edits
            .iter()
            .map(|a| a.edit.target_input_cinv.clone())
            .collect::<Vec<_>>(),
    )?
    .to_device(&device)?;
    let beta = Tensor::from_vec(
        edits.iter().map(|a| a.edit.beta as f32).collect::<Vec<_>>(),
        edits.len(),
        &device,
    )?;
    let tau = Tensor::from_vec(
        edits.iter().map(|a| a.edit.tau as f32).collect::<Vec<_>>(),
        edits.len(),
        &device,
    )?;
    // Every module some edit names, in a fixed order.
    let mut modules: Vec<&str> = vec![];
    for a in edits {
        for l in &a.edit.layers {
            if !modules.contains(&l.module.as_str()) {
                modules.push(&l.module);
            }
        }
    }
    let known: Vec<String> = unet
        .cross_attention_layers()
        .iter()
        .map(|l| l.attn2())
        .collect();
    if let Some(m) = modules.iter().find(|m| !known.iter().any(|k| k == *m)) {
        bail!("Perfusion edits {UNET} layer '{m}', which this model does not have (was the concept trained for another base model?)")
    }
    // Build every adapter before attaching any.
    let mut planned: Vec<(String, Arc<dyn Adapter>)> = vec![];
    let mut failure: Option<anyhow::Error> = None;
    unet.visit_projections(&mut |p| {
        if failure.is_some() {
            return;
        }
        let Projection::Linear(lin) = p else { return };
        let Some((module, proj)) = lin.name.rsplit_once('.') else {
            return;
        };
        if !(proj == "to_k" || proj == "to_v") || !modules.contains(&module) {
            return;
        }
        let built = (|| -> Result<GateParams> {
            let w = lin.weight.to_dtype(DType::F32)?;
            let (out, dim) = w.dims2()?;
            let mut w_input = vec![];
            let mut outputs = vec![];
            for a in edits {
                let layer = a.edit.layers.iter().find(|l| l.module == module);
                let i = a.edit.target_input.to_device(&device)?;
                if i.dim(0)? != dim {
                    bail!(
                        "{}: the concept's target input is {}-dimensional, the projection takes {dim}",
                        lin.name,
                        i.dim(0)?
                    )
                }
                let wi = w.matmul(&i.unsqueeze(1)?)?.squeeze(1)?;
                // A concept that does not edit this layer adds nothing to it (zero rows).
                let o = match layer {
                    None => {
                        w_input.push(wi.zeros_like()?);
                        outputs.push(wi.zeros_like()?);
                        continue;
                    }
                    Some(l) => {
                        let t = if proj == "to_k" {
                            &l.key_output
                        } else {
                            &l.value_output
                        };
                        if t.dims() != [out] {
                            bail!(
                                "{}: target output has shape {:?}, the projection gives [{out}] (was the concept trained for another base model?)",
                                lin.name,
                                t.dims()
                            )
                        }
                        t.to_device(&device)?
                    }
                };
                w_input.push((wi * a.scale)?);
                outputs.push((o * a.scale)?);
            }
            Ok(GateParams {
                dual: dual.clone(),
                w_input: Tensor::stack(&w_input, 0)?,
                outputs: Tensor::stack(&outputs, 0)?,
                beta: beta.clone(),
                tau: tau.clone(),
            })
        })();
        match built {
            Ok(p) => planned.push((lin.name.clone(), Arc::new(PerfusionAdapter::new(p)))),
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let attached: Vec<Arc<dyn Adapter>> = planned.iter().map(|(_, a)| a.clone()).collect();
    unet.visit_projections(&mut |p| {
        let Projection::Linear(lin) = p else { return };
        if let Some((_, a)) = planned.iter().find(|(n, _)| *n == lin.name) {
            lin.adapters.push(ScaledAdapter {
                adapter: a.clone(),
                scale: 1.0,
            });
        }
    });
    Ok(attached)
}

/// Removes previously attached adapters (by identity) from every projection of `model`.
pub fn detach_adapters(model: &mut dyn VisitProjections, adapters: &[Arc<dyn Adapter>]) {
    if adapters.is_empty() {
        return;
    }
    model.visit_projections(&mut |p| {
        let list = match p {
            Projection::Linear(l) => &mut l.adapters,
            Projection::Conv2d(c) => &mut c.adapters,
        };
        list.retain(|a| !adapters.iter().any(|x| Arc::ptr_eq(&a.adapter, x)));
    });
}

/// The concept's Perfusion edit with the gate overridden where asked.
pub fn with_gate(concept: &Concept, beta: Option<f64>, tau: Option<f64>) -> Option<PerfusionEdit> {
    concept.perfusion.clone().map(|mut p| {
        if let Some(b) = beta {
            p.beta = b;
        }
        if let Some(t) = tau {
            p.tau = t;
        }
        p
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn solve_inverts_a_small_system() {
        let g = vec![vec![4.0, 1.0], vec![1.0, 3.0]];
        let x = solve(&g, &[vec![1.0], vec![2.0]]).unwrap();
        assert!((x[0][0] - 1.0 / 11.0).abs() < 1e-12);
        assert!((x[1][0] - 7.0 / 11.0).abs() < 1e-12);
        assert!(solve(&[vec![0.0]], &[vec![1.0]]).is_err());
    }

    /// A random `[rows, cols]` f64 tensor.
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        imprint_ops::grad_check::rand_tensor(shape, seed, &Device::Cpu).unwrap()
    }

    /// One concept's gate on a projection `w [out, dim]`: (adapter params, i*, C⁻¹i*, o*).
    fn single(w: &Tensor, beta: f64, tau: f64) -> (GateParams, Tensor, Tensor, Tensor) {
        let dim = w.dim(1).unwrap();
        let i = rand(&[dim], 1);
        // C = A Aᵀ + I, so C⁻¹i* is a solve.
        let a = rand(&[dim, dim], 2);
        let c = (a.matmul(&a.t().unwrap()).unwrap()
            + Tensor::eye(dim, DType::F64, &Device::Cpu).unwrap())
        .unwrap();
        let rows: Vec<Vec<f64>> = c.to_vec2().unwrap();
        let rhs: Vec<Vec<f64>> = i
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(|v| vec![v])
            .collect();
        let cinv: Vec<f64> = solve(&rows, &rhs)
            .unwrap()
            .into_iter()
            .map(|r| r[0])
            .collect();
        let cinv = Tensor::new(cinv, &Device::Cpu).unwrap();
        let o = rand(&[w.dim(0).unwrap()], 3);
        let denom = (&i * &cinv).unwrap().sum_all().unwrap();
        let params = GateParams {
            dual: cinv.broadcast_div(&denom).unwrap().unsqueeze(0).unwrap(),
            w_input: w.matmul(&i.unsqueeze(1).unwrap()).unwrap().t().unwrap(),
            outputs: o.unsqueeze(0).unwrap(),
            beta: Tensor::new(&[beta], &Device::Cpu).unwrap(),
            tau: Tensor::new(&[tau], &Device::Cpu).unwrap(),
        };
        (params, i, cinv, o)
    }

    fn edited(w: &Tensor, params: GateParams, e: &Tensor) -> Tensor {
        let adapter = PerfusionAdapter::new(params);
        (e.matmul(&w.t().unwrap()).unwrap() + adapter.forward(e).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn a_linear_gate_is_the_explicit_rank_one_edit() {
        // With σ((s − β)/τ) replaced by s itself (a linear gate), h(e) = W e + (o* − W i*) s(e) is
        // the rank-one matrix W + (o* − W i*)(C⁻¹i*)ᵀ / (i*ᵀC⁻¹i*) applied to e.
        let w = rand(&[6, 5], 7);
        let (params, i, cinv, o) = single(&w, 0.7, 0.15);
        let e = rand(&[4, 5], 8);
        let s = e.matmul(&params.dual.t().unwrap()).unwrap(); // [4, 1]
        let linear = (e.matmul(&w.t().unwrap()).unwrap()
            + s.matmul(&(params.outputs.clone() - params.w_input.clone()).unwrap())
                .unwrap())
        .unwrap();
        let denom = (&i * &cinv)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let wi = w
            .matmul(&i.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap();
        let edit = (o - wi)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .matmul(&(cinv / denom).unwrap().unsqueeze(0).unwrap())
            .unwrap();
        let matrix = (w + edit).unwrap();
        let explicit = e.matmul(&matrix.t().unwrap()).unwrap();
        assert!(max_diff(&linear, &explicit) < 1e-10);
    }

    #[test]
    fn the_target_input_maps_to_the_gated_target_output() {
        // h(i*) = W·0 + σ((1 − β)/τ) o*: s(i*) = 1, so the projection of i* itself is replaced.
        let w = rand(&[6, 5], 9);
        let (beta, tau) = (0.7, 0.15);
        let (params, i, _, o) = single(&w, beta, tau);
        let h = edited(&w, params, &i.unsqueeze(0).unwrap());
        let gate = 1.0 / (1.0 + (-(1.0 - beta) / tau).exp());
        let want = (o * gate).unwrap().unsqueeze(0).unwrap();
        assert!(max_diff(&h, &want) < 1e-10, "{}", max_diff(&h, &want));
        // A direction C-orthogonal to i* (s = 0) keeps W e, up to the closed gate σ(−β/τ) o*.
        let w2 = rand(&[6, 5], 10);
        let (params, _, cinv, o) = single(&w2, beta, tau);
        let e = rand(&[5], 11);
        let proj = ((&cinv * &e).unwrap().sum_all().unwrap()
            / (&cinv * &cinv).unwrap().sum_all().unwrap())
        .unwrap();
        let e = (e - cinv.broadcast_mul(&proj).unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = edited(&w2, params, &e);
        let closed = 1.0 / (1.0 + (beta / tau).exp());
        let want = (e.matmul(&w2.t().unwrap()).unwrap()
            + (o * closed).unwrap().unsqueeze(0).unwrap())
        .unwrap();
        assert!(max_diff(&h, &want) < 1e-10);
    }

    #[test]
    fn gradients_match_finite_differences() {
        // The trained parts: the text states e (through the word's embedding) and the value
        // target o*; the gate is differentiated through σ.
        let w = rand(&[4, 3], 12);
        let (params, ..) = single(&w, 0.2, 0.5);
        let e = (rand(&[2, 5, 3], 13) * 0.5).unwrap();
        let o = params.outputs.clone();
        imprint_ops::grad_check::check_grads(
            &[e, o],
            |x| {
                let p = GateParams {
                    outputs: x[1].clone(),
                    ..params.clone()
                };
                Ok(PerfusionAdapter::new(p).forward(&x[0])?)
            },
            1e-6,
        )
        .unwrap();
    }

    #[test]
    fn dual_rows_pick_out_each_concept() {
        // Each concept's own target input gives s = 1 for it and 0 for the others (C⁻¹ shared
        // and symmetric, as for concepts of one base model).
        let i = [t(&[1.0, 0.5, 0.0]), t(&[0.2, 1.0, 0.3])];
        let cinv = Tensor::new(
            &[[2.0f32, 0.3, 0.1], [0.3, 1.5, 0.2], [0.1, 0.2, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let c = i.clone().map(|x| {
            cinv.matmul(&x.unsqueeze(1).unwrap())
                .unwrap()
                .squeeze(1)
                .unwrap()
        });
        let dual = dual_rows(&i, &c).unwrap();
        for (k, ik) in i.iter().enumerate() {
            let s = dual
                .matmul(&ik.unsqueeze(1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (j, v) in s.iter().enumerate() {
                let want = if j == k { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-5, "s[{j}] = {v} for concept {k}");
            }
        }
    }
}
