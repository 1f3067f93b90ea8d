//! LyCORIS adapters (KohakuBlueleaf/LyCORIS, `lycoris/modules/*.py`), the weight changes beyond
//! plain LoRA that model-sharing sites are full of, read from kohya-prefixed files
//! ([`crate::formats::lycoris`]) and applied to a frozen projection weight `W` at a user scale `m`:
//!
//! - **LoHa** (`hada_w1_a/b`, `hada_w2_a/b`, optional Tucker cores `hada_t1/t2`):
//!   `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r`, `r` = rows of `hada_w1_b`; with Tucker cores each
//!   factor is `Σ t[i,j,h,w] b[j,q] a[i,p]` (the `_a` matrices are then `[r, out]`).
//! - **LoKr** (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, optional `lokr_t2`):
//!   `ΔW = kron(w1, w2) · scale`, `w1` padded with unit dimensions to `w2`'s rank; scale `alpha/r`
//!   with `r` the rows of the decomposed factor's `_b` (`w2_b` when `w2` is decomposed), and 1
//!   when both factors are full.
//! - **(IA)³** (`weight`, `on_input`): `W' = W ⊙ (1 + m·w)` along the output rows (or the input
//!   columns with `on_input`); the bias is untouched.
//! - **Diag-OFT** (`oft_blocks` `[n, b, b]`, `alpha`, optional `rescale`): `Q = B − Bᵀ` per block,
//!   scaled down to Frobenius norm `alpha·out` over all blocks when larger, `R = (I + Q)(I − Q)⁻¹`
//!   (Cayley), `R_m = I + m(R − I)`, and each block of `b` output rows becomes `R_mᵀ W_k`;
//!   `rescale` (`[out, 1, …]`) multiplies the result.
//!
//! Every kind is realised as a dense change `ΔW(m)` of the base weight ([`LycorisModule::delta`]),
//! which generation adds into the weights and `model merge` bakes into the files, as LyCORIS's
//! merged weights do. A missing or zero alpha means `alpha = r`. DoRA (`dora_scale`) is refused.

use crate::lora::flat_name;
use crate::weights::WeightChanges;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use imprint_models::visit::{Projection, VisitProjections};
use std::collections::HashMap;

/// A low-rank factor `a · b` or a full matrix.
#[derive(Clone, Debug)]
pub enum Factor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
}

/// One LyCORIS module's tensors (f32, CPU).
#[derive(Clone, Debug)]
pub enum LycorisKind {
    LoHa {
        w1_a: Tensor,
        w1_b: Tensor,
        w2_a: Tensor,
        w2_b: Tensor,
        /// Tucker cores `[r, r, kh, kw]` (convolutions).
        t1: Option<Tensor>,
        t2: Option<Tensor>,
        alpha: Option<f64>,
    },
    LoKr {
        w1: Factor,
        w2: Factor,
        /// Tucker core of `w2` `[r, r, kh, kw]` (its `_a` is then `[r, b]`).
        t2: Option<Tensor>,
        alpha: Option<f64>,
    },
    Ia3 {
        weight: Tensor,
        on_input: bool,
    },
    DiagOft {
        blocks: Tensor,
        alpha: f64,
        rescale: Option<Tensor>,
    },
}

/// A LyCORIS module on one projection.
#[derive(Clone, Debug)]
pub struct LycorisModule {
    /// `unet`, `text_encoder`.
    pub network: String,
    /// The reference's module path, as for LoRA.
    pub module: String,
    pub kind: LycorisKind,
}

fn f64_cpu(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
}

/// `Σ_{i,j} t[i,j,h,w] · b[j,q] · a[i,p]` → `[p, q, h, w]` (LyCORIS's `"i j ..., j r, i p -> p r ..."`).
fn tucker(t: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let (ra, p) = a.dims2()?;
    let (rb, q) = b.dims2()?;
    if ra != r1 || rb != r2 {
        bail!(
            "Tucker core {:?} does not fit factors {:?} and {:?}",
            t.dims(),
            a.dims(),
            b.dims()
        )
    }
    // [h, w, i, j] · b[j, q] → [h, w, i, q]; then aᵀ[p, i] · … → [h, w, p, q].
    let tt = t.permute((2, 3, 0, 1))?.reshape((kh * kw * r1, r2))?;
    let x = tt.matmul(b)?.reshape((kh * kw, r1, q))?;
    let at = a.t()?.contiguous()?.unsqueeze(0)?.repeat((kh * kw, 1, 1))?;
    let y = at.matmul(&x)?; // [hw, p, q]
    Ok(y.reshape((kh, kw, p, q))?
        .permute((2, 3, 0, 1))?
        .contiguous()?)
}

/// `kron(a, b)` for tensors of equal rank (2 or 4).
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (a.dims(), b.dims()) {
        (&[a0, a1], &[b0, b1]) => {
            let x = a
                .reshape((a0, 1, a1, 1))?
                .broadcast_mul(&b.reshape((1, b0, 1, b1))?)?;
            Ok(x.reshape((a0 * b0, a1 * b1))?)
        }
        (&[a0, a1, a2, a3], &[b0, b1, b2, b3]) => {
            let x = a
                .reshape(vec![a0, 1, a1, 1, a2, 1, a3, 1])?
                .broadcast_mul(&b.reshape(vec![1, b0, 1, b1, 1, b2, 1, b3])?)?;
            Ok(x.reshape((a0 * b0, a1 * b1, a2 * b2, a3 * b3))?)
        }
        (x, y) => bail!("kron of tensors of shapes {x:?} and {y:?}"),
    }
}

/// A factor's tensors: the full matrix, or its two low-rank halves.
fn factor_tensors(f: &Factor) -> Vec<&Tensor> {
    match f {
        Factor::Full(t) => vec![t],
        Factor::LowRank { a, b } => vec![a, b],
    }
}

/// `alpha / r`, a missing or zero alpha meaning `alpha = r` (LyCORIS's rule).
fn alpha_over_rank(alpha: Option<f64>, r: usize) -> f64 {
    alpha.filter(|a| *a != 0.0).unwrap_or(r as f64) / r as f64
}

/// `(I − Q)⁻¹` for small square blocks, by Gauss–Jordan (f64).
fn inverse(m: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let n = m.len();
    let identity: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    crate::perfusion::solve(m, &identity)
}

impl LycorisModule {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            LycorisKind::LoHa { .. } => "loha",
            LycorisKind::LoKr { .. } => "lokr",
            LycorisKind::Ia3 { .. } => "ia3",
            LycorisKind::DiagOft { .. } => "diag-oft",
        }
    }

    /// Every tensor the module holds.
    pub fn tensors(&self) -> Vec<&Tensor> {
        match &self.kind {
            LycorisKind::LoHa {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                t1,
                t2,
                ..
            } => [w1_a, w1_b, w2_a, w2_b]
                .into_iter()
                .chain(t1)
                .chain(t2)
                .collect(),
            LycorisKind::LoKr { w1, w2, t2, .. } => factor_tensors(w1)
                .into_iter()
                .chain(factor_tensors(w2))
                .chain(t2)
                .collect(),
            LycorisKind::Ia3 { weight, .. } => vec![weight],
            LycorisKind::DiagOft {
                blocks, rescale, ..
            } => std::iter::once(blocks).chain(rescale).collect(),
        }
    }

    /// How many numbers the module holds.
    pub fn parameter_count(&self) -> usize {
        self.tensors().iter().map(|t| t.elem_count()).sum()
    }

    /// The change of `base` (`[out, in]` or `[out, in, kh, kw]`) at multiplier `m`, in `base`'s
    /// shape, f32 on the CPU. Errors name the module when shapes do not fit.
    pub fn delta(&self, base: &Tensor, m: f64) -> Result<Tensor> {
        self.delta_f64(base, m)
            .and_then(|d| Ok(d.to_dtype(DType::F32)?))
            .with_context(|| format!("LyCORIS {} module '{}'", self.type_name(), self.module))
    }

    fn delta_f64(&self, base: &Tensor, m: f64) -> Result<Tensor> {
        let shape = base.dims().to_vec();
        let w = f64_cpu(base)?;
        let fit = |d: Tensor| -> Result<Tensor> {
            if d.elem_count() != w.elem_count() {
                bail!(
                    "its change has shape {:?}, the layer's weight {shape:?}: is it for another architecture?",
                    d.dims()
                )
            }
            Ok(d.reshape(shape.as_slice())?)
        };
        match &self.kind {
            LycorisKind::LoHa {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                t1,
                t2,
                alpha,
            } => {
                let (w1_a, w1_b, w2_a, w2_b) = (
                    f64_cpu(w1_a)?,
                    f64_cpu(w1_b)?,
                    f64_cpu(w2_a)?,
                    f64_cpu(w2_b)?,
                );
                let scale = alpha_over_rank(*alpha, w1_b.dim(0)?);
                let prod = match (t1, t2) {
                    (Some(t1), Some(t2)) => {
                        (tucker(&f64_cpu(t1)?, &w1_a, &w1_b)?
                            * tucker(&f64_cpu(t2)?, &w2_a, &w2_b)?)?
                    }
                    (None, None) => (w1_a.matmul(&w1_b)? * w2_a.matmul(&w2_b)?)?,
                    _ => bail!("has one Tucker core of hada_t1/hada_t2 but not the other"),
                };
                Ok((fit(prod)? * (scale * m))?)
            }
            LycorisKind::LoKr { w1, w2, t2, alpha } => {
                let (w1m, r1) = match w1 {
                    Factor::Full(t) => (f64_cpu(t)?, None),
                    Factor::LowRank { a, b } => {
                        (f64_cpu(a)?.matmul(&f64_cpu(b)?)?, Some(b.dim(0)?))
                    }
                };
                let (w2m, r2) = match (w2, t2) {
                    (Factor::Full(t), None) => (f64_cpu(t)?, None),
                    (Factor::LowRank { a, b }, Some(t)) => (
                        tucker(&f64_cpu(t)?, &f64_cpu(a)?, &f64_cpu(b)?)?,
                        Some(b.dim(0)?),
                    ),
                    (Factor::LowRank { a, b }, None) => {
                        (f64_cpu(a)?.matmul(&f64_cpu(b)?)?, Some(b.dim(0)?))
                    }
                    (Factor::Full(_), Some(_)) => bail!("lokr_t2 with a full lokr_w2"),
                };
                let scale = r2.or(r1).map_or(1.0, |r| alpha_over_rank(*alpha, r));
                let w1m = match (w1m.rank(), w2m.rank()) {
                    (2, 4) => w1m.unsqueeze(2)?.unsqueeze(3)?,
                    _ => w1m,
                };
                Ok((fit(kron(&w1m, &w2m)?)? * (scale * m))?)
            }
            LycorisKind::Ia3 { weight, on_input } => {
                let v = f64_cpu(weight)?.flatten_all()?;
                let axis = usize::from(*on_input);
                let n = shape.get(axis).copied().unwrap_or(0);
                if v.dim(0)? != n {
                    bail!(
                        "(IA)³ vector of {} values for a weight {shape:?} (on_input = {on_input})",
                        v.dim(0)?
                    )
                }
                let mut view = vec![1; shape.len()];
                view[axis] = n;
                Ok(w.broadcast_mul(&(v.reshape(view)? * m)?)?)
            }
            LycorisKind::DiagOft {
                blocks,
                alpha,
                rescale,
            } => {
                let (n, b, b2) = blocks.dims3()?;
                let out = shape[0];
                if b != b2 || n * b != out {
                    bail!(
                        "oft_blocks {:?} do not split the {out} output rows into square blocks",
                        blocks.dims()
                    )
                }
                let bl = f64_cpu(blocks)?;
                let q = (&bl - bl.transpose(1, 2)?)?;
                let norm = q.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
                let constraint = alpha * out as f64;
                let q = if constraint > 0.0 && norm > constraint {
                    (q * (constraint / (norm + 1e-8)))?
                } else {
                    q
                };
                // R = (I + Q)(I − Q)⁻¹ per block; R_m = I + m (R − I).
                let qv: Vec<Vec<Vec<f64>>> = q.to_vec3()?;
                let mut rm = Vec::with_capacity(n * b * b);
                for blk in &qv {
                    let minus: Vec<Vec<f64>> = (0..b)
                        .map(|i| {
                            (0..b)
                                .map(|j| f64::from(u8::from(i == j)) - blk[i][j])
                                .collect()
                        })
                        .collect();
                    let inv = inverse(&minus)?;
                    for i in 0..b {
                        for j in 0..b {
                            let plus_ik = |k: usize| f64::from(u8::from(i == k)) + blk[i][k];
                            let r: f64 = (0..b).map(|k| plus_ik(k) * inv[k][j]).sum();
                            let eye = f64::from(u8::from(i == j));
                            rm.push(eye + m * (r - eye));
                        }
                    }
                }
                let rm = Tensor::from_vec(rm, (n, b, b), &Device::Cpu)?;
                let rest = w.elem_count() / out;
                // W'_k = R_mᵀ W_k on each block of b output rows.
                let wk = w.reshape((n, b, rest))?;
                let mut new = rm
                    .transpose(1, 2)?
                    .contiguous()?
                    .matmul(&wk)?
                    .reshape(shape.as_slice())?;
                if let Some(s) = rescale {
                    let s = f64_cpu(s)?;
                    if s.dim(0)? != out || s.elem_count() != out {
                        bail!(
                            "rescale {:?} does not have one value per output row",
                            s.dims()
                        )
                    }
                    let mut view = vec![1; shape.len()];
                    view[0] = out;
                    new = new.broadcast_mul(&s.reshape(view)?)?;
                }
                Ok((new - w)?)
            }
        }
    }
}

/// Computes the change of every module of `modules` on `network` (at multiplier `scale`) for
/// the matching projection of `model`, matched by kohya's flat names as LoRA is. A module that is
/// none of the model's projections, or whose shapes do not fit, is an error naming it; nothing
/// changes until [`WeightChanges::apply`].
pub fn prepare_lycoris(
    model: &mut dyn VisitProjections,
    network: &str,
    modules: &[LycorisModule],
    scale: f64,
) -> Result<WeightChanges> {
    let mut changes = WeightChanges::default();
    let mine: Vec<&LycorisModule> = modules.iter().filter(|m| m.network == network).collect();
    if mine.is_empty() {
        return Ok(changes);
    }
    let mut weights: HashMap<String, (String, Tensor)> = HashMap::new();
    model.visit_projections(&mut |p| {
        let (name, w) = match &p {
            Projection::Linear(l) => (l.name.clone(), l.weight.clone()),
            Projection::Conv2d(c) => (c.name.clone(), c.weight.clone()),
        };
        weights.insert(flat_name(&name), (name, w));
    });
    for m in mine {
        let Some((name, w)) = weights.get(&flat_name(&m.module)) else {
            bail!("LyCORIS module '{}' is not a projection of this {network}: is it for another architecture?", m.module)
        };
        changes.add(name, m.delta(w, scale)?, None)?;
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dims: &[usize], seed: u64) -> Tensor {
        imprint_ops::grad_check::rand_tensor(dims, seed, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    fn module(kind: LycorisKind) -> LycorisModule {
        LycorisModule {
            network: "unet".into(),
            module: "m".into(),
            kind,
        }
    }

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn kron_matches_its_definition() {
        let a = t(&[2, 3], 1);
        let b = t(&[4, 5], 2);
        let k = kron(&a, &b).unwrap();
        let (av, bv, kv): (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>) = (
            a.to_vec2().unwrap(),
            b.to_vec2().unwrap(),
            k.to_vec2().unwrap(),
        );
        for i in 0..2 {
            for j in 0..4 {
                for l in 0..3 {
                    for n in 0..5 {
                        assert_eq!(kv[i * 4 + j][l * 5 + n], av[i][l] * bv[j][n]);
                    }
                }
            }
        }
    }

    #[test]
    fn tucker_matches_its_definition() {
        let core = t(&[2, 3, 2, 2], 3);
        let a = t(&[2, 5], 4);
        let b = t(&[3, 4], 5);
        let y = tucker(&core, &a, &b).unwrap();
        assert_eq!(y.dims(), &[5, 4, 2, 2]);
        let (c, av, bv) = (
            core.to_dtype(DType::F64).unwrap(),
            a.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
            b.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
        );
        let cv: Vec<Vec<Vec<Vec<f64>>>> = (0..2)
            .map(|i| {
                (0..3)
                    .map(|j| c.get(i).unwrap().get(j).unwrap().to_vec2().unwrap())
                    .collect()
            })
            .collect();
        let yv = y.to_dtype(DType::F64).unwrap();
        for p in 0..5 {
            for q in 0..4 {
                let got: Vec<Vec<f64>> = yv.get(p).unwrap().get(q).unwrap().to_vec2().unwrap();
                for h in 0..2 {
                    for w in 0..2 {
                        let want: f64 = (0..2)
                            .flat_map(|i| (0..3).map(move |j| (i, j)))
                            .map(|(i, j)| cv[i][j][h][w] * bv[j][q] * av[i][p])
                            .sum();
                        assert!((got[h][w] - want).abs() < 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn ia3_scales_rows_and_oft_is_a_rotation() {
        let w = t(&[4, 3], 6);
        let v = t(&[4], 7);
        let d = module(LycorisKind::Ia3 {
            weight: v.clone(),
            on_input: false,
        })
        .delta(&w, 0.5)
        .unwrap();
        let want = w
            .broadcast_mul(&(v * 0.5).unwrap().unsqueeze(1).unwrap())
            .unwrap();
        assert!(close(&d, &want) < 1e-6);
        // Diag-OFT keeps each block's column norms (R is orthogonal) and is the identity at m = 0.
        let blocks = (t(&[2, 2, 2], 8) * 0.3).unwrap();
        let oft = module(LycorisKind::DiagOft {
            blocks,
            alpha: 0.0,
            rescale: None,
        });
        let new = (oft.delta(&w, 1.0).unwrap() + &w).unwrap();
        let norms = |x: &Tensor| x.reshape((2, 2, 3)).unwrap().sqr().unwrap().sum(1).unwrap();
        assert!(close(&norms(&new), &norms(&w)) < 1e-5);
        assert!(close(&oft.delta(&w, 0.0).unwrap(), &w.zeros_like().unwrap()) < 1e-7);
    }
}
