//! Training-grade tensor ops for imprint, on top of candle.
//!
//! Every network in `imprint-models` computes its forward pass through this crate, so that the same
//! code that generates images can be differentiated when a concept is trained. Three things make an
//! op "training-grade" here (see DESIGN.md, *Known traps*):
//!
//! * **Its gradient is right.** candle's fused `softmax_last_dim` / `layer_norm` record no backward;
//!   [`softmax_last_dim`], [`layer_norm`] and [`group_norm`] here carry their own backward, checked
//!   against finite differences in the tests beside them.
//! * **Frozen weights get no gradient.** candle's matmul and conv backward always compute the weight
//!   gradient (3.7 GB on the SD 1.5 UNet). [`Linear`] and [`Conv2d`] route a frozen weight through a
//!   custom op whose backward yields only the input gradient; a trainable weight (a `Var`) takes
//!   candle's ordinary path.
//! * **Adapters plug in.** A [`Linear`] or [`Conv2d`] is a frozen base plus zero or more
//!   [`ScaledAdapter`]s (LoRA and friends), so personalization methods add deltas without rewriting
//!   the networks.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?;
//! let y = imprint_ops::softmax_last_dim(&x)?;
//! assert!((y.sum_all()?.to_scalar::<f32>()? - 1.0).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod activation;
mod adapter;
mod attention;
mod checkpoint;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod fastmath;
mod gemm;
pub mod grad_check;
mod linear;
mod norm;
pub mod optim;
mod resample;
mod softmax;
mod storage;

pub use activation::geglu;
pub use adapter::{Adapter, LowRank, ScaledAdapter};
#[cfg(feature = "cuda")]
pub use attention::fused_attention_applies;
pub use attention::{chunked_attention, scaled_dot_product_attention};
pub use checkpoint::{checkpoint, BlockFn, Checkpointing, SideGrads};
pub use conv::{conv2d, Conv2d, Conv2dConfig};
pub use device::{device_from_env, parse_device};
pub use linear::Linear;
pub use norm::{group_norm, group_norm_silu, layer_norm, shifted_weight, GroupNorm, LayerNorm};
pub use resample::upsample_nearest2x;
pub use softmax::softmax_last_dim;

/// Whether `t` is on a CUDA device in a dtype that this crate's CUDA kernels take
/// (`src/cuda/kernels.cu`, built with the `cuda` feature).
pub(crate) fn cuda_kernel(t: &candle_core::Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        t.device().is_cuda() && cuda::supported(t.dtype())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = t;
        false
    }
}

/// `p` in `x`'s dtype: parameters follow the activations (mixed precision: trainable weights are
/// kept in f32 and cast, differentiably, where half-precision activations meet them).
pub fn cast_like(
    p: &candle_core::Tensor,
    x: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    if p.dtype() == x.dtype() {
        Ok(p.clone())
    } else {
        p.to_dtype(x.dtype())
    }
}

/// A layer's `(weight, bias)` cast to `x`'s dtype, or `None` when they already share it.
pub(crate) fn params_like(
    weight: &candle_core::Tensor,
    bias: Option<&candle_core::Tensor>,
    x: &candle_core::Tensor,
) -> candle_core::Result<Option<(candle_core::Tensor, Option<candle_core::Tensor>)>> {
    if weight.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype()) {
        return Ok(None);
    }
    let bias = bias.map(|b| cast_like(b, x)).transpose()?;
    Ok(Some((cast_like(weight, x)?, bias)))
}

/// Runs a backward pass in f32 when its inputs are half precision (f16/bf16 keep 8–11 significant
/// bits, too few for the reductions of a backward pass) and casts the gradients back.
pub(crate) fn upcast_half(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    match t.dtype() {
        candle_core::DType::F16 | candle_core::DType::BF16 => t.to_dtype(candle_core::DType::F32),
        _ => Ok(t.clone()),
    }
}
