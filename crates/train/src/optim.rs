//! AdamW with PyTorch's exact update, and gradient-norm clipping.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

/// `torch.optim.AdamW` hyper-parameters (the diffusers training scripts' defaults).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// AdamW state for a list of trainable variables; the state exists only for them.
pub struct AdamW {
    pub config: AdamWConfig,
    pub vars: Vec<Var>,
    /// First and second moment estimates, one per variable. On the CPU they are updated in place:
    /// a clone shares their storage and follows them (read it before the next update, as a
    /// checkpoint's save does).
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Steps taken so far.
    pub step: usize,
    /// Each variable's learning rate as a multiple of the step's (1 unless a method trains parts
    /// at different rates, as Perfusion's embedding and values).
    pub lr_scales: Vec<f64>,
    /// The ids of the zero moments `new` made, until their first update: the in-place CPU update
    /// swaps them for written zeros then (see `imprint_ops::optim::zeros_written`), unless they
    /// were replaced meanwhile (a resumed run's moments). Allocating them then, not in `new`,
    /// also keeps a resumed run from holding two sets of moments at once.
    untouched: Vec<Option<(candle_core::TensorId, candle_core::TensorId)>>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = || {
            vars.iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let (exp_avg, exp_avg_sq) = (zeros()?, zeros()?);
        let untouched = exp_avg
            .iter()
            .zip(&exp_avg_sq)
            .map(|(m, v)| Some((m.id(), v.id())))
            .collect();
        Ok(Self {
            config,
            lr_scales: vec![1.0; vars.len()],
            vars,
            exp_avg,
            exp_avg_sq,
            step: 0,
            untouched,
        })
    }

    /// One update with learning rate `lr`, following `torch.optim.adamw` (single-tensor path):
    /// decoupled decay `p ← p·(1 − lr·wd)`, moments, then `p ← p − lr/bc1 · m / (√v/√bc2 + eps)`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!(
                "AdamW: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )
        }
        for (i, g) in grads.iter().enumerate() {
            self.update(i, g, lr)?;
        }
        self.finish_step();
        Ok(())
    }

    /// Updates variable `i` alone with its gradient, as part of the step being taken (`step + 1`):
    /// a fused backward pass calls this as each gradient arrives, then [`Self::finish_step`].
    pub fn update(&mut self, i: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let c = self.config;
        let lr = lr * self.lr_scales.get(i).copied().unwrap_or(1.0);
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        // Detached: a weight's gradient is computed from the forward activations and records that
        // graph; moments built from it would keep every step's activations alive, chained from
        // step to step (unbounded memory growth in LoRA and DreamBooth training).
        let g = grad.detach().to_dtype(self.vars[i].dtype())?;
        let step = imprint_ops::optim::AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bias_correction1: bc1,
            bias_correction2_sqrt: bc2_sqrt,
        };
        let p = self.vars[i].as_tensor();
        if imprint_ops::optim::adamw_update_applies(p, &self.exp_avg[i], &self.exp_avg_sq[i], &g) {
            let fresh = self.untouched.get_mut(i).and_then(Option::take);
            if fresh == Some((self.exp_avg[i].id(), self.exp_avg_sq[i].id())) {
                self.exp_avg[i] = imprint_ops::optim::zeros_written(p)?;
                self.exp_avg_sq[i] = imprint_ops::optim::zeros_written(p)?;
            }
            // On the CPU, in place with no temporaries; the same numbers as the composed form.
            let (m, v) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
            return Ok(imprint_ops::optim::adamw_update(p, m, v, &g, &step)?);
        }
        let [p, m, v] = imprint_ops::optim::adamw_composed(
            p,
            &self.exp_avg[i],
            &self.exp_avg_sq[i],
            &g,
            &step,
        )?;
        self.vars[i].set(&p)?;
        self.exp_avg[i] = m;
        self.exp_avg_sq[i] = v;
        Ok(())
    }

    /// Ends a step whose variables were all updated with [`Self::update`].
    pub fn finish_step(&mut self) {
        self.step += 1;
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm` (`clip_grad_norm_`); returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: Option<f64>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += imprint_ops::optim::sum_squares(g)?;
    }
    let norm = total.sqrt();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_closed_form_first_steps() -> Result<()> {
        let p0 = 0.5f64;
        let var = Var::new(&[p0], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![var.clone()], AdamWConfig::default())?;
        let (lr, g) = (0.1, 0.2);
        opt.step(&[Tensor::new(&[g], &Device::Cpu)?], lr)?;
        // Step 1: m̂ = g, v̂ = g², so p = p0(1 − lr·wd) − lr · g / (|g| + eps).
        let expected = p0 * (1.0 - lr * 0.01) - lr * g / (g.abs() + 1e-8);
        let got = var.to_vec1::<f64>()?[0];
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        Ok(())
    }

    /// A weight's gradient records the forward graph (it is computed from the activations); the
    /// moments must not keep it, or every step's activations stay alive.
    #[test]
    fn moments_do_not_keep_the_gradient_graph() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let x = Var::new(&[[0.5f32, -1.0]], &dev)?;
        let activation = x.as_tensor().exp()?;
        let loss = activation.matmul(w.as_tensor())?.sum_all()?;
        let g = loss.backward()?.get(w.as_tensor()).unwrap().clone();
        let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::default())?;
        opt.step(&[g], 0.1)?;
        assert!(!opt.exp_avg[0].track_op() && !opt.exp_avg_sq[0].track_op());
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let mut g = vec![Tensor::new(&[3f64, 4.], &Device::Cpu)?];
        let n = clip_grad_norm(&mut g, Some(1.0))?;
        assert!((n - 5.0).abs() < 1e-12);
        let v = g[0].to_vec1::<f64>()?;
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        Ok(())
    }
}
