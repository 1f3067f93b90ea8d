//! Custom Diffusion's closed-form merge of several fine-tuned concepts (Kumari et al. 2023, §3.3;
//! the authors' `src/composenW.py`, `gdupdateWexact`).
//!
//! For every cross-attention key and value projection, with `W₀` the base weight, the merged
//! weight solves
//!
//! ```text
//! min_W ‖W C_regᵀ − W₀ C_regᵀ‖_F   subject to   W C_tgtᵀ = V_tgt
//! ```
//!
//! where the rows of `C_reg` are text features of regularization captions (the change must not
//! move them) and the rows of `C_tgt` are the features of each concept's own captions, `V_tgt`
//! their projections through that concept's fine-tuned weight. With `C = C_regᵀ C_reg` and
//! `d = C_tgt C⁻¹`: `W = W₀ + (V_tgt − W₀ C_tgtᵀ)(d C_tgtᵀ)⁻¹ d` (`V_tgt` as `[out, n]`).
//!
//! Features are the text encoder's outputs from the first word through the end token (the
//! start token left out, as the authors do); duplicated target rows are dropped.

use crate::apply::{apply_textual_inversion, expand_prompt};
use crate::perfusion::solve;
use crate::{Concept, ProjectionWeights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::clip::ClipTextTransformer;
use imprint_models::tokenizer::ClipTokenizer;
use imprint_models::unet::UNet2DConditionModel;
use imprint_models::visit::{Projection, VisitProjections};
use std::collections::HashMap;

/// A dense f64 matrix, row-major.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(Self { rows, cols, data })
    }

    pub fn to_tensor(&self) -> Result<Tensor> {
        let v: Vec<f32> = self.data.iter().map(|x| *x as f32).collect();
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    fn to_rows(&self) -> Vec<Vec<f64>> {
        (0..self.rows).map(|i| self.row(i).to_vec()).collect()
    }

    fn from_rows(rows: Vec<Vec<f64>>) -> Self {
        let cols = rows.first().map_or(0, Vec::len);
        Self {
            rows: rows.len(),
            cols,
            data: rows.into_iter().flatten().collect(),
        }
    }

    /// `self · otherᵀ`.
    pub fn mul_t(&self, other: &Matrix) -> Matrix {
        let mut data = vec![0f64; self.rows * other.rows];
        for i in 0..self.rows {
            for j in 0..other.rows {
                data[i * other.rows + j] = self
                    .row(i)
                    .iter()
                    .zip(other.row(j))
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        Matrix {
            rows: self.rows,
            cols: other.rows,
            data,
        }
    }

    fn transpose(&self) -> Matrix {
        let mut data = vec![0f64; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }
}

/// The merged weight for one projection: `w0 [out, d]`, `c_reg [m, d]`, `c_tgt [n, d]`,
/// `v_tgt [n, out]` (rows: each target feature's fine-tuned projection).
pub fn merge_projection(
    w0: &Matrix,
    c_reg: &Matrix,
    c_tgt: &Matrix,
    v_tgt: &Matrix,
) -> Result<Matrix> {
    merge_with_dual(w0, &target_dual(c_reg, c_tgt)?, c_tgt, v_tgt)
}

/// `d = C_tgt C⁻¹` `[n, d]` with `C = C_regᵀ C_reg`: the part every projection shares.
pub fn target_dual(c_reg: &Matrix, c_tgt: &Matrix) -> Result<Matrix> {
    if c_reg.cols != c_tgt.cols {
        bail!("closed-form merge: shapes do not agree")
    }
    // C symmetric: solve C X = C_tgtᵀ, d = Xᵀ.
    let c = c_reg.transpose().mul_t(&c_reg.transpose());
    let x = solve(&c.to_rows(), &c_tgt.transpose().to_rows())
        .context("the regularization features' covariance is singular: give more captions")?;
    Ok(Matrix::from_rows(x).transpose())
}

/// [`merge_projection`] with `d` from [`target_dual`].
pub fn merge_with_dual(w0: &Matrix, dm: &Matrix, c_tgt: &Matrix, v_tgt: &Matrix) -> Result<Matrix> {
    let d = w0.cols;
    if dm.cols != d || c_tgt.cols != d || v_tgt.cols != w0.rows || v_tgt.rows != c_tgt.rows {
        bail!("closed-form merge: shapes do not agree")
    }
    let a = dm.mul_t(c_tgt); // d C_tgtᵀ [n, n]
                             // (V_tgt − W₀ C_tgtᵀ) as [out, n].
    let wc = w0.mul_t(c_tgt);
    let mut r = v_tgt.transpose();
    r.data.iter_mut().zip(&wc.data).for_each(|(v, w)| *v -= w);
    // X A = R  ⇔  Aᵀ Xᵀ = Rᵀ.
    let xt = solve(&a.transpose().to_rows(), &r.transpose().to_rows())
        .context("the concepts' target features are linearly dependent")?;
    let x = Matrix::from_rows(xt).transpose(); // [out, n]
    let update = x.mul_t(&dm.transpose()); // x · d: [out, d]
    let mut w = w0.clone();
    w.data
        .iter_mut()
        .zip(&update.data)
        .for_each(|(a, b)| *a += b);
    Ok(w)
}

/// `max |W C_tgtᵀ − V_tgtᵀ| / max(1, max |V_tgt|)`: how well the merged weight keeps every
/// concept's target outputs.
pub fn constraint_residual(w: &Matrix, c_tgt: &Matrix, v_tgt: &Matrix) -> f64 {
    let got = w.mul_t(c_tgt).transpose(); // [n, out]
    let scale = v_tgt.data.iter().fold(1f64, |m, x| m.max(x.abs()));
    got.data
        .iter()
        .zip(&v_tgt.data)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// Text features `[rows, d]` of captions: the encoder's outputs from the first word through the
/// end token of each.
fn features(
    tokenizer: &ClipTokenizer,
    te: &ClipTextTransformer,
    captions: &[String],
    applied: &[(String, usize)],
) -> Result<Matrix> {
    let mut rows: Vec<Vec<f64>> = vec![];
    for caption in captions {
        let prompt = expand_prompt(caption, applied);
        let ids = tokenizer.encode(&prompt)?;
        let words = tokenizer.encode_unpadded(&prompt)?.len();
        let t = Tensor::from_vec(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            (1, ids.len()),
            te.device(),
        )?;
        let states = te.forward(&t, 0)?.last_hidden_state.get(0)?;
        // Positions 1 ..= the end token (the unpadded length includes start and end).
        let end = words.min(ids.len()) - 1;
        let m = Matrix::from_tensor(&states.narrow(0, 1, end)?)?;
        for i in 0..m.rows {
            let r = m.row(i).to_vec();
            if !rows.contains(&r) {
                rows.push(r);
            }
        }
    }
    Ok(Matrix::from_rows(rows))
}

/// What [`merge_concepts`] made: the merged concept and the worst constraint residual.
pub struct Merged {
    pub concept: Concept,
    pub residual: f64,
    pub layers: usize,
}

/// Merges Custom Diffusion concepts (their words and K/V weights) into one, on the base model
/// whose tokenizer, text encoder and UNet are given (the tokenizer and text encoder get every
/// concept's words). `regularization` are the captions whose features must not move.
pub fn merge_concepts(
    tokenizer: &mut ClipTokenizer,
    te: &mut ClipTextTransformer,
    unet: &mut UNet2DConditionModel,
    concepts: &[Concept],
    regularization: &[String],
) -> Result<Merged> {
    if concepts.len() < 2 {
        bail!("give at least two Custom Diffusion concepts to merge")
    }
    let mut applied: Vec<(String, usize)> = vec![];
    let mut words: Vec<Vec<String>> = vec![];
    for c in concepts {
        if c.projections.is_empty() && c.lora.is_empty() {
            bail!(
                "concept '{}' is not a Custom Diffusion concept (it holds no projection weights)",
                c.trigger
            )
        }
        let mut mine = vec![];
        let mut all = vec![(
            c.trigger.clone(),
            c.embedding(crate::TEXT_ENCODER).map(|e| e.vectors.clone()),
        )];
        all.extend(
            c.extra_tokens
                .iter()
                .map(|(t, v)| (t.clone(), Some(v.clone()))),
        );
        for (t, v) in all {
            let Some(v) = v else { continue };
            let n =
                apply_textual_inversion(tokenizer, te, &Concept::textual_inversion(&t, v)?, 1.0)
                    .with_context(|| format!("concept '{}'", c.trigger))?
                    .len();
            applied.push((t.clone(), n));
            mine.push(t);
        }
        words.push(mine);
    }
    let c_reg = features(tokenizer, te, regularization, &applied)?;
    let mut targets: Vec<Matrix> = vec![];
    for (c, mine) in concepts.iter().zip(&words) {
        let mut captions = vec![];
        for w in mine {
            captions.push(w.clone());
            captions.push(format!("a photo of {w}"));
        }
        if let Some(p) = c.metadata.get("instance_prompt") {
            captions.push(p.clone());
        }
        targets.push(features(tokenizer, te, &captions, &applied)?);
    }
    // Base weights of every module some concept changes.
    let mut base: HashMap<String, Tensor> = HashMap::new();
    unet.visit_projections(&mut |p| {
        if let Projection::Linear(l) = p {
            base.insert(l.name.clone(), l.weight.clone());
        }
    });
    // Each concept's change of each module: whole weights, changes, or (`--rank`) LoRA pairs.
    let mut modules: Vec<String> = vec![];
    for c in concepts {
        let names = c
            .projections
            .iter()
            .map(|p| (&p.network, &p.module))
            .chain(c.lora.modules.iter().map(|m| (&m.network, &m.module)));
        for (network, module) in names {
            if network != crate::UNET {
                bail!("'{module}': only UNet projections can be merged")
            }
            if !modules.contains(module) {
                modules.push(module.clone());
            }
        }
    }
    // The target features are the same for every module: stack them once (a feature two
    // concepts share, such as a common prefix "a photo of", is constrained once, by the first
    // concept, as the authors drop duplicates) and solve the shared part once.
    let mut rows: Vec<Vec<f64>> = vec![];
    let mut owner: Vec<(usize, usize)> = vec![];
    for (k, t) in targets.iter().enumerate() {
        for i in 0..t.rows {
            let r = t.row(i).to_vec();
            if !rows.contains(&r) {
                rows.push(r);
                owner.push((k, i));
            }
        }
    }
    let c_tgt = Matrix::from_rows(rows);
    let dm = target_dual(&c_reg, &c_tgt)?;
    let mut merged = vec![];
    let mut residual = 0f64;
    for m in &modules {
        let w0t = base.get(m).with_context(|| {
            format!("'{m}' is not a projection of this UNet (another base model?)")
        })?;
        let w0 = Matrix::from_tensor(&w0t.to_dtype(DType::F32)?)?;
        let mut fine_tuned = vec![];
        for c in concepts {
            let mut w = w0.clone();
            let mut add = |d: Matrix, what: &str| -> Result<()> {
                if (d.rows, d.cols) != (w0.rows, w0.cols) {
                    bail!(
                        "'{m}': concept '{}' has a {}×{} {what}, the model {}×{}",
                        c.trigger,
                        d.rows,
                        d.cols,
                        w0.rows,
                        w0.cols
                    )
                }
                w.data.iter_mut().zip(&d.data).for_each(|(a, b)| *a += b);
                Ok(())
            };
            if let Some(p) = c.projections.iter().find(|p| &p.module == m) {
                let mut d = Matrix::from_tensor(&p.weight)?;
                if !p.delta {
                    d.data.iter_mut().zip(&w0.data).for_each(|(a, b)| *a -= b);
                }
                add(d, "weight")?;
            }
            if let Some(l) = c.lora.modules.iter().find(|l| &l.module == m) {
                add(Matrix::from_tensor(&l.delta_weight()?)?, "LoRA change")?;
            }
            fine_tuned.push(w);
        }
        let v_rows: Vec<Vec<f64>> = owner
            .iter()
            .map(|&(k, i)| {
                let (x, w) = (&targets[k], &fine_tuned[k]);
                (0..w.rows)
                    .map(|o| x.row(i).iter().zip(w.row(o)).map(|(a, b)| a * b).sum())
                    .collect()
            })
            .collect();
        let v_tgt = Matrix::from_rows(v_rows);
        let w = merge_with_dual(&w0, &dm, &c_tgt, &v_tgt).with_context(|| m.clone())?;
        residual = residual.max(constraint_residual(&w, &c_tgt, &v_tgt));
        merged.push(ProjectionWeights::new(
            crate::UNET,
            m,
            w.to_tensor()?,
            None,
            false,
        )?);
    }
    let first = &concepts[0];
    let mut concept = Concept {
        trigger: first.trigger.clone(),
        method: first.method.clone(),
        embeddings: first.embeddings.clone(),
        projections: merged,
        base_model: first.base_model.clone(),
        ..Default::default()
    };
    concept.extra_tokens = first.extra_tokens.clone();
    for c in &concepts[1..] {
        if let Some(e) = c.embedding(crate::TEXT_ENCODER) {
            concept
                .extra_tokens
                .push((c.trigger.clone(), e.vectors.clone()));
        }
        concept.extra_tokens.extend(c.extra_tokens.iter().cloned());
    }
    concept.metadata.insert(
        "merged_from".into(),
        concepts
            .iter()
            .map(|c| c.trigger.clone())
            .collect::<Vec<_>>()
            .join(","),
    );
    Ok(Merged {
        concept,
        residual,
        layers: modules.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(rows: usize, cols: usize, seed: u64) -> Matrix {
        let t = imprint_ops::grad_check::rand_tensor(&[rows, cols], seed, &Device::Cpu).unwrap();
        Matrix::from_tensor(&t).unwrap()
    }

    #[test]
    fn the_merge_meets_its_constraints_and_stays_near_the_base() {
        let (out, d) = (5, 6);
        let w0 = rand(out, d, 1);
        let c_reg = rand(40, d, 2);
        let c_tgt = rand(3, d, 3);
        let v_tgt = rand(3, out, 4);
        let w = merge_projection(&w0, &c_reg, &c_tgt, &v_tgt).unwrap();
        assert!(constraint_residual(&w, &c_tgt, &v_tgt) < 1e-10);
        // Without constraints to meet (targets already met by W₀) the base is kept.
        let kept = w0.mul_t(&c_tgt).transpose();
        let same = merge_projection(&w0, &c_reg, &c_tgt, &kept).unwrap();
        let diff = same
            .data
            .iter()
            .zip(&w0.data)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-10);
    }
}
