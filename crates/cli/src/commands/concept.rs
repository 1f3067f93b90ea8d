//! `imprint concept inspect | convert`: look into a concept file, or translate it between the
//! formats users exchange.

use anyhow::{Context, Result};
use clap::Subcommand;
use imprint_concepts::formats::{self, Format};
use imprint_concepts::Concept;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ConceptCommand {
    /// Show a concept file's trigger, method, vectors (count, dimension, norms), base model and
    /// format.
    Inspect {
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a concept file to another format (native, diffusers or a1111).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// native (imprint .safetensors with metadata), diffusers (learned_embeds.safetensors) or
        /// a1111 (emb_params .safetensors, also read by kohya; A1111 names it by file name).
        #[arg(long)]
        format: Format,
        /// Rename the trigger word.
        #[arg(long)]
        trigger: Option<String>,
    },
}

fn describe(path: &Path, concept: &Concept, format: Format) -> Result<serde_json::Value> {
    let mut embeddings = Vec::new();
    for e in &concept.embeddings {
        embeddings.push(serde_json::json!({
            "encoder": e.encoder,
            "vectors": e.num_vectors(),
            "dim": e.dim(),
            "norms": e.norms().with_context(|| path.display().to_string())?,
        }));
    }
    Ok(serde_json::json!({
        "file": path.display().to_string(),
        "format": format.name(),
        "trigger": concept.trigger,
        "method": concept.method,
        "vectors": concept.num_vectors(),
        "dim": concept.dim(),
        "base_model": concept.base_model,
        "embeddings": embeddings,
        "metadata": concept.metadata,
    }))
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let (concept, format) = formats::load_with_format(file)?;
    if json {
        println!("{}", describe(file, &concept, format)?);
        return Ok(());
    }
    println!("file:       {}", file.display());
    println!("format:     {format}");
    println!("trigger:    {}", concept.trigger);
    println!("method:     {}", concept.method);
    println!(
        "base model: {}",
        concept.base_model.as_deref().unwrap_or("(not recorded)")
    );
    for e in &concept.embeddings {
        let norms: Vec<String> = e.norms()?.iter().map(|n| format!("{n:.4}")).collect();
        println!(
            "{}: {} vector{} × {} dims, norms {}",
            e.encoder,
            e.num_vectors(),
            if e.num_vectors() == 1 { "" } else { "s" },
            e.dim(),
            norms.join(", ")
        );
    }
    for (k, v) in &concept.metadata {
        println!("  {k} = {v}");
    }
    Ok(())
}

fn convert(input: &Path, output: &Path, format: Format, trigger: Option<String>) -> Result<()> {
    let mut concept = formats::load_any(input)?;
    if let Some(t) = trigger {
        concept.trigger = t;
    }
    formats::save(&concept, output, format)?;
    if format == Format::A1111 {
        let stem = output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stem != concept.trigger {
            eprintln!(
                "note: A1111 names embeddings by file name: {} is triggered by '{stem}', not '{}'",
                output.display(),
                concept.trigger
            );
        }
    }
    let written = match format {
        Format::Diffusers => formats::diffusers::resolve(output),
        _ => output.to_path_buf(),
    };
    println!("{}", written.display());
    Ok(())
}

pub fn run(c: ConceptCommand) -> Result<()> {
    match c {
        ConceptCommand::Inspect { file, json } => inspect(&file, json),
        ConceptCommand::Convert {
            input,
            output,
            format,
            trigger,
        } => convert(&input, &output, format, trigger),
    }
}
