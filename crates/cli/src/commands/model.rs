//! `imprint model init | merge`.

use anyhow::{Context, Result};
use clap::Subcommand;
use imprint_models::init::{write_random_model, KnownConfig};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a diffusers folder with random weights in a real architecture (tests, examples, benchmarks).
    Init {
        /// tiny, tiny-sd2, sd15 or sd21.
        #[arg(long)]
        config: KnownConfig,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a new diffusers folder with LoRA and LyCORIS (LoHa, LoKr, (IA)³, diag-OFT) changes
    /// baked into the UNet and text encoder weights.
    Merge {
        #[arg(long)]
        model: PathBuf,
        /// A LoRA or LyCORIS file (kohya, diffusers/PEFT or native) at an optional scale. Repeatable.
        #[arg(long, required = true, value_name = "FILE[:SCALE]", value_parser = super::parse_concept_arg)]
        concept: Vec<super::ConceptArg>,
        /// The new folder; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Init { config, out, seed } => {
            write_random_model(config, &out, seed)?;
            println!("{}", out.display());
            Ok(())
        }
        ModelCommand::Merge {
            model,
            concept,
            out,
        } => {
            let mut concepts = Vec::new();
            for c in &concept {
                let loaded = imprint_concepts::formats::load_any(&c.path)?;
                if !loaded.embeddings.is_empty() {
                    eprintln!(
                        "warning: {}: its token embeddings are not merged (only LoRA and LyCORIS weights are); apply them with --concept when generating",
                        c.path.display()
                    );
                }
                concepts.push((loaded, c.scale));
            }
            let n = imprint_concepts::merge::merge_into_folder(&model, &concepts, &out)
                .with_context(|| format!("merging into {}", out.display()))?;
            eprintln!("merged {n} weight changes");
            println!("{}", out.display());
            Ok(())
        }
    }
}
