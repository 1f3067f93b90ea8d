//! Block recomputation (gradient checkpointing, Chen et al. 2016): run a block forward without
//! keeping its activations, and recompute them in the backward pass.
//!
//! [`checkpoint`] returns the block's output as a custom op over the block's two inputs and an
//! always-tracked anchor. Its backward re-runs the block on the saved inputs with a fresh graph,
//! differentiates it against the incoming gradient, returns the inputs' gradients, and adds the
//! gradients of variables inside the block (LoRA deltas, fine-tuned weights) to [`SideGrads`],
//! which the trainer merges with the main backward's. Memory: only block inputs and outputs live
//! between forward and backward.

use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Result, Shape, Storage, Tensor,
    TensorId, Var,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A block's forward, re-runnable: `f(x, c)` with `c` its second input (time embedding or text).
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Gradients of the watched variables used inside checkpointed blocks, by tensor id.
///
/// Only watched tensors are kept: a block's own backward also leaves gradients for constants it
/// combined with (the incoming gradient, for one), and keeping those would hold as much memory as
/// checkpointing saves.
#[derive(Clone, Default, Debug)]
pub struct SideGrads(Arc<Mutex<SideInner>>);

#[derive(Default, Debug)]
struct SideInner {
    watched: std::collections::HashSet<TensorId>,
    grads: HashMap<TensorId, Tensor>,
}

impl SideGrads {
    /// Collects gradients for these tensors (the trainable variables).
    pub fn watch<'a>(&self, tensors: impl IntoIterator<Item = &'a Tensor>) {
        if let Ok(mut inner) = self.0.lock() {
            inner.watched.extend(tensors.into_iter().map(|t| t.id()));
        }
    }

    fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
        let mut inner = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
        if !inner.watched.contains(&id) {
            return Ok(());
        }
        let sum = match inner.grads.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g.clone(),
        };
        inner.grads.insert(id, sum);
        Ok(())
    }

    /// Removes and returns the gradient collected for `t`, if any.
    pub fn take(&self, t: &Tensor) -> Option<Tensor> {
        self.0.lock().ok()?.grads.remove(&t.id())
    }

    pub fn clear(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.grads.clear()
        }
    }
}

/// What a network needs to checkpoint its blocks.
#[derive(Clone, Debug)]
pub struct Checkpointing {
    pub side: SideGrads,
    /// A scalar variable every checkpoint op takes as an input, so the op is recorded even when
    /// neither block input is part of the graph (the block's own variables still need gradients).
    anchor: Var,
}

impl Checkpointing {
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            side: SideGrads::default(),
            anchor: Var::zeros((), candle_core::DType::F32, device)?,
        })
    }
}

struct Recompute {
    f: BlockFn,
    value: Mutex<Option<Tensor>>,
    side: SideGrads,
}

macro_rules! take_value {
    ($self:ident, $variant:ident) => {{
        let value = $self.value.lock().ok().and_then(|mut v| v.take());
        let Some(value) = value else {
            bail!("checkpoint: forward value already consumed")
        };
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::$variant(s) => {
                use candle_core::backend::BackendStorage;
                Ok((s.try_clone(layout)?, shape))
            }
            _ => bail!("checkpoint: value on an unexpected device"),
        }
    }};
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_value!(self, Cpu)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        take_value!(self, Cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        take_value!(self, Metal)
    }
    fn bwd(
        &self,
        x: &Tensor,
        c: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let cv = Var::from_tensor(&c.detach())?;
        let y = (self.f)(xv.as_tensor(), cv.as_tensor())?;
        let grads = y.mul(&grad.detach())?.sum_all()?.backward()?;
        let (gx, gc) = (
            grads.get(xv.as_tensor()).cloned(),
            grads.get(cv.as_tensor()).cloned(),
        );
        for id in grads.get_ids() {
            if *id != xv.id() && *id != cv.id() {
                if let Some(g) = grads.get_id(*id) {
                    self.side.add(*id, g)?;
                }
            }
        }
        Ok((gx, gc, None))
    }
}

/// `f(x, c)`, recomputed in the backward pass instead of stored.
pub fn checkpoint(x: &Tensor, c: &Tensor, f: BlockFn, ckpt: &Checkpointing) -> Result<Tensor> {
    let value = f(&x.detach(), &c.detach())?.detach().contiguous()?;
    x.apply_op3(
        c,
        ckpt.anchor.as_tensor(),
        Recompute {
            f,
            value: Mutex::new(Some(value)),
            side: ckpt.side.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::rand_tensor;
    use candle_core::Device;

    #[test]
    fn checkpointed_gradients_equal_plain_ones() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&rand_tensor(&[4, 4], 1, &dev)?)?;
        let x = Var::from_tensor(&rand_tensor(&[3, 4], 2, &dev)?)?;
        let c = Var::from_tensor(&rand_tensor(&[3, 4], 3, &dev)?)?;
        let wt = w.as_tensor().clone();
        let block = move |x: &Tensor, c: &Tensor| -> Result<Tensor> {
            crate::softmax_last_dim(&(x.matmul(&wt)? * c)?)?.tanh()
        };
        let plain = block(x.as_tensor(), c.as_tensor())?
            .sqr()?
            .sum_all()?
            .backward()?;
        let ckpt = Checkpointing::new(&dev)?;
        ckpt.side.watch([w.as_tensor()]);
        let y = checkpoint(x.as_tensor(), c.as_tensor(), Arc::new(block), &ckpt)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let close = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-12
        };
        assert!(close(
            grads.get(x.as_tensor()).unwrap(),
            plain.get(x.as_tensor()).unwrap()
        ));
        assert!(close(
            grads.get(c.as_tensor()).unwrap(),
            plain.get(c.as_tensor()).unwrap()
        ));
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "inner variables' gradients go to the side store"
        );
        assert!(close(
            &ckpt.side.take(w.as_tensor()).unwrap(),
            plain.get(w.as_tensor()).unwrap()
        ));
        Ok(())
    }
}
