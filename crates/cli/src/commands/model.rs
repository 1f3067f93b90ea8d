//! `imprint model init`.

use anyhow::Result;
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
}

pub fn run(c: ModelCommand) -> Result<()> {
    match c {
        ModelCommand::Init { config, out, seed } => {
            write_random_model(config, &out, seed)?;
            println!("{}", out.display());
            Ok(())
        }
    }
}
