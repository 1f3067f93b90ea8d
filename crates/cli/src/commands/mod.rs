pub mod bench;
pub mod concept;
pub mod debug;
pub mod generate;
pub mod model;
pub mod train;

use anyhow::Result;
use imprint_pipeline::StableDiffusion;
use std::path::PathBuf;

pub use imprint_pipeline::parse_device;

/// `--concept FILE[:SCALE]`: a concept file and the scale its vectors are applied at.
#[derive(Clone, Debug)]
pub struct ConceptArg {
    pub path: PathBuf,
    pub scale: f64,
}

/// Splits `FILE[:SCALE]` on the last ':' only when what follows is a number, so a path that
/// itself contains ':' still works.
pub fn parse_concept_arg(s: &str) -> std::result::Result<ConceptArg, String> {
    if s.is_empty() {
        return Err("expected FILE or FILE:SCALE".into());
    }
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            if !scale.is_finite() {
                return Err(format!("scale {scale} is not a finite number"));
            }
            if path.is_empty() {
                return Err("expected FILE:SCALE, the file is missing".into());
            }
            return Ok(ConceptArg {
                path: path.into(),
                scale,
            });
        }
    }
    Ok(ConceptArg {
        path: s.into(),
        scale: 1.0,
    })
}

/// Applies each `--concept` in order, then warns (on stderr) if the prompt names none of them.
pub fn apply_concepts(
    sd: &mut StableDiffusion,
    concepts: &[ConceptArg],
    prompt: &str,
) -> Result<()> {
    for c in concepts {
        sd.apply_concept(&c.path, c.scale)?;
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
    }
}
