//! `imprint world bench`: every personalization method trained on held-out world concepts with
//! its recipe scaled to the world, then measured — fidelity (world DINO and CLIP-I of the samples
//! to the concept's reference images) against editability (world CLIP-T of the samples to the
//! prompt, and how many of the prompt's requested attributes the renderer's reader finds in
//! them) — beside a baseline that prompts the class word with no concept.
//!
//! Methods run as `imprint` subprocesses (the same commands a user runs), so the bench measures
//! exactly what ships. Everything goes under `--out`: per concept the references, per method the
//! trained concept, its log and its samples; `report.html` shows references, samples per prompt
//! and a fidelity-versus-editability scatter plot.

use crate::caption::Requested;
use crate::held_out::{
    concept, concept_reference_scenes, editability_prompts, HeldOutConcept, Prompt,
};
use crate::read::{read, Reading};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use image::RgbImage;
use imprint_eval::metrics::{mean_pairwise_cosine, read_images};
use imprint_eval::Evaluator;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The methods the bench knows, in table order.
pub const METHODS: [&str; 9] = [
    "ti",
    "xti",
    "perfusion",
    "lora",
    "dreambooth",
    "custom-diffusion",
    "svdiff",
    "encoder",
    "encoder+tune",
];

/// What a bench run does.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The `imprint` executable to run methods with.
    pub exe: PathBuf,
    /// The world's base model (diffusers folder) and evaluators.
    pub model: PathBuf,
    pub clip: PathBuf,
    pub dino: PathBuf,
    /// The world's concept encoder (`imprint train encoder`), for the encoder rows.
    pub encoder: PathBuf,
    pub methods: Vec<String>,
    pub concepts: Vec<usize>,
    /// Reference images per concept.
    pub references: usize,
    /// Samples per editability prompt.
    pub samples: usize,
    /// Multiplies every method's training steps (1 = the recipes below).
    pub steps_scale: f64,
    pub seed: u64,
    pub out: PathBuf,
    /// Uses of a concept to measure too ([`crate::uses::USES`]).
    pub uses: Vec<String>,
}

/// A bench run's results: the methods' rows and one JSON object per use.
#[derive(Clone, Debug)]
pub struct BenchOutcome {
    pub rows: Vec<Row>,
    pub uses: Vec<serde_json::Value>,
}

/// One row of the table: a method averaged over the concepts.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub method: String,
    pub concepts: Vec<usize>,
    pub fidelity: Fidelity,
    pub editability: Editability,
    /// Bytes a user keeps per concept (the concept file, or the fine-tuned weights).
    pub size_bytes: u64,
    /// Seconds of training per concept.
    pub train_s: f64,
    /// Seconds of sampling per concept.
    pub sample_s: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Fidelity {
    pub dino: f64,
    pub clip_i: f64,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Editability {
    pub clip_t: f64,
    /// Fraction of the prompts' requested attributes found in the samples.
    pub attributes: f64,
}

/// The new word each method learns for concept `k`, and the phrase that names the concept in
/// prompts (the class word for the baseline).
fn subject(method: &str, c: &HeldOutConcept) -> (Option<String>, String) {
    let token = format!("<world-{}>", c.id);
    match method {
        "ti" | "xti" | "perfusion" | "encoder" | "encoder+tune" => (Some(token.clone()), token),
        "lora" | "dreambooth" | "svdiff" => (Some("sks".into()), format!("sks {}", c.class_word)),
        "custom-diffusion" => (Some(token.clone()), format!("{token} {}", c.class_word)),
        _ => (None, c.class_word.to_string()),
    }
}

/// Runs one `imprint` command, keeping its output in `log`; a failure shows the log's tail.
pub(crate) fn run_command(cmd: &mut Command, what: &str, log: &Path) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(log, &text).ok();
    if !out.status.success() {
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
        bail!("{what} failed (log: {}):\n{tail}", log.display())
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

impl BenchConfig {
    /// A recipe's step count `n` scaled by `--steps-scale` (at least one step), as a flag value.
    pub(crate) fn steps(&self, n: f64) -> String {
        ((n * self.steps_scale).round() as usize).max(1).to_string()
    }
}

/// The bench's Textual Inversion recipe for a 64 px world model, besides its steps (400 of 4
/// images): also the per-category recipe of the debias use's `train debias --method ti`.
pub(crate) const TI_LR: &str = "5e-3";
pub(crate) const TI_BATCH: &str = "4";

/// Trains `method` on the references in `images`; returns (what to generate with, bytes kept).
/// The step counts are the papers' recipes shortened for a 64 px, few-million-parameter model.
pub(crate) fn train(
    cfg: &BenchConfig,
    method: &str,
    c: &HeldOutConcept,
    images: &Path,
    dir: &Path,
) -> Result<(Vec<String>, u64)> {
    let steps = |n: f64| cfg.steps(n);
    let (token, phrase) = subject(method, c);
    let token = token.unwrap_or_default();
    let model = cfg.model.display().to_string();
    let images = images.display().to_string();
    let seed = cfg.seed.to_string();
    let common = |out: &str| -> Vec<String> {
        [
            "--model",
            &model,
            "--images",
            &images,
            "--out",
            out,
            "--resolution",
            "64",
            "--seed",
            &seed,
            "--save-every",
            "100000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let instance = format!("a {phrase}");
    let class_prompt = format!("a {}", c.class_word);
    let class_dir = dir.join("class-images").display().to_string();
    let (out_name, extra) = match method {
        "ti" | "xti" => (
            "concept.safetensors",
            strings(&[
                "--token",
                &token,
                "--init-word",
                c.class_word,
                "--templates",
                "captions",
                "--steps",
                &steps(400.0),
                "--lr",
                TI_LR,
                "--batch-size",
                TI_BATCH,
                "--grad-accum",
                "1",
                "--lr-schedule",
                "constant",
            ]),
        ),
        "perfusion" => (
            "concept.safetensors",
            strings(&[
                "--token",
                &token,
                "--superclass",
                c.class_word,
                "--templates",
                "captions",
                // The same budget as the other methods (400 steps of 4 images); Perfusion's own
                // recipe accumulates 16 micro-batches per step, 12× the images.
                "--steps",
                &steps(400.0),
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
            ]),
        ),
        "lora" => (
            "concept.safetensors",
            strings(&[
                "--instance-prompt",
                &instance,
                "--rank",
                "4",
                "--steps",
                &steps(400.0),
                "--lr",
                "1e-3",
                "--batch-size",
                "4",
            ]),
        ),
        "dreambooth" => (
            "model",
            strings(&[
                "--instance-prompt",
                &instance,
                "--steps",
                &steps(300.0),
                "--lr",
                "5e-5",
                "--batch-size",
                "4",
                "--class-prompt",
                &class_prompt,
                "--class-images",
                &class_dir,
                "--num-class-images",
                "16",
                "--prior-weight",
                "1.0",
            ]),
        ),
        "custom-diffusion" => (
            "concept",
            strings(&[
                "--token",
                &token,
                "--init-word",
                c.class_word,
                "--instance-prompt",
                &instance,
                "--steps",
                &steps(250.0),
                "--batch-size",
                "2",
            ]),
        ),
        "encoder" | "encoder+tune" => ("concept.safetensors", vec![]),
        "svdiff" => (
            "concept.safetensors",
            strings(&[
                "--instance-prompt",
                &instance,
                "--steps",
                &steps(400.0),
                "--lr",
                "1e-3",
                "--batch-size",
                "4",
            ]),
        ),
        other => bail!("unknown method '{other}' (known: {})", METHODS.join(", ")),
    };
    let out = dir.join(out_name);
    let args: Vec<String> = if method.starts_with("encoder") {
        // One encoder pass (and 15 Textual Inversion steps for encoder+tune).
        let mut a = strings(&[
            "personalize",
            "--token",
            &token,
            "--class-word",
            c.class_word,
        ]);
        a.extend(strings(&[
            "--encoder",
            &cfg.encoder.display().to_string(),
            "--model",
            &model,
        ]));
        a.extend(strings(&[
            "--images",
            &images,
            "--out",
            &out.display().to_string(),
        ]));
        if method == "encoder+tune" {
            a.extend(strings(&["--tune-steps", "15"]));
        }
        a
    } else {
        let mut a: Vec<String> = vec!["train".into(), method.into()];
        a.extend(common(&out.display().to_string()));
        a.extend(extra);
        a
    };
    // DreamBooth makes a whole model; the others a concept applied to the base model.
    let (gen, kept) = if method == "dreambooth" {
        (
            vec!["--model".to_string(), out.display().to_string()],
            out.join("unet"),
        )
    } else {
        (
            vec!["--concept".to_string(), out.display().to_string()],
            out.clone(),
        )
    };
    // A rerun into the same --out trains afresh (the trainers refuse an existing output folder).
    for stale in [
        dir.join("concept.safetensors"),
        dir.join("model"),
        dir.join("concept"),
    ] {
        if stale.is_dir() {
            std::fs::remove_dir_all(&stale).ok();
        } else if stale.is_file() {
            std::fs::remove_file(&stale).ok();
        }
    }
    run_command(
        Command::new(&cfg.exe).args(&args),
        &format!("training {method} on concept {}", c.id),
        &dir.join("train.log"),
    )?;
    let size = if method == "dreambooth" {
        dir_size(&kept) + dir_size(&dir.join("model/text_encoder"))
    } else {
        dir_size(&kept)
    };
    Ok((gen, size))
}

/// Samples `n` images of `prompt` with the world's sampling settings into `out` (`out` itself
/// for one image; `OUT-<i>.png` and the grid at `out` for several) and reads them back. `extra`
/// are further `generate` arguments (concepts, regions; a `--model` of its own replaces the
/// world's).
pub(crate) fn sample_images(
    cfg: &BenchConfig,
    prompt: &str,
    extra: &[String],
    seed: u64,
    out: &Path,
    log: &Path,
    n: usize,
) -> Result<Vec<RgbImage>> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args([
        "generate",
        "--prompt",
        prompt,
        "--num-images",
        &n.to_string(),
    ]);
    cmd.args([
        "--steps",
        "25",
        "--guidance",
        "5",
        "--width",
        "64",
        "--height",
        "64",
    ]);
    cmd.args([
        "--seed",
        &seed.to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    if !extra.iter().any(|a| a == "--model") {
        cmd.args(["--model", &cfg.model.display().to_string()]);
    }
    cmd.args(extra);
    run_command(&mut cmd, &format!("sampling '{prompt}'"), log)?;
    if n == 1 {
        return Ok(vec![imprint_eval::preprocess::read_image_rgb(out)?]);
    }
    let stem = out.with_extension("");
    (0..n)
        .map(|i| {
            imprint_eval::preprocess::read_image_rgb(Path::new(&format!(
                "{}-{i}.png",
                stem.display()
            )))
        })
        .collect()
}

/// Scores the attributes a prompt asks for in one sample; returns (found, asked).
pub fn attribute_hits(
    requested: &Requested,
    concept_index: usize,
    c: &HeldOutConcept,
    reading: &Reading,
) -> (usize, usize) {
    let (mut hit, mut asked) = (0, 0);
    let mut check = |ok: bool| {
        asked += 1;
        if ok {
            hit += 1
        }
    };
    if let Some(k) = requested.background_kind {
        check(reading.background_kind == k);
    }
    if let Some(col) = requested.background_color {
        check(reading.background_color == col);
    }
    let colors = c.colors();
    // The concept's blob: one painted in the concept's colours, else the largest.
    let concept_blob = reading
        .objects
        .iter()
        .find(|b| colors.contains(&b.color))
        .or_else(|| reading.objects.first());
    for (i, o) in requested.objects.iter().enumerate() {
        if i == concept_index {
            if let Some(p) = o.position {
                check(concept_blob.is_some_and(|b| b.position == p));
            }
            if let Some(s) = o.size {
                check(concept_blob.is_some_and(|b| b.size == s));
            }
        } else {
            // A companion: some other blob with its colour (and place, where asked).
            let found = reading.objects.iter().any(|b| {
                !concept_blob.is_some_and(|cb| std::ptr::eq(cb, b))
                    && o.color.is_none_or(|col| b.color == col)
                    && o.position.is_none_or(|p| b.position == p)
            });
            check(found);
        }
    }
    (hit, asked)
}

struct Measured {
    dino: f64,
    clip_i: f64,
    clip_t: f64,
    hits: usize,
    asked: usize,
}

fn measure(
    eval: &Evaluator,
    refs: &imprint_eval::ImageFeatures,
    prompts: &[Prompt],
    samples: &[Vec<RgbImage>],
    c: &HeldOutConcept,
) -> Result<Measured> {
    let all: Vec<RgbImage> = samples.iter().flatten().cloned().collect();
    let f = eval.features(&all)?;
    let (mut clip_t, mut hits, mut asked) = (0.0, 0, 0);
    let mut offset = 0;
    for (p, imgs) in prompts.iter().zip(samples) {
        let text = eval.clip.prompt_features(&[&p.text(c.class_word)])?;
        let g = f.clip.narrow(0, offset, imgs.len())?;
        clip_t += mean_pairwise_cosine(&g, &text)? / prompts.len() as f64;
        offset += imgs.len();
        for img in imgs {
            let (h, a) = attribute_hits(&p.requested, p.concept_object, c, &read(img));
            hits += h;
            asked += a;
        }
    }
    Ok(Measured {
        dino: mean_pairwise_cosine(&f.dino, &refs.dino)?,
        clip_i: mean_pairwise_cosine(&f.clip, &refs.clip)?,
        clip_t,
        hits,
        asked,
    })
}

/// Runs the bench; `progress` hears one line per finished (method, concept).
pub fn run_bench(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<BenchOutcome> {
    crate::uses::check_uses(&cfg.uses)?;
    for m in &cfg.methods {
        if m != "baseline" && !METHODS.contains(&m.as_str()) {
            bail!("unknown method '{m}' (known: {})", METHODS.join(", "))
        }
    }
    if cfg.methods.iter().any(|m| m.starts_with("encoder")) && !cfg.encoder.is_dir() {
        bail!(
            "{}: no concept encoder for the encoder rows (make one with `imprint train encoder`, or leave encoder and encoder+tune out of --methods)",
            cfg.encoder.display()
        )
    }
    for &k in &cfg.concepts {
        if k >= crate::held_out::HELD_OUT.len() {
            bail!(
                "held-out concept {k} does not exist (ids 0–{})",
                crate::held_out::HELD_OUT.len() - 1
            )
        }
    }
    let eval = Evaluator::load(&cfg.clip, &cfg.dino, &Device::Cpu)?;
    let mut methods: Vec<String> = vec!["baseline".into()];
    methods.extend(cfg.methods.iter().filter(|m| *m != "baseline").cloned());
    let mut per_method: Vec<(String, Vec<(usize, Measured, u64, f64, f64)>)> =
        methods.iter().map(|m| (m.clone(), vec![])).collect();
    let mut report = Report::new(&cfg.out);
    for &k in &cfg.concepts {
        let c = concept(k);
        let cdir = cfg.out.join(format!("concept-{k}"));
        let refs_dir = cdir.join("references");
        let scenes = concept_reference_scenes(k, cfg.references, cfg.seed);
        crate::held_out::write_references(&scenes, None, &refs_dir)?;
        let refs = eval.features(&read_images(&refs_dir)?)?;
        report.references(k, &refs_dir, cfg.references);
        let prompts = editability_prompts(k);
        for (mi, m) in methods.iter().enumerate() {
            let mdir = cdir.join(m);
            std::fs::create_dir_all(&mdir)?;
            let (_, phrase) = subject(m, c);
            // The method's training images: the references, captioned with its word.
            let images = mdir.join("images");
            crate::held_out::write_references(&scenes, Some(&phrase), &images)?;
            let t0 = Instant::now();
            let (gen, size) = if m == "baseline" {
                (vec![], 0)
            } else {
                train(cfg, m, c, &images, &mdir)?
            };
            let train_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let mut samples = Vec::new();
            let sdir = mdir.join("samples");
            std::fs::create_dir_all(&sdir)?;
            for (pi, p) in prompts.iter().enumerate() {
                let imgs = sample_images(
                    cfg,
                    &p.text(&phrase),
                    &gen,
                    cfg.seed + pi as u64,
                    &sdir.join(format!("p{pi}.png")),
                    &mdir.join("sample.log"),
                    cfg.samples,
                )
                .with_context(|| format!("sampling {m} on concept {k}"))?;
                samples.push(imgs);
            }
            let sample_s = t1.elapsed().as_secs_f64();
            let measured = measure(&eval, &refs, &prompts, &samples, c)?;
            report.samples(k, m, &prompts, &phrase, &sdir, cfg.samples);
            progress(&format!(
                "concept {k} {m}: dino {:.3} clip-i {:.3} clip-t {:.3} attributes {}/{} ({train_s:.0} s training)",
                measured.dino, measured.clip_i, measured.clip_t, measured.hits, measured.asked
            ));
            per_method[mi]
                .1
                .push((k, measured, size, train_s, sample_s));
        }
    }
    let rows: Vec<Row> = per_method
        .into_iter()
        .map(|(method, runs)| {
            let n = runs.len().max(1) as f64;
            let (hits, asked) = runs
                .iter()
                .fold((0, 0), |(h, a), r| (h + r.1.hits, a + r.1.asked));
            Row {
                method,
                concepts: runs.iter().map(|r| r.0).collect(),
                fidelity: Fidelity {
                    dino: runs.iter().map(|r| r.1.dino).sum::<f64>() / n,
                    clip_i: runs.iter().map(|r| r.1.clip_i).sum::<f64>() / n,
                },
                editability: Editability {
                    clip_t: runs.iter().map(|r| r.1.clip_t).sum::<f64>() / n,
                    attributes: if asked == 0 {
                        0.0
                    } else {
                        hits as f64 / asked as f64
                    },
                },
                size_bytes: (runs.iter().map(|r| r.2).sum::<u64>() as f64 / n) as u64,
                train_s: runs.iter().map(|r| r.3).sum::<f64>() / n,
                sample_s: runs.iter().map(|r| r.4).sum::<f64>() / n,
            }
        })
        .collect();
    // The methods' table is written before the uses run, so a failing use loses nothing.
    report.finish(&rows)?;
    let mut uses = vec![];
    for u in &cfg.uses {
        if u == "debias" {
            let (result, html) = crate::uses::run_debias(cfg, &eval.clip)?;
            progress(&format!(
                "debias: KL from uniform {:.3} → ITI-GEN {:.3} / TI {:.3} (CLIP), {:.3} → {:.3} / {:.3} (read off the pixels)",
                result.before.kl_uniform,
                result.after.kl_uniform,
                result.ti_after.kl_uniform,
                result.before_read.kl_uniform,
                result.after_read.kl_uniform,
                result.ti_after_read.kl_uniform
            ));
            report.body += &html;
            uses.push(serde_json::to_value(&result)?);
        } else if u == "multi" {
            let (result, html) = crate::uses::run_multi(cfg, &eval)?;
            progress(&format!(
                "multi: {}",
                serde_json::to_string(&result.variants)?
            ));
            report.body += &html;
            uses.push(serde_json::to_value(&result)?);
        } else if u == "style" {
            let (result, html) = crate::uses::run_style(cfg, &eval.clip)?;
            progress(&format!("style: {}", serde_json::to_string(&result.cases)?));
            report.body += &html;
            uses.push(serde_json::to_value(&result)?);
        }
    }
    report.finish(&rows)?;
    Ok(BenchOutcome { rows, uses })
}

/// `report.html`: references, samples per prompt, and the scatter plot.
struct Report {
    out: PathBuf,
    body: String,
}

impl Report {
    fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            body: String::new(),
        }
    }

    fn rel(&self, p: &Path) -> String {
        p.strip_prefix(&self.out).unwrap_or(p).display().to_string()
    }

    fn references(&mut self, k: usize, dir: &Path, n: usize) {
        let c = concept(k);
        self.body += &format!(
            "<h2>Concept {k}: {} (class word “{}”)</h2><p>{}</p><div>",
            c.name,
            c.class_word,
            html_escape(c.description)
        );
        for i in 0..n {
            self.body += &format!(
                "<img src=\"{}\" width=96>",
                self.rel(&dir.join(format!("{i:02}.png")))
            );
        }
        self.body += "</div>";
    }

    fn samples(
        &mut self,
        _k: usize,
        method: &str,
        prompts: &[Prompt],
        phrase: &str,
        dir: &Path,
        n: usize,
    ) {
        self.body += &format!("<h3>{method}</h3><table><tr>");
        for (pi, p) in prompts.iter().enumerate() {
            self.body += &format!("<td><div class=p>{}</div>", html_escape(&p.text(phrase)));
            for i in 0..n {
                let f = if n == 1 {
                    dir.join(format!("p{pi}.png"))
                } else {
                    dir.join(format!("p{pi}-{i}.png"))
                };
                self.body += &format!("<img src=\"{}\" width=64>", self.rel(&f));
            }
            self.body += "</td>";
        }
        self.body += "</tr></table>";
    }

    fn finish(&self, rows: &[Row]) -> Result<()> {
        let mut table = String::from("<table class=t><tr><th>method</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>attributes</th><th>size</th><th>train s</th></tr>");
        for r in rows {
            table += &format!(
                "<tr><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{:.0}</td></tr>",
                r.method, r.fidelity.dino, r.fidelity.clip_i, r.editability.clip_t, r.editability.attributes, r.size_bytes, r.train_s
            );
        }
        table += "</table>";
        let html = format!(
            "<!doctype html><html><head><meta charset=utf-8><title>imprint world bench</title><style>body{{font-family:sans-serif}} img{{image-rendering:pixelated;margin:1px}} td{{vertical-align:top;padding:4px}} .p{{font-size:11px;width:140px}} .t td,.t th{{border-bottom:1px solid #ccc;text-align:right}}</style></head><body><h1>imprint world bench</h1><p>Fidelity (DINO, CLIP-I of samples to the references) against editability (CLIP-T to the prompt with the class word; share of requested attributes read back from the samples).</p>{table}{}{}</body></html>",
            scatter_svg(rows),
            self.body
        );
        imprint_models::io::write_atomic(&self.out.join("report.html"), html.as_bytes())?;
        imprint_models::io::write_atomic(
            &self.out.join("scatter.svg"),
            scatter_svg(rows).as_bytes(),
        )
    }
}

pub(crate) fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Fidelity (DINO, y) against editability (attribute accuracy, x), one labelled point per method.
pub fn scatter_svg(rows: &[Row]) -> String {
    let (w, h, m) = (480.0, 360.0, 50.0);
    let xs: Vec<f64> = rows.iter().map(|r| r.editability.attributes).collect();
    let ys: Vec<f64> = rows.iter().map(|r| r.fidelity.dino).collect();
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.15).max(0.02);
        (lo - pad, hi + pad)
    };
    let (x0, x1) = range(&xs);
    let (y0, y1) = range(&ys);
    let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    s += &format!(
        "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - m,
        w - m,
        h - m
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>",
        h - m
    );
    s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">editability: requested attributes found</text>", w / 2.0, h - 12.0);
    s += &format!("<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">fidelity: DINO</text>", h / 2.0, h / 2.0);
    for (v, pos) in [(x0, px(x0)), (x1, px(x1))] {
        s += &format!(
            "<text x=\"{pos}\" y=\"{}\" text-anchor=\"middle\">{v:.2}</text>",
            h - m + 16.0
        );
    }
    for (v, pos) in [(y0, py(y0)), (y1, py(y1))] {
        s += &format!(
            "<text x=\"{}\" y=\"{pos}\" text-anchor=\"end\">{v:.2}</text>",
            m - 4.0
        );
    }
    for r in rows {
        let (x, y) = (px(r.editability.attributes), py(r.fidelity.dino));
        let color = if r.method == "baseline" {
            "gray"
        } else {
            "steelblue"
        };
        s += &format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>", x + 7.0, y - 6.0, r.method);
    }
    s + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::BackgroundKind;

    /// Clean renders of what captions ask for score (nearly) every attribute; a wrong background
    /// loses exactly that point.
    #[test]
    fn attributes_of_faithful_renders_are_found() {
        let c = concept(0);
        let (mut perfect, mut total) = (0, 0);
        for i in 0..20 {
            let mut rng = crate::scene::seeded_rng(3, i);
            let cs = crate::held_out::sample_concept_scene(0, &mut rng);
            let reading = read(&cs.scene.render(64));
            let (hit, asked) = attribute_hits(&cs.requested, cs.concept_object, c, &reading);
            assert!(asked >= 3, "captions name a position and a background");
            perfect += usize::from(hit == asked);
            total += 1;
            let mut wrong = cs.requested.clone();
            wrong.background_kind = Some(if cs.scene.background.kind == BackgroundKind::Solid {
                BackgroundKind::Checker
            } else {
                BackgroundKind::Solid
            });
            let (hit2, _) = attribute_hits(&wrong, cs.concept_object, c, &reading);
            if reading.background_kind == cs.scene.background.kind {
                assert_eq!(hit2 + 1, hit);
            }
        }
        assert!(
            perfect * 10 >= total * 8,
            "{perfect}/{total} renders fully read back"
        );
    }

    #[test]
    fn scatter_plot_labels_every_method() {
        let row = |m: &str, d: f64, a: f64| Row {
            method: m.into(),
            concepts: vec![0],
            fidelity: Fidelity {
                dino: d,
                clip_i: 0.0,
            },
            editability: Editability {
                clip_t: 0.0,
                attributes: a,
            },
            size_bytes: 0,
            train_s: 0.0,
            sample_s: 0.0,
        };
        let svg = scatter_svg(&[row("baseline", 0.4, 0.6), row("ti", 0.7, 0.5)]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains(">ti<") && svg.contains(">baseline<"));
    }

    #[test]
    fn unknown_methods_and_concepts_are_refused() {
        let cfg = BenchConfig {
            exe: "imprint".into(),
            model: "m".into(),
            clip: "c".into(),
            dino: "d".into(),
            encoder: "e".into(),
            methods: vec!["magic".into()],
            concepts: vec![0],
            references: 1,
            samples: 1,
            steps_scale: 1.0,
            seed: 0,
            out: "o".into(),
            uses: vec![],
        };
        let e = run_bench(&cfg, |_| {}).unwrap_err();
        assert!(e.to_string().contains("unknown method 'magic'"), "{e}");
        let cfg = BenchConfig {
            methods: vec!["ti".into()],
            concepts: vec![99],
            ..cfg
        };
        let e = run_bench(&cfg, |_| {}).unwrap_err();
        assert!(e.to_string().contains("concept 99"), "{e}");
    }
}
