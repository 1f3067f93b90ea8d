//! `imprint generate`.

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use imprint_models::schedulers::SchedulerKind;
use imprint_pipeline::{image_io, GenerateOptions, InitImage, StableDiffusion};
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// Diffusers model folder.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Output PNG. With --num-images N > 1 the images go to OUT-0.png … and OUT is their grid.
    #[arg(long)]
    out: PathBuf,
    /// Starting image for img2img.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img / inpainting: how far from the init image to go (0 keeps it, 1 ignores it);
    /// default 0.8 for img2img and 1.0 for inpainting, as diffusers' pipelines.
    #[arg(long)]
    strength: Option<f64>,
    /// Inpainting (with --init-image): repaint where this mask is white (binarized at 0.5,
    /// resized to the image). Inpainting models (9-channel UNet) and regular ones both work.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Inpainting: paste the original pixels back outside the mask.
    #[arg(long)]
    keep_unmasked: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Defaults to the model's native size.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Rescale the guided prediction toward the text prediction's spread (diffusers'
    /// guidance_rescale; Lin et al. suggest 0.7 for zero-terminal-SNR models).
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// ddim, euler, euler-a, dpm++2m or ddpm.
    #[arg(long, default_value = "dpm++2m")]
    scheduler: SchedulerKind,
    /// Karras sigmas (euler, euler-a, dpm++2m).
    #[arg(long)]
    karras: bool,
    /// Use the text encoder's output this many layers before the last.
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Apply a concept file (textual inversion: native, diffusers or A1111; P+: native or kohya
    /// XTI; LoRA: kohya, diffusers/PEFT or native; Perfusion: native), optionally at a scale:
    /// `--concept toy.safetensors:0.8`. Repeatable; several concepts add up, each at its own
    /// scale. `FILE@LAYERS` applies a concept's words to some UNet layers only (`down`, `mid`,
    /// `up`, module paths, kohya names IN01…OUT11, indices 0-5): style mixing with another concept
    /// applied to the rest.
    #[arg(long, value_name = "FILE[@LAYERS][:SCALE]", value_parser = super::parse_concept_arg)]
    concept: Vec<super::ConceptArg>,
    #[command(flatten)]
    gate: super::GateArgs,
    #[command(flatten)]
    ip: super::IpAdapterArgs,
    /// Regional prompting: WORD acts only inside MASK (white), by cross-attention masking, so two
    /// subjects of one prompt do not blend (`--region "<a>:left.png" --region "<b>:right.png"`).
    /// Repeatable; txt2img.
    #[arg(long, value_name = "WORD:MASK", value_parser = super::parse_region_arg)]
    region: Vec<(String, PathBuf)>,
    /// Regional prompts (latent couple, MultiDiffusion): PROMPT is denoised inside MASK (white;
    /// gray blends it with the rest) and --prompt everywhere no region covers, each prompt with
    /// its own noise prediction, so subjects stay apart even where one prompt naming both would
    /// draw neither (`--prompt "a gray background" --region-prompt "a <a>:left.png"
    /// --region-prompt "a <b>:right.png"`). Repeatable; costs one more UNet row per region.
    #[arg(long, value_name = "PROMPT:MASK", value_parser = super::parse_region_prompt_arg)]
    region_prompt: Vec<(String, PathBuf)>,
    /// Bias correction: sample the categories of ATTRIBUTE in equal proportion, with the
    /// inclusive tokens of a `--concept` made by `imprint train debias --attribute ATTRIBUTE`
    /// (image i gets category i mod M's words appended to the prompt).
    #[arg(long, value_name = "ATTRIBUTE")]
    balance: Option<String>,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    device: String,
}

/// The inclusive tokens of `attribute` among the concepts a user applies.
fn balance_tokens(
    concepts: &[super::ConceptArg],
    attribute: &str,
) -> Result<imprint_concepts::inclusive::InclusiveTokens> {
    let mut seen = vec![];
    for c in concepts {
        let concept = imprint_concepts::formats::load_any(&c.path)?;
        if let Some(t) = imprint_concepts::inclusive::inclusive_tokens(&concept) {
            if t.attribute == attribute {
                return Ok(t);
            }
            seen.push(t.attribute);
        }
    }
    if seen.is_empty() {
        bail!("--balance {attribute}: no --concept holds inclusive tokens; make them with `imprint train debias --attribute {attribute}` and pass the file with --concept")
    }
    bail!(
        "--balance {attribute}: the applied concepts balance {} instead",
        seen.join(", ")
    )
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.out
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        != Some("png".into())
    {
        bail!("{}: --out must be a .png file", a.out.display())
    }
    // Refuse an unwritable destination before minutes of generation, not after.
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{}: output folder {} does not exist",
                a.out.display(),
                parent.display()
            )
        }
    }
    let device = super::parse_device(&a.device)?;
    let balance = match &a.balance {
        Some(attr) => {
            if !a.region.is_empty() {
                bail!("--balance and --region cannot be combined")
            }
            // The category words go into --prompt, which region prompts replace where they lie.
            if !a.region_prompt.is_empty() {
                bail!("--balance and --region-prompt cannot be combined")
            }
            Some(balance_tokens(&a.concept, attr)?)
        }
        None => None,
    };
    let mut sd = StableDiffusion::load(&a.model, DType::F32, &device)?;
    let checked_prompt = match &balance {
        Some(t) => format!("{} {}", a.prompt, t.categories[0].1),
        None => super::with_region_prompts(&a.prompt, &a.region_prompt),
    };
    super::apply_concepts(&mut sd, &a.concept, &a.gate, &checked_prompt)?;
    super::apply_ip_adapter(&mut sd, &a.ip)?;
    if !a.region.is_empty() {
        if a.init_image.is_some() {
            bail!("--region works with txt2img; drop --init-image")
        }
        let size = sd.default_size();
        sd.set_regions(
            &a.prompt,
            &a.region,
            a.width.unwrap_or(size),
            a.height.unwrap_or(size),
            a.guidance > 1.0,
        )?;
    }
    let opts = GenerateOptions {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        scheduler: a.scheduler,
        karras: a.karras,
        steps: a.steps,
        guidance: a.guidance,
        guidance_rescale: a.guidance_rescale,
        clip_skip: a.clip_skip,
        seed: a.seed,
        num_images: a.num_images,
        width: a.width,
        height: a.height,
        mask: a.mask.clone(),
        keep_unmasked: a.keep_unmasked,
        region_prompts: a.region_prompt.clone(),
        init_image: a.init_image.map(|path| InitImage {
            path,
            strength: a
                .strength
                .unwrap_or(if a.mask.is_some() { 1.0 } else { 0.8 }),
        }),
        progress: true,
    };
    let images = match &balance {
        None => sd.generate(&opts)?,
        Some(tokens) => {
            // Image i: category i mod M's words, seed + i (as image i of a plain batch).
            let m = tokens.categories.len();
            for (k, (category, _)) in tokens.categories.iter().enumerate() {
                let count = (opts.num_images + m - 1 - k) / m;
                eprintln!("{}: {count} image(s) of '{category}'", tokens.attribute);
            }
            let prompts = imprint_concepts::inclusive::balanced_prompts(
                &opts.prompt,
                tokens,
                opts.num_images,
            );
            let mut images = Vec::with_capacity(prompts.len());
            for (i, prompt) in prompts.into_iter().enumerate() {
                let o = GenerateOptions {
                    prompt,
                    num_images: 1,
                    seed: opts.seed + i as u64,
                    ..opts.clone()
                };
                images.extend(sd.generate(&o)?);
            }
            images
        }
    };
    if images.len() == 1 {
        image_io::save_png(&images[0], &a.out)?;
        println!("{}", a.out.display());
        return Ok(());
    }
    let stem = a.out.with_extension("");
    for (i, img) in images.iter().enumerate() {
        let p = PathBuf::from(format!("{}-{i}.png", stem.display()));
        image_io::save_png(img, &p)?;
        println!("{}", p.display());
    }
    image_io::save_png(&image_io::grid(&images)?, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}
