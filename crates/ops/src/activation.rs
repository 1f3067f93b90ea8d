//! GEGLU (Shazeer 2020, "GLU Variants Improve Transformer"), the feed-forward gate of SD's
//! transformer blocks: `h = [hidden | gate]`, `out = hidden · gelu(gate)` with the exact (erf)
//! GELU, as diffusers' `GEGLU` computes it.

use crate::fastmath::{erf_f32, exp_f32};
use crate::storage::{cpu_slice, same_float};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// `hidden · gelu(gate)` for `h = [hidden | gate]` split in halves along the last dimension.
///
/// On the CPU in f32/f64, and on CUDA in f32/f16/bf16, this is one pass with its own one-pass
/// backward. Composed from candle
/// ops instead, the two halves are strided views, and each view's backward pads a full-size zero
/// tensor, which then get added: several full passes over the widest activation of the block.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        bail!("geglu: the last dimension ({width}) must split into two halves")
    }
    if (h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64))
        || crate::cuda_kernel(h)
    {
        return h.contiguous()?.apply_op1(Geglu);
    }
    let inner = width / 2;
    h.narrow(D::Minus1, 0, inner)? * h.narrow(D::Minus1, inner, inner)?.gelu_erf()?
}

/// Element math in f64 (libm, for the finite-difference tests) or f32 (the vectorizable
/// [`erf_f32`], the approximation PyTorch's CPU GELU uses).
trait GeluScalar: Copy + Send + Sync + 'static {
    /// `(gelu(x), gelu'(x))`
    fn gelu_and_grad(x: Self) -> (Self, Self);
    fn gelu(x: Self) -> Self;
    fn mul(a: Self, b: Self) -> Self;
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

impl GeluScalar for f32 {
    #[inline(always)]
    fn gelu(x: f32) -> f32 {
        0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn gelu_and_grad(x: f32) -> (f32, f32) {
        let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI as f32 * exp_f32(-0.5 * x * x);
        (x * cdf, cdf + x * pdf)
    }
    #[inline(always)]
    fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
}

impl GeluScalar for f64 {
    #[inline(always)]
    fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
    }
    #[inline(always)]
    fn gelu_and_grad(x: f64) -> (f64, f64) {
        let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
        (x * cdf, cdf + x * pdf)
    }
    #[inline(always)]
    fn mul(a: f64, b: f64) -> f64 {
        a * b
    }
}

struct Geglu;

fn geglu_forward<T: GeluScalar + Default>(h: &[T], inner: usize) -> Vec<T> {
    use rayon::prelude::*;
    let rows = h.len() / (2 * inner);
    let mut out = vec![T::default(); rows * inner];
    out.par_chunks_mut(inner)
        .zip(h.par_chunks(2 * inner))
        .for_each(|(o, row)| {
            let (hidden, gate) = row.split_at(inner);
            for ((o, &a), &g) in o.iter_mut().zip(hidden).zip(gate) {
                *o = T::mul(a, T::gelu(g));
            }
        });
    out
}

/// `∂h = [g · gelu(gate) | g · hidden · gelu'(gate)]`.
fn geglu_backward<T: GeluScalar + Default>(h: &[T], grad: &[T], inner: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::default(); h.len()];
    out.par_chunks_mut(2 * inner)
        .zip(h.par_chunks(2 * inner))
        .zip(grad.par_chunks(inner))
        .for_each(|((d, row), g)| {
            let (hidden, gate) = row.split_at(inner);
            let (d_hidden, d_gate) = d.split_at_mut(inner);
            let rows = d_hidden.iter_mut().zip(d_gate).zip(hidden).zip(gate).zip(g);
            for ((((dh, dg), &h), &x), &g) in rows {
                let (value, slope) = T::gelu_and_grad(x);
                *dh = T::mul(g, value);
                *dg = T::mul(T::mul(g, h), slope);
            }
        });
    out
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let inner = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        let out = same_float!("geglu", (cpu_slice(s, l)?), (h) => geglu_forward(h, inner));
        Ok((out, Shape::from(dims)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let inner = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((crate::cuda::geglu_fwd((s, l), inner)?, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            h.apply_op2_no_bwd(&grad.contiguous()?, &GegluBackward)?,
        ))
    }
}

struct GegluBackward;

impl candle_core::CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inner = l1.dims().last().copied().unwrap_or(0) / 2;
        let shape = Shape::from(l1.dims());
        let out = same_float!(
            "geglu backward",
            (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?),
            (h, g) => geglu_backward(h, g, inner)
        );
        Ok((out, shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inner = l1.dims().last().copied().unwrap_or(0) / 2;
        Ok((
            crate::cuda::geglu_bwd((s1, l1), (s2, l2), inner)?,
            Shape::from(l1.dims()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_input_grad, rand_tensor};
    use candle_core::Device;

    #[test]
    fn geglu_matches_composed_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let h = rand_tensor(&[2, 3, 8], 1, &dev)?;
        let composed = (h.narrow(D::Minus1, 0, 4)? * h.narrow(D::Minus1, 4, 4)?.gelu_erf()?)?;
        let diff = (geglu(&h)? - &composed)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-12, "f64: {diff}");
        let h32 = h.to_dtype(DType::F32)?;
        let diff = (geglu(&h32)?.to_dtype(DType::F64)? - &composed)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-6, "f32: {diff}");
        check_input_grad(&h, geglu, 1e-6)?;
        assert!(geglu(&rand_tensor(&[2, 3], 2, &dev)?).is_err());
        Ok(())
    }
}
