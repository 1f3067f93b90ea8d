//! 2-D convolution with a frozen-weight backward and the adapter hook.

use crate::adapter::{apply_adapters, ScaledAdapter};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex, OnceLock};

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
    /// The kernel flipped spatially with in/out channels swapped, made on the first backward:
    /// a stride-1 convolution's input gradient is a plain convolution with it.
    gradient_kernel: Arc<OnceLock<Tensor>>,
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
            gradient_kernel: Default::default(),
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
            gradient_kernel: Default::default(),
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
            gradient_kernel: self.gradient_kernel.clone(),
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
    gradient_kernel: Arc<OnceLock<Tensor>>,
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
        if stride == 1 && padding < k {
            // ∂x = grad ⋆ flip(W)ᵀ with padding k − 1 − p: a forward convolution (im2col + gemm),
            // far faster on CPU than candle's direct transposed convolution.
            let kernel = match self.gradient_kernel.get() {
                Some(kernel) => kernel.clone(),
                None => {
                    let reversed: Vec<u32> = (0..k as u32).rev().collect();
                    let idx = Tensor::new(reversed, self.weight.device())?;
                    let flipped = self.weight.index_select(&idx, 2)?.index_select(&idx, 3)?;
                    let kernel = flipped.transpose(0, 1)?.contiguous()?;
                    self.gradient_kernel.get_or_init(|| kernel).clone()
                }
            };
            return Ok(Some(grad.conv2d(&kernel, k - 1 - padding, 1, 1, 1)?));
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
