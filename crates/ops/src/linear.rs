//! Linear projection with a frozen-weight backward and the adapter hook.

use crate::adapter::{apply_adapters, ScaledAdapter};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Tensor,
};
use candle_nn::VarBuilder;

/// `y = x Wᵀ + b (+ Σ scale · adapter(x))`, weight `[out, in]` as in `torch.nn.Linear`.
///
/// When the weight is frozen (a plain tensor, not a `Var`), the product goes through a custom op
/// whose backward returns only the input gradient: no `[out, in]` weight gradient is computed or
/// stored. When the weight is trainable (DreamBooth), candle's ordinary matmul is used.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The reference's module path (e.g. `down_blocks.0.attentions.0.proj_in`), used to address
    /// adapters by name.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapters: Vec<ScaledAdapter>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            adapters: vec![],
        })
    }

    pub fn from_weights(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            adapters: vec![],
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The base projection without adapters.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some(&k) = dims.last() else {
            candle_core::bail!(
                "{}: a linear layer needs an input with a feature dimension, got a scalar",
                self.name
            )
        };
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.out_dim();
        let x2 = x.reshape((m, k))?;
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        let y = if trainable {
            let y = x2.matmul(&self.weight.t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        } else {
            let x2 = x2.contiguous()?;
            match &self.bias {
                Some(b) => x2.apply_op3(&self.weight, b, FrozenLinear)?,
                None => x2.apply_op2(&self.weight, FrozenLinear)?,
            }
        };
        y.reshape(out_dims)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        apply_adapters(y, x, &self.adapters)
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// `x [m,k] · w [n,k]ᵀ (+ b [n])` whose backward yields only `∂x`.
struct FrozenLinear;

fn frozen_linear_fwd<S: BackendStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
    bias: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input has {k} features, weight expects {k2}")
    }
    let wt = lw.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, n, k), lx, &wt)?;
    let y = match bias {
        None => y,
        Some((b, lb)) => {
            let ly = Layout::contiguous((m, n));
            let lb = lb.broadcast_as((m, n))?;
            y.binary_impl::<candle_core::op::Add>(b, &ly, &lb)?
        }
    };
    Ok((y, Shape::from((m, n))))
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, None)
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, None)
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, None)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
        s3: &MetalStorage,
        l3: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        frozen_linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_input_grad, rand_tensor};
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_plain_and_has_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        let w = rand_tensor(&[5, 4], 1, &dev)?;
        let b = rand_tensor(&[5], 2, &dev)?;
        let lin = Linear::from_weights("l", w.clone(), Some(b.clone()));
        let x = rand_tensor(&[2, 3, 4], 3, &dev)?;
        let y = lin.forward(&x)?;
        let expect = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (y - expect)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        check_input_grad(&x, |x| lin.forward(x), 1e-6)?;
        Ok(())
    }

    #[test]
    fn frozen_weight_receives_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = rand_tensor(&[5, 4], 1, &dev)?;
        let lin = Linear::from_weights("l", w.clone(), None);
        let x = Var::from_tensor(&rand_tensor(&[3, 4], 3, &dev)?)?;
        let grads = lin.forward(&x)?.sum_all()?.backward()?;
        assert!(grads.get(&x).is_some());
        assert!(
            grads.get(&w).is_none(),
            "a frozen weight must not get a gradient"
        );
        Ok(())
    }

    #[test]
    fn trainable_weight_gets_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&rand_tensor(&[5, 4], 1, &dev)?)?;
        let lin = Linear::from_weights("l", w.as_tensor().clone(), None);
        let x = rand_tensor(&[3, 4], 3, &dev)?;
        let grads = lin.forward(&x)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_some());
        Ok(())
    }
}
