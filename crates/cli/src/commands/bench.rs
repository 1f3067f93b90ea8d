//! `imprint bench`: times one UNet step of a training or inference mode and prints one JSON line,
//! the same line `benches/reference/bench.py` prints for diffusers/PyTorch.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use clap::{Args, ValueEnum};
use imprint_models::loading::ModelFolder;
use imprint_models::TextConditioning;
use imprint_pipeline::noise::SeededNoise;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// UNet forward only.
    Forward,
    /// Forward + backward to the text states (what textual inversion differentiates).
    Ti,
    /// A whole textual-inversion training step with cached latents: text encoder with the new
    /// token's vectors, UNet, backward to the vectors, AdamW.
    TiStep,
    /// A whole Extended Textual Inversion (P+) step: the text encoder run once per
    /// cross-attention layer (batched), backward to every layer's vectors, AdamW.
    XtiStep,
    /// A whole Perfusion step: the word's vector and the gated rank-1 K/V edits of every
    /// cross-attention layer, backward to the vector and the value targets, AdamW, the target
    /// input's moving average (C⁻¹ from the model's cache, computed before timing).
    PerfusionStep,
    /// A whole Custom Diffusion step: the modifier token's vector and the changes of every
    /// cross-attention key and value weight, AdamW.
    CustomDiffusionStep,
    /// A whole SVDiff step: a spectral shift on every UNet linear, conv and norm weight (the
    /// SVDs from the model's cache, computed before timing), backward to the shifts, AdamW.
    SvdiffStep,
    /// Forward + backward to rank-4 LoRA deltas on the attention projections.
    Lora,
    /// Forward + backward to every UNet weight.
    Dreambooth,
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, value_enum, default_value = "forward")]
    mode: Mode,
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Consume each checkpointed block's weight gradients as soon as its backward produces them
    /// (what `train dreambooth --fused-backward` does with an optimizer step), instead of holding
    /// all of them until the backward pass ends. Needs --gradient-checkpointing.
    #[arg(long)]
    fused_backward: bool,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    device: String,
    /// As `train --mixed-precision`: the UNet's frozen weights and activations in fp16/bf16, the
    /// trained tensors in f32.
    #[arg(long, value_parser = ["no", "fp16", "bf16"], default_value = "no")]
    mixed_precision: String,
}

impl BenchArgs {
    fn half_dtype(&self) -> Option<DType> {
        imprint_train::config::half_dtype(&self.mixed_precision)
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if matches!(
        a.mode,
        Mode::TiStep
            | Mode::XtiStep
            | Mode::PerfusionStep
            | Mode::CustomDiffusionStep
            | Mode::SvdiffStep
    ) {
        return method_step(&a);
    }
    if a.resolution % 8 != 0 || a.iters == 0 {
        bail!("--resolution must be a multiple of 8 and --iters at least 1")
    }
    if a.fused_backward
        && !(a.gradient_checkpointing && matches!(a.mode, Mode::Lora | Mode::Dreambooth))
    {
        bail!("--fused-backward needs --gradient-checkpointing and --mode lora or dreambooth")
    }
    let device = super::parse_device(&a.device)?;
    let folder = ModelFolder::open(&a.model)?;
    // The trainable tensors of the mode: LoRA deltas, or every weight for DreamBooth.
    let (unet, trained): (_, Vec<candle_core::Var>) = match a.mode {
        Mode::Dreambooth => {
            let (unet, vars) = folder.load_unet_trainable(DType::F32, &device)?;
            (unet, vars.into_iter().map(|(_, v)| v).collect())
        }
        Mode::Lora => {
            let mut unet = folder.load_unet(DType::F32, &device)?;
            let slots = imprint_train::methods::lora::attach_to(
                &mut unet,
                "unet",
                imprint_train::methods::lora::DEFAULT_TARGETS,
                4,
                0,
                &device,
            )?;
            let vars = slots.into_iter().flat_map(|s| [s.down, s.up]).collect();
            (unet, vars)
        }
        _ => (folder.load_unet(DType::F32, &device)?, vec![]),
    };
    let mut unet = unet;
    if let Some(dtype) = a.half_dtype() {
        unet.set_mixed_precision(dtype)?;
    }
    let side = if a.gradient_checkpointing {
        Some(unet.enable_gradient_checkpointing()?)
    } else {
        None
    };
    if let Some(s) = &side {
        s.watch(trained.iter().map(|v| v.as_tensor()));
        if a.fused_backward {
            // The gradient is dropped on arrival: this measures the backward pass with block
            // gradients consumed in flight, without an optimizer's own cost or state.
            s.set_sink(Some(std::sync::Arc::new(|_, _| Ok(()))));
        }
    }
    let cross = unet
        .config
        .cross_attention_dim
        .expand(unet.config.block_out_channels.len(), "cross_attention_dim")?[0];
    let mut rng = SeededNoise::new(0);
    let h = a.resolution / 8;
    let sample = rng.randn((a.batch, unet.config.in_channels, h, h), &device)?;
    let t = Tensor::new(vec![500f32; a.batch], &device)?;
    let text = rng.randn((a.batch, 77, cross), &device)?;
    let step = || -> Result<()> {
        match a.mode {
            Mode::Forward => {
                let y = unet.forward(&sample, &t, TextConditioning::Shared(&text))?;
                y.sum_all()?.to_scalar::<f32>()?;
            }
            Mode::Ti => {
                let text = Var::from_tensor(&text)?;
                let y = unet.forward(&sample, &t, TextConditioning::Shared(text.as_tensor()))?;
                let grads = y.sqr()?.mean_all()?.backward()?;
                let Some(g) = grads.get(text.as_tensor()) else {
                    bail!("no gradient reached the text states")
                };
                g.sum_all()?.to_scalar::<f32>()?;
            }
            _ => {
                let y = unet.forward(&sample, &t, TextConditioning::Shared(&text))?;
                let grads = y.sqr()?.mean_all()?.backward()?;
                let from_side = |v: &Var| {
                    side.as_ref().is_some_and(|s| {
                        s.take(v.as_tensor()).is_some() || s.delivered(v.as_tensor())
                    })
                };
                let reached = trained
                    .iter()
                    .filter(|v| grads.get(v.as_tensor()).is_some() || from_side(v))
                    .count();
                if let Some(s) = &side {
                    s.clear();
                }
                if reached == 0 {
                    bail!("no gradient reached the trained tensors")
                }
            }
        }
        device.synchronize()?;
        Ok(())
    };
    step()?; // warm-up
    let mut iter_s = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let start = Instant::now();
        step()?;
        iter_s.push(start.elapsed().as_secs_f64());
    }
    report(&a, &format!("{:?}", a.mode).to_lowercase(), iter_s);
    Ok(())
}

/// `--mode ti-step | xti-step | perfusion-step | custom-diffusion-step | svdiff-step`: one training
/// step of the method as the trainer runs it (latents cached, one caption), through the method's
/// own hooks.
fn method_step(a: &BenchArgs) -> Result<()> {
    use imprint_models::schedulers::ddpm::NoiseSchedule;
    use imprint_train::methods::extended_textual_inversion as xti;
    use imprint_train::methods::perfusion::PerfusionMethod;
    use imprint_train::methods::textual_inversion::{TextualInversion, TextualInversionMethod};
    use imprint_train::methods::{diffusion_loss, Method};
    use imprint_train::optim::{AdamW, AdamWConfig};
    use imprint_train::templates::TemplateSet;
    let device = super::parse_device(&a.device)?;
    let mut sd = imprint_pipeline::StableDiffusion::load(&a.model, DType::F32, &device)?;
    let token = "<bench-token>";
    let method: Box<dyn Method> = match a.mode {
        Mode::XtiStep => Box::new(xti::ExtendedTextualInversionMethod {
            xti: xti::ExtendedTextualInversion::new(&mut sd, token, "toy", 1)?,
            templates: TemplateSet::Object,
            init_word: "toy".into(),
        }),
        Mode::PerfusionStep => Box::new(PerfusionMethod::attach(
            &mut sd,
            &a.model,
            token,
            "toy",
            TemplateSet::Object,
            5.0,
            0.75,
            0.1,
        )?),
        Mode::CustomDiffusionStep => Box::new(
            imprint_train::methods::custom_diffusion::CustomDiffusionMethod::attach(
                &mut sd,
                &[token.to_string()],
                &["toy".to_string()],
                None,
                false,
                false,
                false,
                None,
            )?,
        ),
        Mode::SvdiffStep => {
            let started = Instant::now();
            let m = imprint_train::methods::svdiff::SvdiffMethod::attach(
                &mut sd,
                false,
                Some(format!("a photo of a {token}")),
                Some(token.to_string()),
            )?;
            eprintln!(
                "svdiff: {} shifts; SVDs ready in {:.1} s (cached after the first run); peak RSS after setup {:.2} GB",
                m.parameter_count(),
                started.elapsed().as_secs_f64(),
                peak_rss_bytes().unwrap_or(0) as f64 / 1e9
            );
            Box::new(m)
        }
        _ => Box::new(TextualInversionMethod {
            ti: TextualInversion::new(&mut sd.tokenizer, &sd.text_encoder, token, "toy", 1)?,
            templates: TemplateSet::Object,
            init_word: "toy".into(),
        }),
    };
    if let Some(dtype) = a.half_dtype() {
        sd.unet.set_mixed_precision(dtype)?;
    }
    let side = if a.gradient_checkpointing {
        Some(sd.unet.enable_gradient_checkpointing()?)
    } else {
        None
    };
    let trainable = method.trainable();
    if let Some(s) = &side {
        s.watch(trainable.iter().map(|(_, v)| v.as_tensor()));
    }
    let ids = sd.tokenize(&method.prompt(&format!("a photo of a {token}")))?;
    let schedule = NoiseSchedule::new(&sd.scheduler_config)?;
    let prediction = sd.scheduler_config.prediction()?;
    let mut adam = AdamW::new(
        trainable.iter().map(|(_, v)| v.clone()).collect(),
        AdamWConfig::default(),
    )?;
    adam.lr_scales = trainable.iter().map(|(n, _)| method.lr_scale(n)).collect();
    let mut rng = SeededNoise::new(0);
    let h = a.resolution / 8;
    let latents = rng.randn((a.batch, 4, h, h), &device)?;
    let noise = rng.randn((a.batch, 4, h, h), &device)?;
    let ids = ids.repeat((a.batch, 1))?;
    let timesteps = vec![500usize; a.batch];
    let mut step = || -> Result<()> {
        method.begin_forward(Some(1));
        let text = method.text_states(&sd, &ids)?;
        let loss = diffusion_loss(
            &sd.unet,
            &schedule,
            prediction,
            &latents,
            &noise,
            &timesteps,
            text.conditioning(),
        )?;
        let grads = loss.backward()?;
        let mut all = vec![];
        for (name, var) in &trainable {
            let from_side = side.as_ref().and_then(|s| s.take(var.as_tensor()));
            all.push(match (grads.get(var.as_tensor()), from_side) {
                (Some(g), Some(s)) => (g + s)?,
                (Some(g), None) => g.clone(),
                (None, Some(s)) => s,
                (None, None) => bail!("no gradient reached {name}"),
            });
        }
        if let Some(s) = &side {
            s.clear();
        }
        adam.step(&all, 1e-3)?;
        method.after_step()?;
        device.synchronize()?;
        Ok(())
    };
    step()?;
    let mut iter_s = vec![];
    for _ in 0..a.iters {
        let start = Instant::now();
        step()?;
        iter_s.push(start.elapsed().as_secs_f64());
    }
    let name = match a.mode {
        Mode::XtiStep => "xti-step",
        Mode::PerfusionStep => "perfusion-step",
        Mode::CustomDiffusionStep => "custom-diffusion-step",
        Mode::SvdiffStep => "svdiff-step",
        _ => "ti-step",
    };
    report(a, name, iter_s);
    Ok(())
}

fn report(a: &BenchArgs, mode: &str, iter_s: Vec<f64>) {
    let mut sorted = iter_s.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "imprint", "mode": mode, "resolution": a.resolution, "batch": a.batch,
            "gradient_checkpointing": a.gradient_checkpointing,
            "mixed_precision": a.mixed_precision,
            "fused_backward": a.fused_backward,
            "iter_s": iter_s, "median_s": median, "peak_rss_bytes": peak_rss_bytes(),
        })
    );
}
