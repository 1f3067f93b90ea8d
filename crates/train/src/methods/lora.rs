//! LoRA (Hu et al. 2021, "Low-Rank Adaptation"): every targeted projection `W` of the frozen UNet
//! (and optionally of the text encoder) gains a trainable delta `B·A · alpha/r`.
//!
//! * **Trainable**: the `A` (down, `[r, in]`) and `B` (up, `[out, r]`) of each targeted
//!   projection; `A` starts Kaiming-uniform and `B` at zero, as PEFT initializes them, so training
//!   starts from the base model exactly.
//! * **Loss**: the shared denoising loss on the instance prompt, or on `IMAGE.txt` captions.
//! * **Defaults**: diffusers' `examples/dreambooth/train_dreambooth_lora.py` recipe: rank 4,
//!   alpha = rank, targets `to_q, to_k, to_v, to_out.0`, lr 1e-4 unscaled, batch 1, 500 steps,
//!   512 px, constant schedule.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use imprint_concepts::lora::{LoraModule, LoraWeights, LORA, UNET};
use imprint_concepts::{Concept, TEXT_ENCODER};
use imprint_models::{Projection, VisitProjections};
use imprint_ops::{Adapter, Conv2dConfig, ScaledAdapter};
use imprint_pipeline::StableDiffusion;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

pub const DEFAULT_LR: f64 = 1e-4;
pub const DEFAULT_STEPS: usize = 500;
pub const DEFAULT_RANK: usize = 4;
pub const DEFAULT_TARGETS: &str = "to_q,to_k,to_v,to_out.0";
/// The text encoder's attention and MLP projections (`--train-text-encoder`).
pub const TEXT_ENCODER_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// One trainable low-rank delta.
#[derive(Debug)]
struct TrainableLora {
    down: Var,
    up: Var,
    scale: f64,
    conv: Option<Conv2dConfig>,
    /// This adapter's number, for its dropout masks.
    index: u64,
    dropout: Arc<Dropout>,
}

/// LoRA dropout (PEFT's `lora_dropout`): during training each adapter's input is masked with
/// probability `p` and rescaled by `1/(1−p)`. Masks are a pure function of (step key, adapter,
/// use within the step), so a resumed run draws exactly the masks of an uninterrupted one.
#[derive(Debug, Default)]
pub struct Dropout {
    p: f64,
    /// 0 while not training (validation, inference).
    step_key: std::sync::atomic::AtomicU64,
    uses: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

impl Dropout {
    /// Starts a training forward pass with masks keyed by `key` (0 turns dropout off).
    pub fn begin(&self, key: u64) {
        self.step_key
            .store(key, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut uses) = self.uses.lock() {
            uses.clear();
        }
    }

    /// Whether masks are drawn now (training with p > 0).
    fn active(&self) -> bool {
        self.p != 0.0 && self.step_key.load(std::sync::atomic::Ordering::SeqCst) != 0
    }

    fn apply(&self, x: &Tensor, index: u64) -> candle_core::Result<Tensor> {
        let key = self.step_key.load(std::sync::atomic::Ordering::SeqCst);
        if self.p == 0.0 || key == 0 {
            return Ok(x.clone());
        }
        let use_no = {
            let mut uses = self
                .uses
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?;
            let n = uses.entry(index).or_insert(0);
            *n += 1;
            *n
        };
        let seed = key
            ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ use_no.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let keep = 1.0 - self.p;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.gen::<f64>() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

impl Adapter for TrainableLora {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = &self.dropout.apply(x, self.index)?;
        // Mixed precision: the f32 factors are cast to the activations' dtype (their gradients
        // come back in f32 through the cast).
        let (down, up) = (
            imprint_ops::cast_like(&self.down, x)?,
            imprint_ops::cast_like(&self.up, x)?,
        );
        let y = match self.conv {
            None => x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?)?,
            Some(c) => imprint_ops::conv2d(
                &imprint_ops::conv2d(x, &down, c.padding, c.stride)?,
                &up,
                0,
                1,
            )?,
        };
        y * self.scale
    }

    fn low_rank(&self) -> Option<imprint_ops::LowRank> {
        (self.conv.is_none() && !self.dropout.active()).then(|| imprint_ops::LowRank {
            down: self.down.as_tensor().clone(),
            up: self.up.as_tensor().clone(),
            scale: self.scale,
        })
    }
}

/// A module the run trains.
pub struct LoraSlot {
    pub network: &'static str,
    pub module: String,
    pub down: Var,
    pub up: Var,
    pub alpha: f64,
}

/// LoRA in the shared loop.
pub struct LoraMethod {
    pub slots: Vec<LoraSlot>,
    pub instance_prompt: Option<String>,
    pub dropout: Arc<Dropout>,
}

/// Does projection `name` match one of `targets` (a trailing path, e.g. `to_out.0`)?
fn targeted(name: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| name == t || name.ends_with(&format!(".{t}")))
}

/// Attaches fresh trainable deltas of `rank` to every targeted projection of `model`.
fn attach(
    model: &mut dyn VisitProjections,
    network: &'static str,
    targets: &[String],
    rank: usize,
    alpha: f64,
    rng: &mut rand_chacha::ChaCha8Rng,
    device: &Device,
    slots: &mut Vec<LoraSlot>,
    dropout: &Arc<Dropout>,
) -> Result<()> {
    let mut err = None;
    model.visit_projections(&mut |p| {
        if err.is_some() || !targeted(p.name(), targets) {
            return;
        }
        let made = (|| -> Result<(String, Var, Var, Option<Conv2dConfig>)> {
            let (name, w, conv) = match &p {
                Projection::Linear(l) => (l.name.clone(), l.weight.clone(), None),
                Projection::Conv2d(c) => (c.name.clone(), c.weight.clone(), Some(c.config)),
            };
            let dims = w.dims().to_vec();
            let (out_dim, in_dim) = (dims[0], dims[1]);
            let k = if conv.is_some() { dims[2] } else { 1 };
            if rank > in_dim.min(out_dim) {
                bail!("rank {rank} is larger than {name} ({out_dim}×{in_dim})")
            }
            // PEFT's init: A ~ kaiming_uniform(a = √5) = U(±1/√fan_in), B = 0.
            let bound = 1.0 / ((in_dim * k * k) as f32).sqrt();
            let n = rank * in_dim * k * k;
            let a: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            let (down_shape, up_shape): (Vec<usize>, Vec<usize>) = match conv {
                None => (vec![rank, in_dim], vec![out_dim, rank]),
                Some(_) => (vec![rank, in_dim, k, k], vec![out_dim, rank, 1, 1]),
            };
            let down = Var::from_tensor(&Tensor::from_vec(a, down_shape, device)?)?;
            let up = Var::zeros(up_shape, candle_core::DType::F32, device)?;
            Ok((name, down, up, conv))
        })();
        match made {
            Err(e) => err = Some(e),
            Ok((name, down, up, conv)) => {
                let adapter = Arc::new(TrainableLora {
                    down: down.clone(),
                    up: up.clone(),
                    scale: alpha / rank as f64,
                    conv,
                    index: slots.len() as u64,
                    dropout: dropout.clone(),
                });
                let scaled = ScaledAdapter {
                    adapter,
                    scale: 1.0,
                };
                match p {
                    Projection::Linear(l) => l.adapters.push(scaled),
                    Projection::Conv2d(c) => c.adapters.push(scaled),
                }
                slots.push(LoraSlot {
                    network,
                    module: name,
                    down,
                    up,
                    alpha,
                });
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(())
}

/// Attaches fresh trainable deltas of `rank` (alpha = rank) to the projections of `model` named
/// by `targets` (comma-separated trailing paths); returns them.
pub fn attach_to(
    model: &mut dyn VisitProjections,
    network: &'static str,
    targets: &str,
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<LoraSlot>> {
    let targets: Vec<String> = targets.split(',').map(|t| t.trim().to_string()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut slots = vec![];
    attach(
        model,
        network,
        &targets,
        rank,
        rank as f64,
        &mut rng,
        device,
        &mut slots,
        &Arc::new(Dropout::default()),
    )?;
    Ok(slots)
}

impl LoraMethod {
    /// Attaches trainable deltas to `sd`'s UNet (and text encoder) projections named by `targets`.
    pub fn attach(
        sd: &mut StableDiffusion,
        targets: &str,
        rank: usize,
        alpha: Option<f64>,
        train_text_encoder: bool,
        instance_prompt: Option<String>,
        seed: u64,
        dropout: f64,
    ) -> Result<Self> {
        if rank == 0 {
            bail!("--rank must be at least 1")
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("--dropout must be within [0, 1) (got {dropout})")
        }
        let dropout = Arc::new(Dropout {
            p: dropout,
            ..Default::default()
        });
        let alpha = alpha.unwrap_or(rank as f64);
        let targets: Vec<String> = targets
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x10ad);
        let mut slots = vec![];
        let device = sd.device.clone();
        attach(
            &mut sd.unet,
            UNET,
            &targets,
            rank,
            alpha,
            &mut rng,
            &device,
            &mut slots,
            &dropout,
        )?;
        if slots.is_empty() {
            bail!("no UNet projection matches --targets '{}' (e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.0.proj, conv1)", targets.join(","))
        }
        if train_text_encoder {
            let te_targets: Vec<String> =
                TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect();
            attach(
                &mut sd.text_encoder,
                TEXT_ENCODER,
                &te_targets,
                rank,
                alpha,
                &mut rng,
                &device,
                &mut slots,
                &dropout,
            )?;
        }
        Ok(Self {
            slots,
            instance_prompt,
            dropout,
        })
    }
}

/// A LoRA-only concept. A LoRA has no trigger token of its own: the instance prompt it was
/// trained on, kept in the metadata, says how to invoke it.
pub fn lora_concept(
    modules: Vec<LoraModule>,
    instance_prompt: &Option<String>,
    base_model: Option<String>,
) -> Concept {
    let metadata = instance_prompt
        .iter()
        .map(|p| ("instance_prompt".to_string(), p.clone()))
        .collect();
    Concept {
        trigger: String::new(),
        method: LORA.into(),
        embeddings: vec![],
        lora: LoraWeights { modules },
        base_model,
        metadata,
        ..Default::default()
    }
}

impl super::Method for LoraMethod {
    fn begin_forward(&self, key: Option<u64>) {
        self.dropout.begin(key.unwrap_or(0));
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = vec![];
        for s in &self.slots {
            out.push((
                format!("{}.{}.lora_down", s.network, s.module),
                s.down.clone(),
            ));
            out.push((format!("{}.{}.lora_up", s.network, s.module), s.up.clone()));
        }
        out
    }

    fn caption(
        &self,
        image: &crate::data::TrainImage,
        _rng: &mut rand_chacha::ChaCha20Rng,
    ) -> String {
        super::instance_caption(image, &self.instance_prompt)
    }

    fn concept(&self, base_model: Option<String>) -> Result<Concept> {
        let mut modules = vec![];
        for s in &self.slots {
            let module = LoraModule::new(
                s.network,
                &s.module,
                s.down.as_tensor().to_device(&Device::Cpu)?,
                s.up.as_tensor().to_device(&Device::Cpu)?,
                s.alpha,
                &s.module,
            )
            .with_context(|| format!("saving the LoRA of {}", s.module))?;
            modules.push(module);
        }
        Ok(lora_concept(modules, &self.instance_prompt, base_model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_are_keyed_and_off_outside_training() -> Result<()> {
        let x = Tensor::ones((4, 500), candle_core::DType::F32, &Device::Cpu)?;
        let d = Dropout {
            p: 0.5,
            ..Default::default()
        };
        d.begin(0);
        assert_eq!(
            d.apply(&x, 3)?.sum_all()?.to_scalar::<f32>()?,
            2000.0,
            "off while not training"
        );
        d.begin(77);
        let a: Vec<f32> = d.apply(&x, 3)?.flatten_all()?.to_vec1()?;
        let kept = a.iter().filter(|&&v| v == 2.0).count();
        assert!(
            a.iter().all(|&v| v == 0.0 || v == 2.0) && (800..1200).contains(&kept),
            "kept {kept}"
        );
        let second: Vec<f32> = d.apply(&x, 3)?.flatten_all()?.to_vec1()?;
        assert_ne!(a, second, "a second use in the same pass draws a new mask");
        d.begin(77);
        assert_eq!(
            d.apply(&x, 3)?.flatten_all()?.to_vec1::<f32>()?,
            a,
            "same key, adapter and use: same mask"
        );
        Ok(())
    }
}
