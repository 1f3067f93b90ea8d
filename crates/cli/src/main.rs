//! `imprint`: personalize Stable Diffusion. A thin command line over the library crates.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "imprint",
    version,
    about = "Teach Stable Diffusion a new concept from a few images, and generate with it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a concept (textual-inversion / ti).
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Generate images from a prompt (txt2img, or img2img with --init-image).
    Generate(commands::generate::GenerateArgs),
    /// Parity and inspection commands (tokenize, forward, sample).
    #[command(subcommand)]
    Debug(commands::debug::DebugCommand),
    /// Time one UNet step of a mode (forward, ti, ...) and print one JSON line.
    Bench(commands::bench::BenchArgs),
    /// Concept files: inspect, convert between formats.
    #[command(subcommand)]
    Concept(commands::concept::ConceptCommand),
    /// Model folders (init: random weights in a real architecture).
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Train(c) => commands::train::run(c),
        Command::Debug(c) => commands::debug::run(c),
        Command::Model(c) => commands::model::run(c),
        Command::Concept(c) => commands::concept::run(c),
        Command::Bench(a) => commands::bench::run(a),
    };
    if let Err(e) = result {
        // One line: the context chain from outer to inner.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
