//! Layer norm and group norm with their own backward.
//!
//! Both normalize "rows" (the last dimension for layer norm; `C/G · H · W` elements for group norm)
//! to zero mean and unit variance (biased variance, as PyTorch), then apply a per-feature affine.
//! On CPU in f32/f64 a kernel computes the forward with f64 accumulation; the backward is
//! `∂x = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ γ`, composed from candle ops.

use crate::fastmath::FastExp;
use crate::storage::{cpu_slice, CpuSlice};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;
use num_traits::Float;
use rayon::prelude::*;

/// `torch.nn.GroupNorm` (affine).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    /// The reference's module path (e.g. `down_blocks.0.resnets.0.norm1`).
    pub name: String,
    pub weight: Tensor,
    /// SVDiff's spectral shift of the weight (a one-element tensor, trained): the weight acts as
    /// `γ · relu(‖γ‖ + δ) / ‖γ‖`, the one singular value of a vector shifted.
    pub weight_shift: Option<Tensor>,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || channels % num_groups != 0 {
            bail!(
                "{}: {channels} channels cannot be split into {num_groups} groups",
                vb.prefix()
            )
        }
        Ok(Self {
            name: vb.prefix(),
            weight: vb.get(channels, "weight")?,
            weight_shift: None,
            bias: vb.get(channels, "bias")?,
            num_groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::cast_like(
            &shifted_weight(&self.weight, self.weight_shift.as_ref())?,
            x,
        )?;
        group_norm(
            x,
            &w,
            &crate::cast_like(&self.bias, x)?,
            self.num_groups,
            self.eps,
        )
    }

    /// `silu(self.forward(x))`, fused.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::cast_like(
            &shifted_weight(&self.weight, self.weight_shift.as_ref())?,
            x,
        )?;
        group_norm_silu(
            x,
            &w,
            &crate::cast_like(&self.bias, x)?,
            self.num_groups,
            self.eps,
        )
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        GroupNorm::forward(self, xs)
    }
}

/// SVDiff (Han et al. 2023, §3.1) on a 1-D weight: its SVD has the single singular value ‖γ‖, so
/// the shifted weight is `γ · relu(‖γ‖ + δ) / ‖γ‖`.
pub fn shifted_weight(weight: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
    let Some(delta) = shift else {
        return Ok(weight.clone());
    };
    // In f32 at least: a half-precision weight's norm and the f32 shift meet here.
    let w = match weight.dtype() {
        DType::F16 | DType::BF16 => weight.to_dtype(DType::F32)?,
        _ => weight.clone(),
    };
    let delta = delta.to_dtype(w.dtype())?;
    let norm = w.sqr()?.sum_all()?.sqrt()?;
    if norm.to_dtype(DType::F64)?.to_scalar::<f64>()? == 0.0 {
        // An all-zero weight has no direction to scale.
        return Ok(weight.clone());
    }
    let factor = (norm
        .broadcast_add(&delta.flatten_all()?.sum_all()?)?
        .relu()?
        / norm)?;
    weight.broadcast_mul(&factor.to_dtype(weight.dtype())?)
}

/// `torch.nn.LayerNorm` over the last dimension (affine).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// The reference's module path (e.g. `text_model.final_layer_norm`).
    pub name: String,
    pub weight: Tensor,
    /// SVDiff's spectral shift, as [`GroupNorm::weight_shift`].
    pub weight_shift: Option<Tensor>,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            name: vb.prefix(),
            weight: vb.get(dim, "weight")?,
            weight_shift: None,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = crate::cast_like(
            &shifted_weight(&self.weight, self.weight_shift.as_ref())?,
            x,
        )?;
        layer_norm(x, &w, &crate::cast_like(&self.bias, x)?, self.eps)
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        LayerNorm::forward(self, xs)
    }
}

/// Which rows a norm averages over, and how a row's element maps to its affine parameter.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// Layer norm: rows of length `dim`, parameter index = position in the row.
    Last { dim: usize },
    /// Group norm: `[N, C, S]` with `groups` groups of `C/groups` channels of `S` elements.
    Groups {
        channels: usize,
        groups: usize,
        spatial: usize,
    },
}

impl Rows {
    fn row_len(&self) -> usize {
        match *self {
            Rows::Last { dim } => dim,
            Rows::Groups {
                channels,
                groups,
                spatial,
            } => channels / groups * spatial,
        }
    }
}

struct NormOp {
    rows: Rows,
    eps: f64,
    /// Apply SiLU to the normalized output in the same pass (group norm + SiLU, as every UNet
    /// and VAE resnet does), saving a full read/write of the activation and its buffer.
    silu: bool,
}

fn norm_kernel<T: Float + FastExp + Send + Sync>(
    x: &[T],
    w: &[T],
    b: &[T],
    rows: Rows,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    let len = rows.row_len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each(|(r, (o, row))| {
            let n = row.len() as f64;
            let mean = row.iter().map(|v| v.to_f64().unwrap()).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|v| (v.to_f64().unwrap() - mean).powi(2))
                .sum::<f64>()
                / n;
            let rstd = 1.0 / (var + eps).sqrt();
            let (mean, rstd) = (T::from(mean).unwrap(), T::from(rstd).unwrap());
            match rows {
                Rows::Last { .. } => {
                    for j in 0..row.len() {
                        o[j] = (row[j] - mean) * rstd * w[j] + b[j];
                    }
                }
                Rows::Groups {
                    channels,
                    groups,
                    spatial,
                } => {
                    let cpg = channels / groups;
                    let c0 = (r % groups) * cpg;
                    for c in 0..cpg {
                        let (wc, bc) = (w[c0 + c] * rstd, b[c0 + c]);
                        for s in c * spatial..(c + 1) * spatial {
                            o[s] = (row[s] - mean) * wc + bc;
                        }
                    }
                }
            }
            if silu {
                // z · σ(z) = z / (1 + e^{−z}), on the row while it is in cache.
                for v in o.iter_mut() {
                    *v = *v / (T::one() + (-*v).fast_exp());
                }
            }
        });
    out
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "imprint-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (cpu_slice(sx, lx)?, cpu_slice(sw, lw)?, cpu_slice(sb, lb)?) {
            (CpuSlice::F32(x), CpuSlice::F32(w), CpuSlice::F32(b)) => {
                CpuStorage::F32(norm_kernel(x, w, b, self.rows, self.eps, self.silu))
            }
            (CpuSlice::F64(x), CpuSlice::F64(w), CpuSlice::F64(b)) => {
                CpuStorage::F64(norm_kernel(x, w, b, self.rows, self.eps, self.silu))
            }
            _ => bail!("norm: input and affine parameters must share a dtype"),
        };
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (groups, spatial) = match self.rows {
            Rows::Last { .. } => (1, 1),
            Rows::Groups {
                groups, spatial, ..
            } => (groups, spatial),
        };
        let y = crate::cuda::norm_fwd(
            (sx, lx),
            (sw, lw),
            (sb, lb),
            self.rows.row_len(),
            groups,
            spatial,
            self.eps,
            self.silu,
        )?;
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if matches!(x.dtype(), DType::F16 | DType::BF16) {
            use crate::upcast_half as up;
            let (dx, dw, db) = self.bwd(&up(x)?, &up(w)?, &up(b)?, _res, &up(grad)?)?;
            let down =
                |g: Option<Tensor>, like: &Tensor| g.map(|g| g.to_dtype(like.dtype())).transpose();
            return Ok((down(dx, x)?, down(dw, w)?, down(db, b)?));
        }
        if !self.silu {
            return norm_backward(x, w, b, grad, self.rows, self.eps);
        }
        // Through SiLU first: d/dz [z σ(z)] = σ(z) (1 + z (1 − σ(z))), with z the normalized,
        // affine-transformed input recomputed here.
        let z = norm_composed(&x.detach(), &w.detach(), &b.detach(), self.rows, self.eps)?;
        let s = candle_nn::ops::sigmoid(&z)?;
        let dz = ((z * (1.0 - &s)?)? + 1.0)?.mul(&s)?;
        norm_backward(x, w, b, &grad.mul(&dz)?, self.rows, self.eps)
    }
}

/// Shapes `x` into `[rows, row_len]` and a per-channel parameter into something broadcastable
/// against `x`'s own shape.
fn param_view(p: &Tensor, x: &Tensor, rows: Rows) -> Result<Tensor> {
    match rows {
        Rows::Last { .. } => Ok(p.clone()),
        Rows::Groups { channels, .. } => {
            let mut shape = vec![1usize; x.rank()];
            shape[1] = channels;
            p.reshape(shape)
        }
    }
}

fn norm_backward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    rows: Rows,
    eps: f64,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let len = rows.row_len();
    let n_rows = x.elem_count() / len;
    let xr = x.reshape((n_rows, len))?;
    let mean = xr.mean_keepdim(1)?;
    let centered = xr.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = centered.broadcast_mul(&rstd)?; // [rows, len]
    let gamma = param_view(w, x, rows)?;
    let ghat = grad.broadcast_mul(&gamma)?.reshape((n_rows, len))?;
    let m1 = ghat.mean_keepdim(1)?;
    let m2 = (&ghat * &xhat)?.mean_keepdim(1)?;
    let dx = ghat
        .broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?
        .reshape(x.shape())?;
    // Affine gradients: sum of g (⊙ x̂) over everything but the feature axis.
    let reduce = |t: &Tensor| -> Result<Tensor> {
        match rows {
            Rows::Last { dim } => t.reshape(((), dim))?.sum(0),
            Rows::Groups { channels, .. } => {
                let n = t.dim(0)?;
                t.reshape((n, channels, ()))?.sum(2)?.sum(0)
            }
        }
    };
    let dw = if w.track_op() {
        Some(reduce(&(grad * xhat.reshape(x.shape())?)?)?)
    } else {
        None
    };
    let db = if b.track_op() {
        Some(reduce(grad)?)
    } else {
        None
    };
    Ok((Some(dx), dw, db))
}

fn use_kernel(x: &Tensor) -> bool {
    (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) || crate::cuda_kernel(x)
}

/// Composed (autograd-differentiable) normalization, for devices without a kernel here.
fn norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, rows: Rows, eps: f64) -> Result<Tensor> {
    let len = rows.row_len();
    let xr = x.reshape((x.elem_count() / len, len))?;
    let (xr, upcast) = match xr.dtype() {
        DType::F16 | DType::BF16 => (xr.to_dtype(DType::F32)?, true),
        _ => (xr, false),
    };
    let centered = xr.broadcast_sub(&xr.mean_keepdim(1)?)?;
    let var = centered.sqr()?.mean_keepdim(1)?;
    let xhat = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let xhat = if upcast {
        xhat.to_dtype(x.dtype())?
    } else {
        xhat
    }
    .reshape(x.shape())?;
    xhat.broadcast_mul(&param_view(w, x, rows)?)?
        .broadcast_add(&param_view(b, x, rows)?)
}

/// Layer norm over the last dimension of `x`, with affine `weight`/`bias` of that size.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    let rows = Rows::Last { dim };
    if use_kernel(x) {
        x.contiguous()?.apply_op3(
            weight,
            bias,
            NormOp {
                rows,
                eps,
                silu: false,
            },
        )
    } else {
        norm_composed(x, weight, bias, rows, eps)
    }
}

/// Group norm of `x [N, C, ...]` with `num_groups` groups and per-channel affine parameters.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    group_norm_impl(x, weight, bias, num_groups, eps, false)
}

/// `silu(group_norm(x))` in one pass, with its own backward.
pub fn group_norm_silu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
) -> Result<Tensor> {
    group_norm_impl(x, weight, bias, num_groups, eps, true)
}

fn group_norm_impl(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    num_groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.rank() < 2 {
        bail!("group_norm: expected [N, C, ...], got {:?}", x.dims())
    }
    let (n, channels) = (x.dim(0)?, x.dim(1)?);
    if num_groups == 0 || channels % num_groups != 0 {
        bail!("group_norm: {channels} channels cannot be split into {num_groups} groups")
    }
    let spatial = x.elem_count() / (n * channels).max(1);
    let rows = Rows::Groups {
        channels,
        groups: num_groups,
        spatial,
    };
    if use_kernel(x) {
        x.contiguous()?
            .apply_op3(weight, bias, NormOp { rows, eps, silu })
    } else {
        let y = norm_composed(x, weight, bias, rows, eps)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_grads, rand_tensor};
    use candle_core::Device;

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
    fn layer_norm_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[2, 3, 6], 1, &dev)?;
        let w = rand_tensor(&[6], 2, &dev)?;
        let b = rand_tensor(&[6], 3, &dev)?;
        let rows = Rows::Last { dim: 6 };
        assert!(
            max_diff(
                &layer_norm(&x, &w, &b, 1e-5)?,
                &norm_composed(&x, &w, &b, rows, 1e-5)?
            ) < 1e-12
        );
        check_grads(&[x, w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5), 1e-6)
    }

    #[test]
    fn group_norm_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[2, 4, 3, 2], 4, &dev)?;
        let w = rand_tensor(&[4], 5, &dev)?;
        let b = rand_tensor(&[4], 6, &dev)?;
        let rows = Rows::Groups {
            channels: 4,
            groups: 2,
            spatial: 6,
        };
        assert!(
            max_diff(
                &group_norm(&x, &w, &b, 2, 1e-6)?,
                &norm_composed(&x, &w, &b, rows, 1e-6)?
            ) < 1e-12
        );
        check_grads(
            &[x, w, b],
            |t| group_norm(&t[0], &t[1], &t[2], 2, 1e-6),
            1e-6,
        )
    }

    #[test]
    fn fused_group_norm_silu_matches_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[2, 4, 3, 2], 7, &dev)?;
        let w = rand_tensor(&[4], 8, &dev)?;
        let b = rand_tensor(&[4], 9, &dev)?;
        let fused = group_norm_silu(&x, &w, &b, 2, 1e-6)?;
        let plain = group_norm(&x, &w, &b, 2, 1e-6)?.silu()?;
        assert!(max_diff(&fused, &plain) < 1e-12);
        check_grads(
            &[x, w, b],
            |t| group_norm_silu(&t[0], &t[1], &t[2], 2, 1e-6),
            1e-6,
        )
    }

    #[test]
    fn frozen_affine_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&rand_tensor(&[2, 4, 3], 4, &dev)?)?;
        let w = rand_tensor(&[4], 5, &dev)?;
        let b = rand_tensor(&[4], 6, &dev)?;
        let g = group_norm(&x, &w, &b, 2, 1e-6)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_some() && g.get(&w).is_none() && g.get(&b).is_none());
        Ok(())
    }
}
