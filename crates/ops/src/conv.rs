//! 2-D convolution with a frozen-weight backward and the adapter hook.

use crate::adapter::{apply_adapters, ScaledAdapter};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Storage,
    Tensor,
};
use candle_nn::VarBuilder;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub padding: usize,
    pub stride: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
        }
    }
}

/// `torch.nn.Conv2d` (square kernel, groups 1, dilation 1) plus adapters.
///
/// A frozen weight computes no weight gradient: when the input is part of a graph the output is
/// computed detached and re-attached with a backward that yields only `∂x` (a transposed
/// convolution of the output gradient with the weight).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: Conv2dConfig,
    pub adapters: Vec<ScaledAdapter>,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_c, "bias")?);
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            config,
            adapters: vec![],
        })
    }

    pub fn from_weights(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
        config: Conv2dConfig,
    ) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            config,
            adapters: vec![],
        }
    }

    fn plain(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.config.padding, self.config.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }

    /// The base convolution without adapters.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if trainable || !x.track_op() {
            return self.plain(x);
        }
        let value = self.plain(&x.detach())?.contiguous()?;
        x.apply_op1(FrozenConvBackward {
            value: Mutex::new(Some(value)),
            weight: self.weight.clone(),
            config: self.config,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        apply_adapters(y, x, &self.adapters)
    }
}

impl candle_core::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Conv2d::forward(self, xs)
    }
}

/// Hands out an already computed output and, in the backward pass, the input gradient of a
/// convolution with a frozen weight. The value is taken out on the forward so the graph does not
/// keep a second copy of the activation.
struct FrozenConvBackward {
    value: Mutex<Option<Tensor>>,
    weight: Tensor,
    config: Conv2dConfig,
}

impl FrozenConvBackward {
    fn take(&self) -> Result<Tensor> {
        match self.value.lock().ok().and_then(|mut v| v.take()) {
            Some(v) => Ok(v),
            None => bail!("frozen conv: forward value already consumed"),
        }
    }
}

macro_rules! take_storage {
    ($self:ident, $variant:ident) => {{
        let value = $self.take()?;
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::$variant(s) => Ok((s.try_clone(layout)?, shape)),
            _ => bail!("frozen conv: value on an unexpected device"),
        }
    }};
}

impl CustomOp1 for FrozenConvBackward {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        take_storage!(self, Cpu)
    }
    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> Result<(CudaStorage, Shape)> {
        take_storage!(self, Cuda)
    }
    fn metal_fwd(&self, _s: &MetalStorage, _l: &Layout) -> Result<(MetalStorage, Shape)> {
        take_storage!(self, Metal)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let Conv2dConfig { padding, stride } = self.config;
        let k = self.weight.dim(2)?;
        if grad.device().is_cpu() && matches!(grad.dtype(), DType::F32 | DType::F64) {
            // ∂x = col2im(Wᵀ · g): one gemm against a view of the frozen weight, then a scatter
            // of the columns back to pixels; far faster than candle's direct transposed
            // convolution, and no copy of the weight.
            let (b, c_out, h_out, w_out) = grad.dims4()?;
            let (_, c_in, h, w) = x.dims4()?;
            let w_cols = self.weight.reshape((c_out, c_in * k * k))?;
            let g = grad.reshape((b, c_out, h_out * w_out))?;
            let cols = w_cols.t()?.broadcast_left(b)?.matmul(&g.contiguous()?)?;
            let geometry = Col2Im {
                c_in,
                h,
                w,
                h_out,
                w_out,
                k,
                stride,
                padding,
            };
            return Ok(Some(
                cols.apply_op1_no_bwd(&geometry)?.reshape((b, c_in, h, w))?,
            ));
        }
        // conv_transpose2d output size: (g - 1)·s − 2p + (k − 1) + out_pad + 1 must equal x's.
        let out = (grad.dim(2)? - 1) * stride + k - 2 * padding;
        let out_padding = x.dim(2)? - out;
        Ok(Some(grad.conv_transpose2d(
            &self.weight,
            padding,
            out_padding,
            stride,
            1,
        )?))
    }
}

/// Scatters convolution columns `[B, C·k·k, Ho·Wo]` back to pixels `[B, C, H, W]`, summing the
/// overlaps: the adjoint of im2col.
struct Col2Im {
    c_in: usize,
    h: usize,
    w: usize,
    h_out: usize,
    w_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
}

impl Col2Im {
    fn run<T: Copy + Send + Sync + std::ops::AddAssign + Default>(&self, cols: &[T]) -> Vec<T> {
        use rayon::prelude::*;
        let Col2Im {
            c_in,
            h,
            w,
            h_out,
            w_out,
            k,
            stride,
            padding,
        } = *self;
        let plane = h * w;
        let batch = cols.len() / (c_in * k * k * h_out * w_out);
        let mut out = vec![T::default(); batch * c_in * plane];
        // One (batch, channel) plane per task: each writes only its own pixels.
        out.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
            let (bi, c) = (bc / c_in, bc % c_in);
            for ki in 0..k {
                for kj in 0..k {
                    let row = ((bi * c_in + c) * k * k + ki * k + kj) * h_out * w_out;
                    let src = &cols[row..row + h_out * w_out];
                    for oh in 0..h_out {
                        let y = (oh * stride + ki) as isize - padding as isize;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let drow = y as usize * w;
                        for ow in 0..w_out {
                            let xx = (ow * stride + kj) as isize - padding as isize;
                            if xx >= 0 && xx < w as isize {
                                dst[drow + xx as usize] += src[oh * w_out + ow];
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let batch = l.dims()[0];
        let shape = Shape::from((batch, self.c_in * self.h * self.w));
        Ok(match crate::storage::cpu_slice(s, l)? {
            crate::storage::CpuSlice::F32(v) => (CpuStorage::F32(self.run(v)), shape),
            crate::storage::CpuSlice::F64(v) => (CpuStorage::F64(self.run(v)), shape),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_input_grad, rand_tensor};
    use candle_core::{Device, Var};

    #[test]
    fn frozen_conv_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding, stride, hw) in [
            (3, 1, 1, 5),
            (3, 1, 2, 6),
            (3, 0, 1, 4),
            (3, 1, 2, 5),
            (1, 0, 1, 4),
        ] {
            let w = rand_tensor(&[3, 2, k, k], 1, &dev)?;
            let b = rand_tensor(&[3], 2, &dev)?;
            let conv =
                Conv2d::from_weights("c", w.clone(), Some(b), Conv2dConfig { padding, stride });
            let x = rand_tensor(&[2, 2, hw, hw], 3, &dev)?;
            check_input_grad(&x, |x| conv.forward(x), 1e-6)?;
            let xv = Var::from_tensor(&x)?;
            let g = conv.forward(&xv)?.sum_all()?.backward()?;
            assert!(
                g.get(&w).is_none(),
                "frozen conv weight must get no gradient"
            );
        }
        Ok(())
    }
}
