pub mod bench;
pub mod concept;
pub mod debias;
pub mod debug;
pub mod eval;
pub mod generate;
pub mod model;
pub mod personalize;
pub mod train;
pub mod world;

use anyhow::Result;
use imprint_pipeline::StableDiffusion;
use std::path::PathBuf;

pub use imprint_pipeline::parse_device;

/// `--concept FILE[@LAYERS][:SCALE]`: a concept file, the UNet layers its words apply to (all by
/// default; style mixing) and the scale it is applied at.
#[derive(Clone, Debug)]
pub struct ConceptArg {
    pub path: PathBuf,
    pub scale: f64,
    pub layers: Option<String>,
}

/// Splits `FILE[@LAYERS][:SCALE]`: the scale after the last ':' only when it is a number, the
/// layers after the last '@' only when they hold no path separator, so paths that themselves
/// contain ':' or '@' still work.
pub fn parse_concept_arg(s: &str) -> std::result::Result<ConceptArg, String> {
    if s.is_empty() {
        return Err("expected FILE, FILE:SCALE or FILE@LAYERS:SCALE".into());
    }
    let mut rest = s;
    let mut scale = 1.0;
    if let Some((path, number)) = s.rsplit_once(':') {
        if let Ok(value) = number.parse::<f64>() {
            if !value.is_finite() {
                return Err(format!("scale {value} is not a finite number"));
            }
            scale = value;
            rest = path;
        }
    }
    let mut layers = None;
    if let Some((path, spec)) = rest.rsplit_once('@') {
        if !spec.contains('/') && !spec.contains('\\') && !spec.is_empty() {
            layers = Some(spec.to_string());
            rest = path;
        }
    }
    if rest.is_empty() {
        return Err(format!(
            "expected FILE[@LAYERS][:SCALE], the file is missing in '{s}'"
        ));
    }
    Ok(ConceptArg {
        path: rest.into(),
        scale,
        layers,
    })
}

/// Overrides of a Perfusion concept's gate at generation (`--perfusion-beta`, `--perfusion-tau`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct GateArgs {
    /// Perfusion gate bias β for every applied Perfusion concept (the file's, default 0.7).
    #[arg(long)]
    pub perfusion_beta: Option<f64>,
    /// Perfusion gate temperature τ (the file's, default 0.15).
    #[arg(long)]
    pub perfusion_tau: Option<f64>,
}

/// `--region WORD:MASK`: the word (a concept's trigger, or any words of the prompt) and the mask
/// image of where it may act (white = inside).
pub fn parse_region_arg(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once(':') {
        Some((w, p)) if !w.trim().is_empty() && !p.is_empty() => {
            Ok((w.trim().to_string(), PathBuf::from(p)))
        }
        _ => Err(format!("expected WORD:MASK.png, got '{s}'")),
    }
}

/// `--region-prompt PROMPT:MASK`: a prompt and the mask image of where it is denoised (split at
/// the last colon: the prompt may hold one, the path should not).
pub fn parse_region_prompt_arg(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.rsplit_once(':') {
        Some((prompt, p)) if !prompt.trim().is_empty() && !p.trim().is_empty() => {
            Ok((prompt.trim().to_string(), PathBuf::from(p.trim())))
        }
        _ => Err(format!("expected PROMPT:MASK.png, got '{s}'")),
    }
}

/// The prompt and every region prompt as one text, for the check that applied concepts' triggers
/// are used (a trigger may stand in a region prompt only).
pub fn with_region_prompts(prompt: &str, region_prompts: &[(String, PathBuf)]) -> String {
    std::iter::once(prompt)
        .chain(region_prompts.iter().map(|(p, _)| p.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An image prompt through an IP-Adapter (`--ip-adapter FILE[:SCALE] --ip-image IMG`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct IpAdapterArgs {
    /// IP-Adapter weights in the h94/IP-Adapter layout (`.safetensors`, or the pickled `.bin`)
    /// with an optional scale (default 1): the image encoder is read from `image_encoder/`
    /// beside FILE.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub ip_adapter: Option<String>,
    /// The image prompt; repeatable (their image embeddings are averaged).
    #[arg(long, value_name = "IMG")]
    pub ip_image: Vec<PathBuf>,
    /// The adapter's image encoder (a CLIPVisionModelWithProjection folder), if not beside FILE.
    #[arg(long, value_name = "DIR")]
    pub image_encoder: Option<PathBuf>,
    /// Per-block scales in InstantStyle's form, e.g. '{"up": {"block_0": [0.0, 1.0, 0.0]}}'
    /// (a list per block gives each of its attentions a scale; blocks not named get 0), each
    /// multiplied by SCALE.
    #[arg(long, value_name = "JSON")]
    pub ip_adapter_blocks: Option<String>,
}

/// Loads the image prompt's adapter and images into `sd`, checking every input first.
pub fn apply_ip_adapter(sd: &mut StableDiffusion, a: &IpAdapterArgs) -> Result<()> {
    let Some(spec) = a.spec()? else {
        return Ok(());
    };
    let prompt = spec.load(sd.dtype, &sd.device)?;
    sd.apply_image_prompt(&prompt)
}

impl IpAdapterArgs {
    /// The image prompt asked for, if any; images or blocks without an adapter are an error.
    pub fn spec(&self) -> Result<Option<imprint_pipeline::ip_adapter::ImagePromptSpec>> {
        let Some(adapter) = &self.ip_adapter else {
            if !self.ip_image.is_empty() || self.ip_adapter_blocks.is_some() {
                anyhow::bail!("--ip-image and --ip-adapter-blocks need --ip-adapter FILE[:SCALE]")
            }
            return Ok(None);
        };
        Ok(Some(imprint_pipeline::ip_adapter::ImagePromptSpec {
            adapter: adapter.clone(),
            images: self.ip_image.clone(),
            image_encoder: self.image_encoder.clone(),
            blocks: self.ip_adapter_blocks.clone(),
        }))
    }
}

/// Applies each `--concept` in order, then warns (on stderr) if the prompt names none of them.
pub fn apply_concepts(
    sd: &mut StableDiffusion,
    concepts: &[ConceptArg],
    gate: &GateArgs,
    prompt: &str,
) -> Result<()> {
    for c in concepts {
        let options = imprint_pipeline::ConceptOptions {
            scale: c.scale,
            layers: c.layers.clone(),
            beta: gate.perfusion_beta,
            tau: gate.perfusion_tau,
        };
        sd.apply_concept_with(&c.path, &options)?;
    }
    if let Some(w) = sd.trigger_warning(prompt) {
        eprintln!("warning: {w}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concept_scale_is_split_on_the_last_colon_only_for_numbers() {
        let c = parse_concept_arg("a/b.safetensors:0.7").unwrap();
        assert_eq!((c.path, c.scale), (PathBuf::from("a/b.safetensors"), 0.7));
        let c = parse_concept_arg("a:b/c.pt").unwrap();
        assert_eq!((c.path, c.scale), (PathBuf::from("a:b/c.pt"), 1.0));
        let c = parse_concept_arg("x:y.pt:2").unwrap();
        assert_eq!((c.path, c.scale), (PathBuf::from("x:y.pt"), 2.0));
        assert!(parse_concept_arg(":1").is_err());
        let c = parse_concept_arg("a.safetensors@down,mid:0.5").unwrap();
        assert_eq!(
            (c.path, c.scale, c.layers),
            (PathBuf::from("a.safetensors"), 0.5, Some("down,mid".into()))
        );
        let c = parse_concept_arg("me@host/b.pt").unwrap();
        assert_eq!((c.path, c.layers), (PathBuf::from("me@host/b.pt"), None));
        assert!(parse_concept_arg("@up").is_err());
    }

    #[test]
    fn region_prompts_split_at_the_last_colon() {
        let (prompt, path) = parse_region_prompt_arg("a cat: on grass:masks/left.png").unwrap();
        assert_eq!(
            (prompt.as_str(), path),
            ("a cat: on grass", PathBuf::from("masks/left.png"))
        );
        for bad in ["a cat", ":left.png", "a cat:", "  :x.png"] {
            assert!(parse_region_prompt_arg(bad).is_err(), "{bad}");
        }
    }
}
