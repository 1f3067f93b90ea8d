//! `imprint debug tokenize | forward | sample`: the parity and inspection contract of DESIGN.md.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Subcommand, ValueEnum};
use imprint_concepts::lora::apply_lora;
use imprint_concepts::{TEXT_ENCODER, UNET};
use imprint_models::io::save_safetensors_atomic;
use imprint_models::loading::ModelFolder;
use imprint_models::schedulers::SchedulerKind;
use imprint_models::visit::VisitProjections;
use imprint_models::TextConditioning;
use imprint_pipeline::noise::{QueuedNoise, SeededNoise};
use imprint_pipeline::{SampleOptions, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Component {
    TextEncoder,
    Unet,
    VaeEncoder,
    VaeDecoder,
}

#[derive(Subcommand)]
pub enum DebugCommand {
    /// Print {"input_ids": [...]}: 77 ids, padded and truncated as the reference pipelines do.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
    },
    /// Run one component on tensors from a safetensors file and write its outputs.
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        component: Component,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Apply a concept's LoRA weights for this component at an optional scale
        /// (`FILE[:SCALE]`, unet and text-encoder only). Repeatable.
        #[arg(long, value_name = "FILE[:SCALE]", value_parser = super::parse_concept_arg)]
        concept: Vec<super::ConceptArg>,
        #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
        device: String,
    },
    /// Run the full guided sampling loop from given initial noise; write the final latents.
    Sample {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        #[arg(long)]
        scheduler: SchedulerKind,
        #[arg(long)]
        karras: bool,
        #[arg(long)]
        steps: usize,
        #[arg(long)]
        guidance: f64,
        /// diffusers' guidance_rescale (0 = off).
        #[arg(long, default_value_t = 0.0)]
        guidance_rescale: f64,
        /// Holds `latents` [1,4,h,w] (unit variance) and optionally `noise` [N,1,4,h,w]: the noise
        /// stochastic schedulers draw, one entry per draw.
        #[arg(long)]
        latents: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Seed for stochastic schedulers when the input holds no `noise`.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        clip_skip: usize,
        /// Inpainting: the image to repaint (its latents may instead be given in --latents as
        /// `image_latents` and `masked_image_latents`, already scaled).
        #[arg(long)]
        init_image: Option<PathBuf>,
        /// Inpainting: white = repaint (binarized at 0.5, resized as diffusers' mask processor).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// Inpainting: run the last int(steps · strength) steps, from the given noise.
        #[arg(long, default_value_t = 1.0)]
        strength: f64,
        /// Apply a concept file, on some layers, at an optional scale (`FILE[@LAYERS][:SCALE]`,
        /// as `generate`). Repeatable.
        #[arg(long, value_name = "FILE[@LAYERS][:SCALE]", value_parser = super::parse_concept_arg)]
        concept: Vec<super::ConceptArg>,
        #[command(flatten)]
        gate: super::GateArgs,
        #[command(flatten)]
        ip: super::IpAdapterArgs,
        /// Regional prompting (`WORD:MASK`, as generate).
        #[arg(long, value_name = "WORD:MASK", value_parser = super::parse_region_arg)]
        region: Vec<(String, std::path::PathBuf)>,
        /// Regional prompts (`PROMPT:MASK`, as generate).
        #[arg(long, value_name = "PROMPT:MASK", value_parser = super::parse_region_prompt_arg)]
        region_prompt: Vec<(String, std::path::PathBuf)>,
        #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
        device: String,
    },
}

fn load_inputs(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    imprint_models::loading::check_safetensors(path).with_context(|| path.display().to_string())?;
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("{}: cannot read tensors", path.display()))
}

fn take(inputs: &HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    inputs
        .get(name)
        .cloned()
        .with_context(|| format!("{}: missing tensor '{name}'", path.display()))
}

fn expect_rank(t: &Tensor, rank: usize, name: &str, path: &Path) -> Result<()> {
    if t.rank() != rank {
        bail!(
            "{}: '{name}' must have {rank} dimensions, got shape {:?}",
            path.display(),
            t.dims()
        )
    }
    Ok(())
}

/// Attaches each concept's LoRA modules on `network` to `model`.
fn apply_loras(
    model: &mut dyn VisitProjections,
    network: &str,
    concepts: &[super::ConceptArg],
) -> Result<()> {
    for c in concepts {
        let concept = imprint_concepts::formats::load_any(&c.path)?;
        let n = apply_lora(model, network, &concept.lora, c.scale)
            .with_context(|| c.path.display().to_string())?;
        if n == 0 {
            eprintln!(
                "warning: {}: no LoRA weights for the {network}",
                c.path.display()
            );
        }
    }
    Ok(())
}

fn forward(
    model: &Path,
    component: Component,
    input: &Path,
    output: &Path,
    concepts: &[super::ConceptArg],
    device: &Device,
) -> Result<()> {
    let folder = ModelFolder::open(model)?;
    if !concepts.is_empty() && matches!(component, Component::VaeEncoder | Component::VaeDecoder) {
        bail!("--concept applies to the unet and text-encoder components only")
    }
    let inputs = load_inputs(input, device)?;
    let f32 = |t: Tensor| t.to_dtype(DType::F32);
    let mut out = HashMap::new();
    match component {
        Component::TextEncoder => {
            let ids = take(&inputs, "input_ids", input)?;
            expect_rank(&ids, 2, "input_ids", input)?;
            let mut te = folder.load_text_encoder(DType::F32, device)?;
            apply_loras(&mut te, TEXT_ENCODER, concepts)?;
            let o = te.forward(&ids.to_dtype(DType::I64)?, 0)?;
            out.insert("last_hidden_state".to_string(), o.last_hidden_state);
            out.insert("pooler_output".to_string(), o.pooler_output);
        }
        Component::Unet => {
            let sample = f32(take(&inputs, "sample", input)?)?;
            expect_rank(&sample, 4, "sample", input)?;
            let t = take(&inputs, "timestep", input)?;
            let ehs = f32(take(&inputs, "encoder_hidden_states", input)?)?;
            expect_rank(&ehs, 3, "encoder_hidden_states", input)?;
            let mut unet = folder.load_unet(DType::F32, device)?;
            apply_loras(&mut unet, UNET, concepts)?;
            let y = unet.forward(
                &sample,
                &t.to_dtype(DType::F32)?,
                TextConditioning::Shared(&ehs),
            )?;
            out.insert("sample".to_string(), y);
        }
        Component::VaeEncoder => {
            let x = f32(take(&inputs, "sample", input)?)?;
            expect_rank(&x, 4, "sample", input)?;
            let vae = folder.load_vae(DType::F32, device)?;
            let d = vae.encode(&x)?;
            out.insert("mean".to_string(), d.mean);
            out.insert("logvar".to_string(), d.logvar);
        }
        Component::VaeDecoder => {
            let z = f32(take(&inputs, "latents", input)?)?;
            expect_rank(&z, 4, "latents", input)?;
            let vae = folder.load_vae(DType::F32, device)?;
            out.insert("sample".to_string(), vae.decode(&z)?);
        }
    }
    let out = out
        .into_iter()
        .map(|(k, v)| Ok((k, v.contiguous()?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    save_safetensors_atomic(output, &out, None)
}

pub fn run(c: DebugCommand) -> Result<()> {
    match c {
        DebugCommand::Tokenize { model, prompt } => {
            let tok = ModelFolder::open(&model)?.tokenizer()?;
            let ids = tok.encode(&prompt)?;
            println!("{}", serde_json::json!({ "input_ids": ids }));
            Ok(())
        }
        DebugCommand::Forward {
            model,
            component,
            input,
            output,
            concept,
            device,
        } => forward(
            &model,
            component,
            &input,
            &output,
            &concept,
            &super::parse_device(&device)?,
        ),
        DebugCommand::Sample {
            model,
            prompt,
            negative_prompt,
            scheduler,
            karras,
            steps,
            guidance,
            guidance_rescale,
            latents,
            output,
            seed,
            clip_skip,
            init_image,
            mask,
            strength,
            concept,
            gate,
            ip,
            region,
            region_prompt,
            device,
        } => {
            let device = super::parse_device(&device)?;
            let inputs = load_inputs(&latents, &device)?;
            let initial = take(&inputs, "latents", &latents)?.to_dtype(DType::F32)?;
            expect_rank(&initial, 4, "latents", &latents)?;
            let mut sd = StableDiffusion::load(&model, DType::F32, &device)?;
            sd.truncate_long_prompts = true; // as the reference pipeline, for parity checks
            let trigger_text = super::with_region_prompts(&prompt, &region_prompt);
            super::apply_concepts(&mut sd, &concept, &gate, &trigger_text)?;
            super::apply_ip_adapter(&mut sd, &ip)?;
            if !region.is_empty() {
                let (_, _, h, w) = initial.dims4()?;
                let f = sd.vae_scale_factor();
                sd.set_regions(&prompt, &region, w * f, h * f, guidance > 1.0)?;
            }
            let region_prompts = {
                let (_, _, h, w) = initial.dims4()?;
                let f = sd.vae_scale_factor();
                sd.read_region_prompts(&region_prompt, w * f, h * f)?
            };
            let opts = SampleOptions {
                prompt,
                negative_prompt,
                scheduler,
                karras,
                steps,
                guidance,
                guidance_rescale,
                clip_skip,
                region_prompts,
                progress: false,
            };
            if let Some(mask) = &mask {
                let (_, _, h, w) = initial.dims4()?;
                let f = sd.vae_scale_factor();
                let (height, width) = (h * f, w * f);
                let given = |name: &str| -> Result<Option<Tensor>> {
                    match inputs.get(name) {
                        None => Ok(None),
                        Some(t) => {
                            if t.dims() != initial.dims() {
                                bail!(
                                    "{}: '{name}' must be {:?} like 'latents', got {:?}",
                                    latents.display(),
                                    initial.dims(),
                                    t.dims()
                                )
                            }
                            Ok(Some(t.to_dtype(DType::F32)?))
                        }
                    }
                };
                let (image_latents, masked) =
                    (given("image_latents")?, given("masked_image_latents")?);
                let (latent_mask, encoded, encoded_masked) = match (&init_image, &image_latents, &masked) {
                    (_, Some(_), Some(_)) => {
                        let (_, m) = imprint_pipeline::image_io::read_mask(mask, width, height, f, &device)?;
                        (m, None, None)
                    }
                    (Some(img), _, _) => {
                        let rgb = imprint_pipeline::image_io::read_rgb(img)?;
                        let pixels = imprint_pipeline::image_io::rgb_to_tensor(&rgb, width, height, &device)?;
                        let (m, _, a, b) = sd.inpainting_inputs(&pixels, mask, width, height, &mut SeededNoise::new(seed))?;
                        (m, Some(a), Some(b))
                    }
                    (None, _, _) => bail!("inpainting needs --init-image, or 'image_latents' and 'masked_image_latents' in {}", latents.display()),
                };
                let inpaint = imprint_pipeline::Inpainting {
                    mask: latent_mask,
                    image_latents: image_latents.or(encoded).context("image latents")?,
                    masked_image_latents: masked.or(encoded_masked),
                    noise: initial.clone(),
                };
                let result = sd.sample_inpaint(
                    &opts,
                    strength,
                    &initial,
                    &inpaint,
                    &mut SeededNoise::new(seed),
                )?;
                let out = HashMap::from([(
                    "latents".to_string(),
                    result.contiguous()?.to_device(&Device::Cpu)?,
                )]);
                return save_safetensors_atomic(&output, &out, None);
            }
            if init_image.is_some() {
                bail!("--init-image in debug sample is for inpainting: give --mask too")
            }
            let result = match inputs.get("noise") {
                Some(noise) => {
                    if noise.rank() != 5
                        || noise.dim(0)? == 0
                        || noise.dims()[1..] != *initial.dims()
                    {
                        bail!(
                            "{}: 'noise' must be [N, {}] with N ≥ 1, got {:?}",
                            latents.display(),
                            initial
                                .dims()
                                .iter()
                                .map(|d| d.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            noise.dims()
                        )
                    }
                    let draws = noise.chunk(noise.dim(0)?, 0)?;
                    sd.sample(&opts, &initial, &mut QueuedNoise::new(draws))?
                }
                None => sd.sample(&opts, &initial, &mut SeededNoise::new(seed))?,
            };
            let out = HashMap::from([(
                "latents".to_string(),
                result.contiguous()?.to_device(&Device::Cpu)?,
            )]);
            save_safetensors_atomic(&output, &out, None)
        }
    }
}
