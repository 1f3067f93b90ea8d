//! Scaled dot-product attention through the differentiable softmax.

use crate::softmax::softmax_last_dim;
use candle_core::{DType, Result, Tensor};

/// `softmax(q kᵀ · scale + mask) v` for `q [B, Sq, d]`, `k, v [B, Sk, d]` (heads folded into B).
///
/// Scores and softmax are computed in f32 for half-precision inputs (diffusers' `upcast_softmax`;
/// `upcast_attention` also upcasts the product, which is the same thing here).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let (q, k) = match in_dtype {
        DType::F16 | DType::BF16 => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?),
        _ => (q.clone(), k.clone()),
    };
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // An additive mask (0 / -inf), e.g. CLIP's causal mask; the mask itself is a constant.
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?.detach())?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_grads, rand_tensor};
    use candle_core::Device;

    #[test]
    fn attention_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let q = rand_tensor(&[2, 3, 4], 1, &dev)?;
        let k = rand_tensor(&[2, 5, 4], 2, &dev)?;
        let v = rand_tensor(&[2, 5, 4], 3, &dev)?;
        check_grads(
            &[q, k, v],
            |t| scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.5, None),
            1e-6,
        )
    }
}
