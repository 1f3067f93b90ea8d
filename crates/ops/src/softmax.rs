//! Softmax over the last dimension with a backward (candle's fused one has none).

use crate::storage::{cpu_slice, CpuSlice};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

/// `softmax(x)` along the last dimension, differentiable.
///
/// On CPU (f32/f64) and CUDA (f32/f16/bf16) a fused kernel computes the forward and the backward
/// is `∂x = y ⊙ (g − Σ g ⊙ y)` (in f32 for half precision); elsewhere it is composed from candle
/// ops, whose autograd is correct.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if (x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64))
        || crate::cuda_kernel(x)
    {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        // Shift by the (detached) max: softmax is shift invariant, so no gradient is lost.
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

struct SoftmaxLastDim;

fn softmax_rows<T: Float + Send + Sync>(x: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, row)| {
            let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            let mut sum = T::zero();
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum = sum + *o;
            }
            let inv = T::one() / sum;
            for o in o.iter_mut() {
                *o = *o * inv;
            }
        });
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = *l.dims().last().unwrap_or(&1);
        let out = match cpu_slice(s, l)? {
            CpuSlice::F32(v) => CpuStorage::F32(softmax_rows(v, dim)),
            CpuSlice::F64(v) => CpuStorage::F64(softmax_rows(v, dim)),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dim = *l.dims().last().unwrap_or(&1);
        Ok((crate::cuda::softmax_fwd((s, l), dim)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y32, g32) = (crate::upcast_half(y)?, crate::upcast_half(grad)?);
        let gy = (g32 * &y32)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        Ok(Some((gy - y32.broadcast_mul(&s)?)?.to_dtype(y.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_input_grad, rand_tensor};
    use candle_core::Device;

    #[test]
    fn softmax_matches_candle_and_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 3, 5], 7, &Device::Cpu)?;
        let ours = softmax_last_dim(&x)?;
        let theirs = candle_nn::ops::softmax_last_dim(&x)?;
        assert!((ours - theirs)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        check_input_grad(&x, softmax_last_dim, 1e-6)
    }

    #[test]
    fn softmax_f32_forward() -> Result<()> {
        let x = rand_tensor(&[4, 9], 8, &Device::Cpu)?.to_dtype(candle_core::DType::F32)?;
        let ours = softmax_last_dim(&x)?;
        let theirs = candle_nn::ops::softmax_last_dim(&x)?;
        assert!((ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
