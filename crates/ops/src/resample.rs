//! Nearest-neighbour 2× upsampling whose backward accumulates (candle's overwrites).

use candle_core::{Result, Tensor};

/// `F.interpolate(x, scale_factor=2, mode="nearest")` for `x [B, C, H, W]`.
///
/// With a graph attached it is a broadcast + reshape, whose backward sums the four copies; without
/// one, candle's kernel.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !x.track_op() {
        return x.upsample_nearest2d(h * 2, w * 2);
    }
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, h * 2, w * 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_input_grad, rand_tensor};
    use candle_core::Device;

    #[test]
    fn upsample_matches_candle_and_gradient() -> Result<()> {
        let x = rand_tensor(&[1, 2, 3, 2], 1, &Device::Cpu)?;
        let v = candle_core::Var::from_tensor(&x)?;
        let a = upsample_nearest2x(v.as_tensor())?;
        let b = x.upsample_nearest2d(6, 4)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? == 0.0);
        check_input_grad(&x, upsample_nearest2x, 1e-6)
    }
}
