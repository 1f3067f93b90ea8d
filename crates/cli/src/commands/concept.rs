//! `imprint concept inspect | convert`: look into a concept file, or translate it between the
//! formats users exchange.

use anyhow::{Context, Result};
use clap::Subcommand;
use imprint_concepts::formats::{self, Format};
use imprint_concepts::Concept;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ConceptCommand {
    /// Show a concept file's trigger, method, vectors (count, dimension, norms), LoRA targets
    /// (network, module, rank, alpha), base model and format.
    Inspect {
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a concept file to another format (native, diffusers, a1111, kohya or svdiff).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// native (imprint .safetensors with metadata), diffusers (learned_embeds.safetensors for
        /// embeddings, pytorch_lora_weights.safetensors with lora_A/lora_B keys for LoRA), a1111
        /// (emb_params .safetensors; A1111 names it by file name) or kohya (lora_unet_…/lora_te_…
        /// LoRA; embeddings alone are written as a1111, which kohya reads; P+ per-layer
        /// embeddings as kohya's XTI file with keys IN01…OUT11) or svdiff (a folder with
        /// spectral_shifts.safetensors and spectral_shifts_te.safetensors).
        #[arg(long)]
        format: Format,
        /// Rename the trigger word.
        #[arg(long)]
        trigger: Option<String>,
    },
    /// Merge Custom Diffusion concepts into one with the paper's closed form: every concept's
    /// target captions keep their keys and values, regularization captions keep the base model's.
    Merge {
        /// The base model the concepts were trained on.
        #[arg(long)]
        model: PathBuf,
        /// Custom Diffusion concepts: diffusers folders or native files (two or more).
        #[arg(required = true, num_args = 2..)]
        concepts: Vec<PathBuf>,
        /// A .safetensors file (native) or a folder (diffusers' layout).
        #[arg(long)]
        out: PathBuf,
    },
}

fn merge(model: &Path, inputs: &[PathBuf], out: &Path) -> Result<()> {
    if out.exists() {
        anyhow::bail!("{}: already exists; choose a new --out", out.display())
    }
    let mut concepts = vec![];
    for p in inputs {
        concepts.push(formats::load_any(p)?);
    }
    let mut sd = imprint_pipeline::StableDiffusion::load(
        model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let captions = imprint_train::templates::everyday_captions(200);
    let merged = imprint_concepts::closed_form::merge_concepts(
        &mut sd.tokenizer,
        &mut sd.text_encoder,
        &mut sd.unet,
        &concepts,
        &captions,
    )?;
    let native = out.extension().is_some_and(|e| e == "safetensors");
    let format = if native {
        Format::Native
    } else {
        Format::Diffusers
    };
    formats::save(&merged.concept, out, format)?;
    eprintln!(
        "merged {} concepts on {} layers; worst constraint residual {:.2e} (max |W C_tgtᵀ − V_tgt| / max |V_tgt|)",
        concepts.len(),
        merged.layers,
        merged.residual
    );
    println!("{}", out.display());
    Ok(())
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
    let lora: Vec<serde_json::Value> = concept
        .lora
        .modules
        .iter()
        .map(|m| {
            serde_json::json!({
                "network": m.network,
                "module": m.module,
                "rank": m.rank(),
                "alpha": m.alpha,
                "kind": if m.is_conv() { "conv" } else { "linear" },
                "in": m.in_dim(),
                "out": m.out_dim(),
            })
        })
        .collect();
    let mut layers = Vec::new();
    for l in &concept.layer_embeddings {
        let norms: Vec<f32> = l.vectors.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
        layers.push(serde_json::json!({ "layer": l.layer, "norms": norms }));
    }
    let perfusion = match &concept.perfusion {
        None => serde_json::Value::Null,
        Some(p) => serde_json::json!({
            "superclass": p.superclass,
            "beta": p.beta,
            "tau": p.tau,
            "layers": p.layers.iter().map(|l| l.module.clone()).collect::<Vec<_>>(),
            "target_input_norm": p.target_input.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
        }),
    };
    let lycoris: Vec<serde_json::Value> = concept
        .lycoris
        .iter()
        .map(|m| serde_json::json!({"network": m.network, "module": m.module, "type": m.type_name()}))
        .collect();
    Ok(serde_json::json!({
        "file": path.display().to_string(),
        "lycoris": lycoris,
        "size_bytes": std::fs::metadata(formats::resolve(path)).map(|m| m.len()).ok(),
        "parameters": parameter_count(concept),
        "layer_embeddings": layers,
        "perfusion": perfusion,
        "lora": lora,
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

/// Numbers the concept holds (what training learned or what applying needs).
fn parameter_count(c: &Concept) -> usize {
    let embeddings: usize = c.embeddings.iter().map(|e| e.vectors.elem_count()).sum();
    let layers: usize = c
        .layer_embeddings
        .iter()
        .map(|l| l.vectors.elem_count())
        .sum();
    let lora: usize = c
        .lora
        .modules
        .iter()
        .map(|m| m.down.elem_count() + m.up.elem_count())
        .sum();
    let lycoris: usize = c.lycoris.iter().map(|m| m.parameter_count()).sum();
    let perfusion = c.perfusion.as_ref().map_or(0, |p| {
        p.target_input.elem_count()
            + p.target_input_cinv.elem_count()
            + p.layers
                .iter()
                .map(|l| l.key_output.elem_count() + l.value_output.elem_count())
                .sum::<usize>()
    });
    let projections: usize = c
        .projections
        .iter()
        .map(|p| p.weight.elem_count() + p.bias.as_ref().map_or(0, |b| b.elem_count()))
        .sum();
    let spectral: usize = c.spectral_shifts.iter().map(|s| s.delta.elem_count()).sum();
    let extra: usize = c.extra_tokens.iter().map(|(_, v)| v.elem_count()).sum();
    embeddings + layers + lora + lycoris + perfusion + projections + spectral + extra
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let (concept, format) = formats::load_with_format(file)?;
    if json {
        println!("{}", describe(file, &concept, format)?);
        return Ok(());
    }
    println!("file:       {}", file.display());
    println!("format:     {format}");
    if concept.trigger.is_empty() {
        println!("trigger:    (none recorded)");
    } else {
        println!("trigger:    {}", concept.trigger);
    }
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
    println!("parameters: {}", parameter_count(&concept));
    if let Ok(m) = std::fs::metadata(formats::resolve(file)) {
        println!("size:       {} bytes", m.len());
    }
    if let Some(first) = concept.layer_embeddings.first() {
        println!(
            "per-layer embeddings (P+): {} layers × {} vector{} × {} dims",
            concept.layer_embeddings.len(),
            first.vectors.dim(0)?,
            if first.vectors.dim(0)? == 1 { "" } else { "s" },
            first.vectors.dim(1)?
        );
        for l in &concept.layer_embeddings {
            let norms: Vec<String> = l
                .vectors
                .sqr()?
                .sum(1)?
                .sqrt()?
                .to_vec1::<f32>()?
                .iter()
                .map(|n| format!("{n:.4}"))
                .collect();
            println!("  {}  norms {}", l.layer, norms.join(", "));
        }
    }
    if let Some(p) = &concept.perfusion {
        println!(
            "perfusion: superclass '{}', gate beta {} tau {}, key/value targets on {} cross-attention layers",
            p.superclass,
            p.beta,
            p.tau,
            p.layers.len()
        );
    }
    for m in &concept.lycoris {
        println!("{}: LyCORIS {} on {}", m.network, m.type_name(), m.module);
    }
    for net in concept.lora.networks() {
        let modules: Vec<_> = concept.lora.on(net).collect();
        println!("{net}: LoRA on {} modules", modules.len());
        for m in modules {
            println!(
                "  {}  rank {}  alpha {}  ({} {}→{}{})",
                m.module,
                m.rank(),
                m.alpha,
                if m.is_conv() { "conv" } else { "linear" },
                m.in_dim(),
                m.out_dim(),
                if m.is_conv() {
                    format!(", {}×{}", m.kernel(), m.kernel())
                } else {
                    String::new()
                }
            );
        }
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
    if format == Format::A1111 || (format == Format::Kohya && concept.lora.is_empty()) {
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
        Format::Diffusers if !concept.projections.is_empty() => output.to_path_buf(),
        Format::Diffusers if !concept.lora.is_empty() => formats::diffusers_lora::resolve(output),
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
        ConceptCommand::Merge {
            model,
            concepts,
            out,
        } => merge(&model, &concepts, &out),
    }
}
