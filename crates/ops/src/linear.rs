//! Linear projection with a frozen-weight backward and the adapter hook.

use crate::adapter::{apply_adapters, ScaledAdapter};
use crate::gemm::{matmul, MatRef, Scalar};
use crate::storage::{cpu_slice, into_tensor, same_float, with_cpu_slices};
use candle_core::backend::BackendStorage;
use candle_core::DType;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Tensor,
};
use candle_nn::VarBuilder;

/// `y = x Wᵀ + b (+ Σ scale · adapter(x))`, weight `[out, in]` as in `torch.nn.Linear`.
///
/// The product goes through one custom op (`LinearOp`) whether the weight is frozen or trained:
/// its backward computes the weight and bias gradients only for a trained weight (DreamBooth), so
/// a frozen one costs no `[out, in]` gradient, and the input gradient only when something before
/// the layer needs it.
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
        if let Some((weight, bias)) = crate::params_like(&self.weight, self.bias.as_ref(), x)? {
            // Mixed precision: the weights meet the activations in their dtype.
            return Self::from_weights(self.name.clone(), weight, bias).forward_base(x);
        }
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
        let x2 = x.reshape((m, k))?.contiguous()?;
        let y = match &self.bias {
            Some(b) => x2.apply_op3(&self.weight, b, LinearOp)?,
            None => x2.apply_op2(&self.weight, LinearOp)?,
        };
        y.reshape(out_dims)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_low_rank(x)? {
            return Ok(y);
        }
        let y = self.forward_base(x)?;
        if self.adapters.is_empty() {
            return Ok(y);
        }
        apply_adapters(y, x, &self.adapters)
    }
}

impl Linear {
    /// Frozen base plus one low-rank adapter, on the CPU: `x Wᵀ + b + s·(x Aᵀ) Bᵀ` and its
    /// backward as a handful of gemms, instead of a graph of broadcast matmuls, a scale and an
    /// add whose backward makes full-size copies (LoRA training spends its time there).
    fn forward_low_rank(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let [adapter] = self.adapters.as_slice() else {
            return Ok(None);
        };
        let Some(lr) = adapter.adapter.low_rank() else {
            return Ok(None);
        };
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        let dtype = self.weight.dtype();
        let same = |t: &Tensor| t.dtype() == dtype && t.device().is_cpu();
        let on_cpu = x.device().is_cpu()
            && matches!(dtype, DType::F32 | DType::F64)
            && same(x)
            && same(&lr.down)
            && same(&lr.up);
        // On CUDA the factors follow the activations' dtype (mixed precision: f32 factors are
        // cast, differentiably, to the half-precision activations and frozen weight).
        let on_cuda = x.device().is_cuda()
            && x.dtype() == dtype
            && self.bias.as_ref().is_none_or(|b| b.dtype() == dtype);
        if trainable || !(on_cpu || on_cuda) || x.rank() == 0 {
            return Ok(None);
        }
        let (down, up) = (crate::cast_like(&lr.down, x)?, crate::cast_like(&lr.up, x)?);
        let (r, k) = lr.down.dims2()?;
        let (n, r2) = lr.up.dims2()?;
        if k != self.in_dim() || n != self.out_dim() || r != r2 {
            candle_core::bail!(
                "{}: low-rank adapter {:?}·{:?} does not fit a [{}, {}] weight",
                self.name,
                lr.up.dims(),
                lr.down.dims(),
                self.out_dim(),
                self.in_dim()
            )
        }
        let dims = x.dims();
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = n;
        let y = x.reshape((m, k))?.contiguous()?.apply_op3(
            &down.contiguous()?,
            &up.contiguous()?,
            LowRankLinear {
                weight: self.weight.contiguous()?,
                bias: self.bias.clone(),
                scale: lr.scale * adapter.scale,
            },
        )?;
        Ok(Some(y.reshape(out_dims)?))
    }
}

/// `y = x Wᵀ + b + s·(x Aᵀ) Bᵀ` over `(x [m, in], A [r, in], B [out, r])`, the frozen `W`, `b` held
/// by the op. Backward, with `u = g B`: `∂x = g W + s·u A`, `∂A = s·uᵀ x`, `∂B = s·gᵀ (x Aᵀ)`.
/// On the CPU both passes are our gemm kernels over raw slices; on CUDA the forward is cuBLAS
/// products on the storages ([`low_rank_fwd`]) and the backward the same products as tensor ops
/// ([`low_rank_bwd`]): no broadcast matmuls and no full-size scaled copy of the delta, which is
/// what the composed adapter graph costs.
struct LowRankLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl LowRankLinear {
    fn forward<T: Scalar>(
        &self,
        x: &[T],
        a: &[T],
        b: &[T],
        w: &[T],
        bias: Option<&[T]>,
        (m, k, r, n): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut y = vec![T::ZERO; m * n];
        if let Some(bias) = bias {
            for row in y.chunks_mut(n) {
                row.copy_from_slice(bias);
            }
        }
        let xm = MatRef::row_major(x, m, k);
        matmul(&mut y, bias.is_some(), xm, MatRef::row_major(w, n, k).t());
        let mut t = vec![T::ZERO; m * r];
        matmul(&mut t, false, xm, MatRef::row_major(a, r, k).t());
        let s = T::from_f64(self.scale);
        t.iter_mut().for_each(|v| *v = *v * s);
        matmul(
            &mut y,
            true,
            MatRef::row_major(&t, m, r),
            MatRef::row_major(b, n, r).t(),
        );
        y
    }

    /// `[∂x | ∂A | ∂B]` in one buffer.
    fn backward<T: Scalar>(
        &self,
        x: &[T],
        a: &[T],
        b: &[T],
        w: &[T],
        g: &[T],
        (m, k, r, n): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let s = T::from_f64(self.scale);
        let (xm, gm) = (MatRef::row_major(x, m, k), MatRef::row_major(g, m, n));
        let (am, bm) = (MatRef::row_major(a, r, k), MatRef::row_major(b, n, r));
        let mut out = vec![T::ZERO; m * k + r * k + n * r];
        let (dx, rest) = out.split_at_mut(m * k);
        let (da, db) = rest.split_at_mut(r * k);
        // u = s · g B  [m, r]
        let mut u = vec![T::ZERO; m * r];
        matmul(&mut u, false, gm, bm);
        u.iter_mut().for_each(|v| *v = *v * s);
        let um = MatRef::row_major(&u, m, r);
        matmul(dx, false, gm, MatRef::row_major(w, n, k));
        matmul(dx, true, um, am);
        matmul(da, false, um.t(), xm);
        // t = s · x Aᵀ  [m, r]; ∂B = gᵀ t
        let mut t = vec![T::ZERO; m * r];
        matmul(&mut t, false, xm, am.t());
        t.iter_mut().for_each(|v| *v = *v * s);
        matmul(db, false, gm.t(), MatRef::row_major(&t, m, r));
        out
    }
}

/// The low-rank linear's forward on any backend's storages (CUDA: four cuBLAS products and two
/// element-wise passes). `w` is `[out, in]`, `bias` `[out]`.
fn low_rank_fwd<S: BackendStorage>(
    x: (&S, &Layout),
    a: (&S, &Layout),
    b: (&S, &Layout),
    w: (&S, &Layout),
    bias: Option<(&S, &Layout)>,
    scale: f64,
) -> Result<(S, Shape)> {
    let (m, k) = x.1.shape().dims2()?;
    let (r, n) = (a.1.dims()[0], b.1.dims()[0]);
    let (y, _) = linear_fwd(x.0, x.1, w.0, w.1, bias)?;
    let t = x.0.matmul(a.0, (1, m, r, k), x.1, &a.1.transpose(0, 1)?)?;
    let lt = Layout::contiguous((m, r));
    let t = t.affine(&lt, scale, 0.)?;
    let delta = t.matmul(b.0, (1, m, n, r), &lt, &b.1.transpose(0, 1)?)?;
    let ly = Layout::contiguous((m, n));
    let y = y.binary_impl::<candle_core::op::Add>(&delta, &ly, &ly)?;
    Ok((y, Shape::from((m, n))))
}

/// The low-rank linear's backward as tensor products, on any device: `(∂x, ∂A, ∂B)` for the
/// operands in `need`.
fn low_rank_bwd(
    (x, a, b, w): (&Tensor, &Tensor, &Tensor, &Tensor),
    grad: &Tensor,
    scale: f64,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let u = (grad.matmul(b)? * scale)?;
    let dx = need[0]
        .then(|| grad.matmul(w)? + u.matmul(a)?)
        .transpose()?;
    let da = need[1].then(|| u.t()?.matmul(x)).transpose()?;
    let db = need[2]
        .then(|| grad.t()?.matmul(&(x.matmul(&a.t()?)? * scale)?))
        .transpose()?;
    Ok([dx, da, db])
}

fn cuda_storage<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what} is not on the CUDA device of its input"),
    }
}

impl CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "low-rank-linear"
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
        let (ws, wl) = self.weight.storage_and_layout();
        let w = cuda_storage(&ws, "low-rank linear: the frozen weight")?;
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias {
            Some((s, l)) => Some((cuda_storage(s, "low-rank linear: the bias")?, *l)),
            None => None,
        };
        low_rank_fwd((s1, l1), (s2, l2), (s3, l3), (w, wl), bias, self.scale)
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
        let (m, k) = l1.shape().dims2()?;
        let (r, n) = (l2.dims()[0], l3.dims()[0]);
        // Without a bias the weight stands in as the second parameter slice, unused.
        let bias = self.bias.as_ref().unwrap_or(&self.weight);
        let out = with_cpu_slices(&[&self.weight, bias], |p| {
            Ok(same_float!(
                "low-rank linear",
                (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?, p[0], p[1]),
                (x, a, b, w, bias) => {
                    let bias = self.bias.is_some().then_some(bias);
                    self.forward(x, a, b, w, bias, (m, k, r, n))
                }
            ))
        })?;
        Ok((out, Shape::from((m, n))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        if !grad.device().is_cpu() {
            let need = [x.track_op(), a.track_op(), b.track_op()];
            let [dx, da, db] = low_rank_bwd((x, a, b, &self.weight), &grad, self.scale, need)?;
            return Ok((dx, da, db));
        }
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let dims = (m, k, r, n);
        let dev = grad.device().clone();
        let len = m * k + r * k + n * r;
        let all = with_cpu_slices(&[x, a, b, &self.weight, &grad], |s| {
            Ok(same_float!(
                "low-rank linear backward",
                (s[0], s[1], s[2], s[3], s[4]),
                (x, a, b, w, g) => self.backward(x, a, b, w, g, dims)
            ))
        })?;
        let all = into_tensor(all, len, &dev)?;
        let part = |start: usize, shape: (usize, usize), tracked: bool| -> Result<Option<Tensor>> {
            if !tracked {
                return Ok(None);
            }
            Ok(Some(
                all.narrow(0, start, shape.0 * shape.1)?.reshape(shape)?,
            ))
        };
        Ok((
            part(0, (m, k), x.track_op())?,
            part(m * k, (r, k), a.track_op())?,
            part(m * k + r * k, (n, r), b.track_op())?,
        ))
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// `x [m,k] · w [n,k]ᵀ (+ b [n])`, the bias added in the product's kernel. The backward yields
/// `∂x = ∂y·w`, and `∂w = ∂yᵀ·x`, `∂b = Σ ∂y` only for a weight or bias that is trained: a
/// frozen weight gets no gradient. `∂w` comes out of the product in the weight's own layout;
/// through candle's `x.matmul(&w.t())` it was the transpose of a `[k, n]` product, which the
/// gradient store then copied element by element into a contiguous `[n, k]` (12 % of a fused
/// DreamBooth step on SD 1.5 in `perf`, Intel Xeon).
struct LinearOp;

/// `∂x = ∂y·w` unless nothing before the layer needs it (e.g. the first layer on data).
fn input_grad(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    x.track_op().then(|| grad.matmul(w)).transpose()
}

/// `∂w = ∂yᵀ·x` and `∂b = Σ_rows ∂y` where they are trained.
fn linear_param_grads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dw = w.track_op().then(|| grad.t()?.matmul(x)).transpose()?;
    let db = b
        .filter(|b| b.track_op())
        .map(|_| grad.sum(0))
        .transpose()?;
    Ok((dw, db))
}

fn linear_fwd<S: BackendStorage>(
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

/// The CPU forward as one gemm whose destination starts out holding the bias, so the bias costs
/// no extra pass over the output.
fn linear_cpu(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    fn run<T: Scalar>(x: &[T], w: &[T], b: Option<&[T]>, m: usize, k: usize, n: usize) -> Vec<T> {
        let mut y = vec![T::ZERO; m * n];
        if let Some(b) = b {
            for row in y.chunks_mut(n) {
                row.copy_from_slice(b);
            }
        }
        matmul(
            &mut y,
            b.is_some(),
            MatRef::row_major(x, m, k),
            MatRef::row_major(w, n, k).t(),
        );
        y
    }
    let (m, k) = x.1.shape().dims2()?;
    let (n, k2) = w.1.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input has {k} features, weight expects {k2}")
    }
    let float = |s: &CpuStorage| matches!(s, CpuStorage::F32(_) | CpuStorage::F64(_));
    let kernel = x.1.is_contiguous()
        && w.1.is_contiguous()
        && float(x.0)
        && bias.is_none_or(|(s, l)| float(s) && l.is_contiguous() && l.dims() == [n]);
    if !kernel {
        // Half precision and strided operands: candle's matmul and add.
        return linear_fwd(x.0, x.1, w.0, w.1, bias);
    }
    // Without a bias the weight stands in as the third slice, unused.
    let (bs, bl) = bias.unwrap_or(w);
    let out = same_float!(
        "linear",
        (cpu_slice(x.0, x.1)?, cpu_slice(w.0, w.1)?, cpu_slice(bs, bl)?),
        (x, w, b) => run(x, w, bias.is_some().then_some(b), m, k, n)
    );
    Ok((out, Shape::from((m, n))))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_cpu((s1, l1), (s2, l2), None)
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        linear_fwd(s1, l1, s2, l2, None)
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        linear_fwd(s1, l1, s2, l2, None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dw, _) = linear_param_grads(x, w, None, grad)?;
        Ok((input_grad(x, w, grad)?, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-bias"
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
        linear_cpu((s1, l1), (s2, l2), Some((s3, l3)))
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
        linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
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
        linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dw, db) = linear_param_grads(x, w, Some(b), grad)?;
        Ok((input_grad(x, w, grad)?, dw, db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_grads, check_input_grad, rand_tensor};
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
        // Input, weight and bias gradients against finite differences, with and without a bias.
        let b = rand_tensor(&[5], 2, &dev)?;
        let x = rand_tensor(&[2, 3, 4], 3, &dev)?;
        let w = rand_tensor(&[5, 4], 1, &dev)?;
        check_grads(
            &[x.clone(), w.clone(), b],
            |t| Linear::from_weights("l", t[1].clone(), Some(t[2].clone())).forward(&t[0]),
            1e-6,
        )?;
        check_grads(
            &[x, w],
            |t| Linear::from_weights("l", t[1].clone(), None).forward(&t[0]),
            1e-6,
        )
    }

    /// A trained weight's gradient is computed from the layer's input (`∂w = ∂yᵀ·x`); when that
    /// input is an activation of the graph, the stored gradient must not keep its op graph (and
    /// through it every activation of the forward) alive after the backward pass: DreamBooth's
    /// checkpointed step held 1 GB more on SD 1.5 until the gradient store detached it.
    #[test]
    fn stored_weight_gradients_hold_no_graph() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&rand_tensor(&[5, 4], 1, &dev)?)?;
        let b = Var::from_tensor(&rand_tensor(&[5], 2, &dev)?)?;
        let x0 = Var::from_tensor(&rand_tensor(&[3, 4], 3, &dev)?)?;
        let x = x0.as_tensor().tanh()?;
        let lin = Linear::from_weights("l", w.as_tensor().clone(), Some(b.as_tensor().clone()));
        let grads = lin.forward(&x)?.sqr()?.sum_all()?.backward()?;
        for (name, t) in [("weight", &w), ("bias", &b), ("input", &x0)] {
            let g = grads.get(t).expect("gradient");
            assert!(!g.track_op(), "the {name} gradient keeps an op graph");
        }
        Ok(())
    }

    /// A LoRA-style adapter that can hide its low-rank form, to compare both paths.
    #[derive(Debug)]
    struct TestLora {
        down: Tensor,
        up: Tensor,
        scale: f64,
        fused: bool,
    }

    impl crate::Adapter for TestLora {
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            x.broadcast_matmul(&self.down.t()?)?
                .broadcast_matmul(&self.up.t()?)?
                * self.scale
        }
        fn low_rank(&self) -> Option<crate::LowRank> {
            self.fused.then(|| crate::LowRank {
                down: self.down.clone(),
                up: self.up.clone(),
                scale: self.scale,
            })
        }
    }

    fn lora_linear(t: &[Tensor], bias: bool, fused: bool) -> Linear {
        let mut lin = Linear::from_weights("l", t[3].clone(), bias.then(|| t[4].clone()));
        lin.adapters.push(ScaledAdapter {
            adapter: std::sync::Arc::new(TestLora {
                down: t[1].clone(),
                up: t[2].clone(),
                scale: 0.75,
                fused,
            }),
            scale: 0.5,
        });
        lin
    }

    /// The device-generic forward and backward that CUDA runs, run here on CPU storages: equal
    /// to the CPU kernels' forward and to the gradients candle's autograd gives the composed form.
    #[test]
    fn generic_low_rank_passes_match_cpu_kernels() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[7, 6], 1, &dev)?;
        let a = rand_tensor(&[2, 6], 2, &dev)?;
        let b = rand_tensor(&[5, 2], 3, &dev)?;
        let w = rand_tensor(&[5, 6], 4, &dev)?;
        let bias = rand_tensor(&[5], 5, &dev)?;
        let scale = 0.375;
        for with_bias in [true, false] {
            let op = LowRankLinear {
                weight: w.clone(),
                bias: with_bias.then(|| bias.clone()),
                scale,
            };
            let kernel = x.apply_op3_no_bwd(&a, &b, &op)?;
            let guards: Vec<_> = [&x, &a, &b, &w, &bias]
                .iter()
                .map(|t| t.storage_and_layout())
                .collect();
            let cpu = |i: usize| match &*guards[i].0 {
                candle_core::Storage::Cpu(s) => (s, guards[i].1),
                _ => unreachable!(),
            };
            let bias_arg = with_bias.then(|| cpu(4));
            let (s, shape) = low_rank_fwd(cpu(0), cpu(1), cpu(2), cpu(3), bias_arg, scale)?;
            let generic = into_tensor(s, shape, &dev)?;
            drop(guards);
            let diff = (generic - &kernel)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "forward {diff}");
        }
        let (xv, av, bv) = (
            Var::from_tensor(&x)?,
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
        );
        let r = rand_tensor(&[7, 5], 6, &dev)?;
        let y = (xv.matmul(&w.t()?)? + (xv.matmul(&av.t()?)?.matmul(&bv.t()?)? * scale)?)?;
        let grads = (y * &r)?.sum_all()?.backward()?;
        let got = low_rank_bwd((&x, &a, &b, &w), &r, scale, [true; 3])?;
        for (g, v) in got.iter().zip([&xv, &av, &bv]) {
            let expect = grads.get(v.as_tensor()).expect("gradient");
            let diff = (g.as_ref().expect("requested") - expect)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-12, "backward {diff}");
        }
        let none = low_rank_bwd((&x, &a, &b, &w), &r, scale, [false, true, false])?;
        assert!(none[0].is_none() && none[1].is_some() && none[2].is_none());
        Ok(())
    }

    /// The fused base + low-rank op equals the composed adapter path, and its gradients for the
    /// input and both low-rank factors match finite differences; the frozen weight gets none.
    #[test]
    fn fused_low_rank_linear_matches_composed_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = rand_tensor(&[2, 3, 6], 1, &dev)?;
        let down = rand_tensor(&[2, 6], 2, &dev)?;
        let up = rand_tensor(&[5, 2], 3, &dev)?;
        let w = rand_tensor(&[5, 6], 4, &dev)?;
        let b = rand_tensor(&[5], 5, &dev)?;
        let all = [x.clone(), down.clone(), up.clone(), w.clone(), b.clone()];
        for bias in [true, false] {
            let fused = lora_linear(&all, bias, true).forward(&x)?;
            let plain = lora_linear(&all, bias, false).forward(&x)?;
            let diff = (fused - plain)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "{diff}");
            check_grads(
                &[x.clone(), down.clone(), up.clone()],
                |t| {
                    let params = [
                        t[0].clone(),
                        t[1].clone(),
                        t[2].clone(),
                        w.clone(),
                        b.clone(),
                    ];
                    lora_linear(&params, bias, true).forward(&t[0])
                },
                1e-6,
            )?;
        }
        let wv = Var::from_tensor(&w)?;
        let params = [x.clone(), down, up, wv.as_tensor().clone(), b];
        let mut lin = lora_linear(&params, true, true);
        lin.weight = w.clone();
        let xv = Var::from_tensor(&x)?;
        let g = lin.forward(&xv)?.sum_all()?.backward()?;
        assert!(g.get(&w).is_none() && g.get(xv.as_tensor()).is_some());
        Ok(())
    }
}
