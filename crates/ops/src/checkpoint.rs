//! Block recomputation (gradient checkpointing, Chen et al. 2016): run a block forward without
//! keeping its activations, and recompute them in the backward pass.
//!
//! [`checkpoint`] returns the block's output as a custom op over the block's two inputs and an
//! always-tracked anchor. Its backward re-runs the block on the saved inputs with a fresh graph,
//! differentiates it against the incoming gradient, returns the inputs' gradients, and adds the
//! gradients of variables inside the block (LoRA deltas, fine-tuned weights) to [`SideGrads`],
//! which the trainer merges with the main backward's. Memory: only block inputs and outputs live
//! between forward and backward.

use crate::storage::Precomputed;
use candle_core::{bail, CustomOp3, Result, Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// A block's forward, re-runnable: `f(x, c)` with `c` its second input (time embedding or text).
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Takes a watched variable's gradient the moment its block's backward has produced it (a fused
/// optimizer step, kohya's `fused_backward_pass`), so that the gradients of all blocks never
/// exist at the same time.
pub type GradSink = Arc<dyn Fn(TensorId, Tensor) -> Result<()> + Send + Sync>;

/// Gradients of the watched variables used inside checkpointed blocks, by tensor id.
///
/// Only watched tensors are kept: a block's own backward also leaves gradients for constants it
/// combined with (the incoming gradient, for one), and keeping those would hold as much memory as
/// checkpointing saves.
#[derive(Clone, Default, Debug)]
pub struct SideGrads(Arc<Mutex<SideInner>>);

#[derive(Default)]
struct SideInner {
    watched: HashSet<TensorId>,
    grads: HashMap<TensorId, Tensor>,
    sink: Option<GradSink>,
    /// Variables already handed to the sink in this backward pass.
    delivered: HashSet<TensorId>,
}

impl std::fmt::Debug for SideInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideInner")
            .field("watched", &self.watched.len())
            .field("grads", &self.grads.len())
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

impl SideGrads {
    /// Collects gradients for these tensors (the trainable variables).
    pub fn watch<'a>(&self, tensors: impl IntoIterator<Item = &'a Tensor>) {
        if let Ok(mut inner) = self.0.lock() {
            inner.watched.extend(tensors.into_iter().map(|t| t.id()));
        }
    }

    /// From now on, hands each watched gradient to `sink` as soon as it exists instead of
    /// collecting it; `None` goes back to collecting. A variable may then be used by only one
    /// checkpointed block per backward pass: a second, partial gradient is an error.
    pub fn set_sink(&self, sink: Option<GradSink>) {
        if let Ok(mut inner) = self.0.lock() {
            inner.sink = sink;
            inner.delivered.clear();
        }
    }

    /// Whether `t`'s gradient went to the sink in this backward pass.
    pub fn delivered(&self, t: &Tensor) -> bool {
        self.0
            .lock()
            .is_ok_and(|inner| inner.delivered.contains(&t.id()))
    }

    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let sink = {
            let mut inner = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
            if !inner.watched.contains(&id) {
                return Ok(());
            }
            match inner.sink.clone() {
                Some(sink) => {
                    if !inner.delivered.insert(id) {
                        bail!("fused backward: a trained variable is used by more than one checkpointed block, so its gradient arrives in parts; train without the fused backward")
                    }
                    sink
                }
                None => {
                    let sum = match inner.grads.remove(&id) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    inner.grads.insert(id, sum);
                    return Ok(());
                }
            }
        };
        // Outside the lock: the sink may be slow (an optimizer step) and may read `delivered`.
        sink(id, g)
    }

    /// Removes and returns the gradient collected for `t`, if any.
    pub fn take(&self, t: &Tensor) -> Option<Tensor> {
        self.0.lock().ok()?.grads.remove(&t.id())
    }

    /// Forgets collected gradients and which were delivered; call after each backward pass.
    pub fn clear(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.grads.clear();
            inner.delivered.clear();
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
    value: Precomputed,
    side: SideGrads,
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    crate::storage::hand_over_fwd3!(value);
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
        let mut grads = y.mul(&grad.detach())?.sum_all()?.backward()?;
        let (gx, gc) = (grads.remove(xv.as_tensor()), grads.remove(cv.as_tensor()));
        // The block's store lives until the end of this call: at most one block's gradients.
        for id in grads.get_ids() {
            if let Some(g) = grads.get_id(*id) {
                self.side.add(*id, g.clone())?;
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
            value: Precomputed::new("checkpoint", value),
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

    /// With a sink, a block's variable gradient is handed over during the backward pass (equal to
    /// the collected one) and nothing is collected; a variable used by two checkpointed blocks
    /// is refused rather than handed over in parts.
    #[test]
    fn sink_receives_each_gradient_once_during_backward() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&rand_tensor(&[4, 4], 1, &dev)?)?;
        let x = Var::from_tensor(&rand_tensor(&[3, 4], 2, &dev)?)?;
        let c = rand_tensor(&[3, 4], 3, &dev)?;
        let wt = w.as_tensor().clone();
        let block: BlockFn = Arc::new(move |x: &Tensor, c: &Tensor| (x.matmul(&wt)? * c)?.tanh());
        let ckpt = Checkpointing::new(&dev)?;
        ckpt.side.watch([w.as_tensor()]);
        let loss = |ckpt: &Checkpointing| -> Result<Tensor> {
            checkpoint(x.as_tensor(), &c, block.clone(), ckpt)?
                .sqr()?
                .sum_all()
        };
        loss(&ckpt)?.backward()?;
        let collected = ckpt.side.take(w.as_tensor()).expect("collected gradient");
        ckpt.side.clear();

        let received: Arc<Mutex<Vec<(TensorId, Tensor)>>> = Arc::default();
        let r = received.clone();
        ckpt.side.set_sink(Some(Arc::new(move |id, g| {
            r.lock().unwrap().push((id, g));
            Ok(())
        })));
        loss(&ckpt)?.backward()?;
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, w.id());
        let diff = (&got[0].1 - &collected)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        assert!(ckpt.side.delivered(w.as_tensor()));
        assert!(ckpt.side.take(w.as_tensor()).is_none());
        ckpt.side.clear();

        let twice = checkpoint(x.as_tensor(), &c, block.clone(), &ckpt)?;
        let twice = checkpoint(&twice, &c, block.clone(), &ckpt)?;
        let err = twice.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("more than one checkpointed block"), "{err}");
        Ok(())
    }
}
