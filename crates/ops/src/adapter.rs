//! The adapter hook: a delta added to a frozen projection's output.

use candle_core::{Result, Tensor};
use std::sync::Arc;

/// A trainable or loaded delta on a projection (LoRA, LoCon, ...): `y = base(x) + scale * delta(x)`.
///
/// The adapter receives the same input as the base layer and returns a tensor of the base output's
/// shape. Implementations live with the concept code (`imprint-concepts`); the networks only call
/// them.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// A plain low-rank delta on a linear layer (`delta(x) = scale · x Aᵀ Bᵀ`, no dropout in
    /// effect) says so here, and [`crate::Linear`] then computes base and delta in one op.
    fn low_rank(&self) -> Option<LowRank> {
        None
    }
}

/// `delta(x) = scale · (x · downᵀ) · upᵀ` with `down [r, in]`, `up [out, r]`.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// An adapter together with the scale it is applied at.
#[derive(Clone, Debug)]
pub struct ScaledAdapter {
    pub adapter: Arc<dyn Adapter>,
    pub scale: f64,
}

/// Adds every adapter's scaled delta to `base`.
pub(crate) fn apply_adapters(
    base: Tensor,
    x: &Tensor,
    adapters: &[ScaledAdapter],
) -> Result<Tensor> {
    let mut y = base;
    for a in adapters {
        if a.scale == 0.0 {
            continue;
        }
        let delta = crate::cast_like(&a.adapter.forward(x)?, &y)?;
        y = if a.scale == 1.0 {
            (y + delta)?
        } else {
            (y + (delta * a.scale)?)?
        };
    }
    Ok(y)
}
