//! `imprint world`: the toy world — training its base model and evaluators, writing a held-out
//! concept's reference images, and benchmarking the personalization methods in it.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use imprint_world::recipe::{train_world_phases, Recipe};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum WorldCommand {
    /// Train the world's base model (VAE, CLIP text encoder, UNet) and evaluators (CLIP, ViT)
    /// from scratch; resumes an interrupted run in the same --out.
    Train(TrainArgs),
    /// Write reference images (PNG + caption .txt) of held-out concept K.
    Concept(ConceptArgs),
    /// Train each method on held-out concepts and measure fidelity against editability; one
    /// JSON line per method (and a baseline row), plus OUT/report.html.
    Bench(BenchArgs),
    /// Write the colour categories of the world's bias (DIR/<colour>/NN.png: one circle of that
    /// colour per scene), the --categories folder of `imprint train debias`.
    Categories(CategoriesArgs),
    /// Measure how well a model follows the world's captions: random captions are sampled and
    /// read back (background, object colours and places, object count), next to the same samples
    /// scored against other captions and to the renderer's own pictures.
    Follow(FollowArgs),
}

#[derive(Args)]
pub struct FollowArgs {
    /// The model folder (diffusers layout).
    #[arg(long, default_value = "examples/world/model")]
    pub model: PathBuf,
    /// How many captions (one sample each).
    #[arg(long, default_value_t = 64)]
    pub captions: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale (the world bench samples at 5).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// diffusers' guidance_rescale (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Write the samples, the renders and report.html here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON line per attribute (else a table).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CategoriesArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Images per colour.
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The world folder (model/, clip/, dino/).
    #[arg(long, default_value = "examples/world")]
    pub world: PathBuf,
    /// Comma-separated: ti, xti, perfusion, lora, dreambooth, custom-diffusion, svdiff, encoder,
    /// encoder+tune.
    #[arg(
        long,
        default_value = "ti,xti,perfusion,lora,dreambooth,custom-diffusion,svdiff,encoder,encoder+tune",
        value_delimiter = ','
    )]
    pub methods: Vec<String>,
    /// Comma-separated held-out concept ids.
    #[arg(long, default_value = "0,1,2", value_delimiter = ',')]
    pub concepts: Vec<usize>,
    /// Reference images per concept.
    #[arg(long, default_value_t = 5)]
    pub references: usize,
    /// Samples per editability prompt.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Multiply every method's training steps.
    #[arg(long, default_value_t = 1.0)]
    pub steps_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Work folder: concepts, samples, report.html.
    #[arg(long, default_value = "world-bench")]
    pub out: PathBuf,
    /// One JSON line per method (else a table).
    #[arg(long)]
    pub json: bool,
    /// Uses of a concept to measure too (comma-separated): debias, multi, style.
    #[arg(long, value_delimiter = ',')]
    pub uses: Vec<String>,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Output folder: model/ (diffusers layout), clip/, dino/, train-log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// The recipe's seed (default: the --recipe file's, else 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Multiply every phase's steps (and the checkpoint interval) by this, after --recipe (e.g.
    /// 0.01 for a quick look at the recipe).
    #[arg(long, default_value_t = 1.0)]
    pub steps_scale: f64,
    /// Store the finished weights as float16 (the committed copy).
    #[arg(long)]
    pub half: bool,
    /// A JSON object of recipe fields to change (e.g. {"vae_steps": 3000}); the run's whole recipe
    /// (after --seed and --steps-scale) is written to OUT/recipe.json, and a folder is resumed
    /// only with the options that made it.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Run only these phases (vae, clip, unet, dino), e.g. a new VAE into a new folder to compare
    /// its round trips (`world follow`'s VAE column) before training the rest.
    #[arg(long, value_delimiter = ',')]
    pub phases: Vec<String>,
    #[arg(long, env = "IMPRINT_DEVICE", default_value = "cpu")]
    pub device: String,
}

#[derive(Args)]
pub struct ConceptArgs {
    /// Held-out concept id (see `imprint world concept --list`).
    #[arg(long, required_unless_present = "list")]
    pub id: Option<usize>,
    #[arg(long, default_value_t = 5)]
    pub count: usize,
    #[arg(long, required_unless_present = "list")]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Name the concept with this phrase in the captions (e.g. "<checker-star>" or "sks star")
    /// instead of its class word, ready for `train … --templates captions` or a LoRA.
    #[arg(long)]
    pub subject: Option<String>,
    /// List the held-out concepts.
    #[arg(long)]
    pub list: bool,
}

pub fn run(c: WorldCommand) -> Result<()> {
    match c {
        WorldCommand::Train(a) => {
            let mut r = match &a.recipe {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("{}: cannot read", path.display()))?;
                    serde_json::from_str::<Recipe>(&text)
                        .with_context(|| format!("{}: not a world recipe", path.display()))?
                }
                None => Recipe::default(),
            };
            if let Some(seed) = a.seed {
                r.seed = seed;
            }
            if a.half && !a.phases.is_empty() {
                bail!("--half stores a whole world in float16: run it without --phases once every phase is done")
            }
            // A phase set to 0 steps stays skipped; any other keeps at least one step.
            let scale = |n: usize| match n {
                0 => 0,
                n => ((n as f64 * a.steps_scale).round() as usize).max(1),
            };
            r.vae_steps = scale(r.vae_steps);
            r.clip_steps = scale(r.clip_steps);
            r.unet_eps_steps = scale(r.unet_eps_steps);
            r.unet_steps = scale(r.unet_steps);
            r.dino_steps = scale(r.dino_steps);
            r.save_every = scale(r.save_every);
            let device = super::parse_device(&a.device)?;
            let phases: Vec<&str> = if a.phases.is_empty() {
                imprint_world::recipe::PHASES.to_vec()
            } else {
                a.phases.iter().map(String::as_str).collect()
            };
            train_world_phases(&a.out, &r, &device, &phases)?;
            if a.half {
                imprint_world::recipe::to_half(&a.out)?;
            }
            eprintln!("world written to {}", a.out.display());
            Ok(())
        }
        WorldCommand::Bench(a) => {
            let cfg = imprint_world::bench::BenchConfig {
                exe: std::env::current_exe().context("cannot find the imprint executable")?,
                model: a.world.join("model"),
                clip: a.world.join("clip"),
                dino: a.world.join("dino"),
                encoder: a.world.join("encoder"),
                methods: a.methods,
                concepts: a.concepts,
                references: a.references,
                samples: a.samples,
                steps_scale: a.steps_scale,
                seed: a.seed,
                out: a.out.clone(),
                uses: a.uses,
            };
            let outcome = imprint_world::bench::run_bench(&cfg, |line| eprintln!("{line}"))?;
            let rows = &outcome.rows;
            if a.json {
                for r in rows {
                    println!("{}", serde_json::to_string(r)?);
                }
                for u in &outcome.uses {
                    println!("{}", serde_json::to_string(u)?);
                }
            } else {
                println!(
                    "{:<18} {:>7} {:>7} {:>7} {:>10} {:>12} {:>8}",
                    "method", "DINO", "CLIP-I", "CLIP-T", "attributes", "size_bytes", "train_s"
                );
                for r in rows {
                    println!(
                        "{:<18} {:>7.3} {:>7.3} {:>7.3} {:>10.3} {:>12} {:>8.0}",
                        r.method,
                        r.fidelity.dino,
                        r.fidelity.clip_i,
                        r.editability.clip_t,
                        r.editability.attributes,
                        r.size_bytes,
                        r.train_s
                    );
                }
            }
            if !a.json {
                for u in &outcome.uses {
                    println!("{}", serde_json::to_string(u)?);
                }
            }
            eprintln!("report: {}", a.out.join("report.html").display());
            Ok(())
        }
        WorldCommand::Follow(a) => {
            let cfg = imprint_world::follow::FollowConfig {
                model: a.model,
                captions: a.captions,
                seed: a.seed,
                steps: a.steps,
                guidance: a.guidance,
                guidance_rescale: a.guidance_rescale,
                out: a.out.clone(),
            };
            let bar = indicatif::ProgressBar::new(a.captions as u64);
            let table = imprint_world::follow::run_follow(&cfg, |line| {
                bar.inc(1);
                bar.set_message(line.to_string());
            })?;
            bar.finish_and_clear();
            if a.json {
                for row in &table {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                println!(
                    "{:<28} {:>6} {:>8} {:>20} {:>9} {:>15}",
                    "attribute",
                    "asked",
                    "samples",
                    "ignoring the caption",
                    "rendered",
                    "through the VAE"
                );
                for r in &table {
                    println!(
                        "{:<28} {:>6} {:>8.3} {:>20.3} {:>9.3} {:>15.3}",
                        r.attribute,
                        r.asked,
                        r.samples,
                        r.ignoring_caption,
                        r.rendered,
                        r.through_vae
                    );
                }
            }
            if let Some(out) = &a.out {
                eprintln!("report: {}", out.join("report.html").display());
            }
            Ok(())
        }
        WorldCommand::Categories(a) => {
            let colors = imprint_world::uses::DEBIAS_COLORS;
            imprint_world::uses::write_color_categories(&a.out, &colors, a.count, a.seed)?;
            for c in colors {
                println!("{}", a.out.join(c.word()).display());
            }
            Ok(())
        }
        WorldCommand::Concept(a) => {
            if a.list {
                for c in imprint_world::held_out::HELD_OUT.iter() {
                    println!("{}\t{}\t{}\t{}", c.id, c.name, c.class_word, c.description);
                }
                return Ok(());
            }
            let (Some(k), Some(out)) = (a.id, a.out) else {
                unreachable!("clap requires --id and --out")
            };
            let n = imprint_world::held_out::HELD_OUT.len();
            if k >= n {
                anyhow::bail!("held-out concept {k} does not exist (ids 0–{})", n - 1)
            }
            let scenes = imprint_world::held_out::concept_reference_scenes(k, a.count, a.seed);
            imprint_world::held_out::write_references(&scenes, a.subject.as_deref(), &out)?;
            eprintln!("{} images of concept {k} in {}", a.count, out.display());
            Ok(())
        }
    }
}
