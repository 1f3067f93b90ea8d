//! `imprint eval`: CLIP-I, CLIP-T and DINO of generated images (DreamBench's metrics), and
//! `imprint eval dreambench` for the whole protocol.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use imprint_eval::{dreambench, Evaluator};
use std::path::PathBuf;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    #[command(flatten)]
    pub scores: ScoreArgs,
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// The DreamBench protocol over google/dreambooth's dataset and a folder of samples
    /// (`SAMPLES/<subject>/<NN>/*.png`, NN the prompt's index); prints the paper's table.
    Dreambench(DreamBenchArgs),
    /// How generated images fall into an attribute's categories (a zero-shot CLIP classifier) and
    /// the KL divergence of that histogram from uniform, as ITI-GEN measures balance.
    Classify(ClassifyArgs),
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// Folder of generated images.
    #[arg(long)]
    pub generated: PathBuf,
    /// A transformers CLIPModel folder.
    #[arg(long)]
    pub clip: PathBuf,
    /// The categories, comma-separated (e.g. "red,green,blue,yellow").
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// The class prompt, `{}` standing for the category (e.g. "a {} circle").
    #[arg(long, default_value = "a photo of a {}")]
    pub template: String,
    #[arg(long)]
    pub json: bool,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Folder of generated images.
    #[arg(long)]
    pub generated: Option<PathBuf>,
    /// Folder of reference images of the concept.
    #[arg(long)]
    pub references: Option<PathBuf>,
    /// The prompt the images were generated from (with the class noun, not the new word).
    #[arg(long)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub models: ModelArgs,
    /// Print one compact JSON line (else indented JSON).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ModelArgs {
    /// A transformers CLIPModel folder (e.g. openai/clip-vit-base-patch32).
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// A transformers ViTModel folder (e.g. facebook/dino-vits16).
    #[arg(long)]
    pub dino: Option<PathBuf>,
    /// cpu, cuda[:N] or metal.
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct DreamBenchArgs {
    /// The dataset folder: `<subject>/*.jpg` and `prompts_and_classes.txt`.
    #[arg(long)]
    pub data: PathBuf,
    /// The samples folder: `<subject>/<NN>/*.png`.
    #[arg(long)]
    pub samples: PathBuf,
    /// The row's label in the table.
    #[arg(long, default_value = "samples")]
    pub method: String,
    #[command(flatten)]
    pub models: ModelArgs,
    /// Print the result (with per-subject scores) as JSON.
    #[arg(long)]
    pub json: bool,
}

fn evaluator(m: &ModelArgs) -> Result<Evaluator> {
    let (Some(clip), Some(dino)) = (&m.clip, &m.dino) else {
        bail!("--clip DIR and --dino DIR are required (a CLIPModel and a ViTModel folder)")
    };
    let device = super::parse_device(&m.device)?;
    Evaluator::load(clip, dino, &device)
}

pub fn run(a: EvalArgs) -> Result<()> {
    match a.command {
        Some(EvalCommand::Dreambench(d)) => {
            let ev = evaluator(&d.models)?;
            let result = dreambench::run(&ev, &d.data, &d.samples, |s| eprintln!("scored {s}"))?;
            if d.json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                print!("{}", result.table(&d.method));
            }
            Ok(())
        }
        Some(EvalCommand::Classify(c)) => {
            let device = super::parse_device(&c.device)?;
            let clip = imprint_eval::ClipModel::load(&c.clip, &device)?;
            let images = imprint_eval::metrics::read_images(&c.generated)?;
            let h = imprint_eval::attribute::histogram(&clip, &images, &c.categories, &c.template)?;
            if c.json {
                println!("{}", serde_json::to_string(&h)?);
            } else {
                for (cat, n) in h.categories.iter().zip(&h.counts) {
                    println!(
                        "{cat:>16} {n:>5} {:5.1} %",
                        100.0 * *n as f64 / images.len() as f64
                    );
                }
                println!(
                    "KL from uniform: {:.4} (0 = balanced, {:.4} = one category)",
                    h.kl_uniform,
                    (h.categories.len() as f64).ln()
                );
            }
            Ok(())
        }
        None => {
            let s = a.scores;
            let (Some(generated), Some(references), Some(prompt)) =
                (&s.generated, &s.references, &s.prompt)
            else {
                bail!("imprint eval needs --generated DIR --references DIR --prompt TEXT --clip DIR --dino DIR (or the dreambench subcommand)")
            };
            let ev = evaluator(&s.models)?;
            let scores = ev.score_dirs(generated, references, prompt)?;
            if s.json {
                println!("{}", serde_json::to_string(&scores)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&scores)?);
            }
            Ok(())
        }
    }
}
