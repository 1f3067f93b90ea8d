//! The uses of a concept measured in the world (`imprint world bench --uses …`), beside the
//! methods' fidelity/editability table:
//!
//! * **debias** — the world's documented bias ("a circle" is drawn red ~91 % of the time) before
//!   and after inclusive tokens (`imprint train debias` + `generate --balance`), learned both
//!   ways: ITI-GEN's CLIP-space losses and one Textual Inversion concept per category
//!   (`--method ti`): the world CLIP's zero-shot colour histogram of 32 samples of "a circle"
//!   over [`DEBIAS_COLORS`], and its KL divergence from uniform.
//!
//! * **multi** — two held-out concepts (TI) in one prompt, "a A at the left and a B at the right
//!   on a solid gray background", jointly, with regional prompting by attention masking
//!   (`--region A:left.png --region B:right.png`) and with regional prompts, each concept's own
//!   prompt denoised on its half (`--region-prompt "a A on a solid gray background:left.png"`,
//!   latent couple): how often each appears on its side (the renderer's reader finds a
//!   blob in its colours there) and its fidelity (DINO of that half of the picture to its own
//!   references). Beside them, SVDiff trained on both concepts at once with Cut-Mix-Unmix
//!   ("a sks star at the left and a weird heart at the right"), with and without its unmix term.
//! * **style** — a "pattern" concept (zigzag-heart's gold-and-black zigzag, learnt by TI from a
//!   style set: the pattern on a heart, a ring and a cross, its word placed where colour and
//!   pattern words go: "a <z> ring") applied to shapes it was never seen on,
//!   and P+'s style mixing: split-ring's per-layer vectors on the coarse layers (down, mid) with
//!   zigzag-heart's on the fine ones (up). Measured by how often the concept's colours appear and
//!   which shape the world CLIP sees.
//!
//! Each use runs the same `imprint` commands a user runs and adds a section with its pictures to
//! the bench's report.

use crate::bench::{html_escape, run_command, sample_images, train, BenchConfig};
use crate::held_out::{
    concept, concept_reference_scenes, style_reference_scenes, write_references,
    write_references_with, HeldOutConcept,
};
use crate::scene::{
    pick_color_avoiding, sample_scene_seeded, Background, BackgroundKind, Color, Object, Pattern,
    Scene, Shape,
};
use anyhow::{bail, Result};
use imprint_eval::attribute::{histogram, Histogram};
use imprint_eval::ClipModel;
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The uses the bench knows.
pub const USES: [&str; 3] = ["debias", "multi", "style"];

/// Samples per case of the multi-concept and style uses (a share is read to 1/16).
const USE_SAMPLES: usize = 16;
/// The colour categories the debias use balances "a circle" over.
pub const DEBIAS_COLORS: [Color; 4] = [Color::Red, Color::Green, Color::Blue, Color::Yellow];
/// The prompt whose bias is measured (a circle with no colour named).
pub const BIASED_PROMPT: &str = "a circle";
/// Samples per histogram.
const DEBIAS_SAMPLES: usize = 32;

/// `count` scenes of one plain circle of `color` in varied sizes, places and backgrounds (the
/// category's reference images for `imprint train debias`).
pub fn circle_scenes(color: Color, count: usize, seed: u64) -> Vec<Scene> {
    (0..count as u64)
        .map(|i| {
            let (base, _) = sample_scene_seeded(seed.wrapping_add(0xC1C1E), i);
            let first = base.objects[0];
            let object = Object {
                shape: Shape::Circle,
                color,
                pattern: Pattern::Plain,
                pattern_color: color,
                ..first
            };
            let mut rng = crate::scene::seeded_rng(seed.wrapping_add(0xB6), i);
            let mut background = base.background;
            if background.color == color {
                background.color = pick_color_avoiding(&mut rng, Color::BASE, &[color]);
            }
            Scene {
                background,
                objects: vec![object],
            }
        })
        .collect()
}

/// Writes `DIR/<colour>/NN.png` (+ caption) for every colour: the categories folder of
/// `imprint train debias`.
pub fn write_color_categories(dir: &Path, colors: &[Color], count: usize, seed: u64) -> Result<()> {
    for &c in colors {
        let sub = dir.join(c.word());
        std::fs::create_dir_all(&sub)?;
        for (i, s) in circle_scenes(c, count, seed).iter().enumerate() {
            let mut png = Vec::new();
            s.render(64)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            imprint_models::io::write_atomic(&sub.join(format!("{i:02}.png")), &png)?;
            imprint_models::io::write_atomic(
                &sub.join(format!("{i:02}.txt")),
                s.caption().as_bytes(),
            )?;
        }
    }
    Ok(())
}

/// The debias use's result.
#[derive(Clone, Debug, Serialize)]
pub struct DebiasResult {
    #[serde(rename = "use")]
    pub name: &'static str,
    pub prompt: &'static str,
    pub before: Histogram,
    pub after: Histogram,
    /// The same images read by the renderer's reader: the largest object's colour among the
    /// categories (images whose largest object has another colour are left out).
    pub before_read: Histogram,
    pub after_read: Histogram,
    pub train_s: f64,
    /// The same with the tokens learned as one Textual Inversion concept per category
    /// (`train debias --method ti`, the bench's TI recipe per category).
    pub ti_after: Histogram,
    pub ti_after_read: Histogram,
    pub ti_train_s: f64,
}

/// The histogram of the largest object's colour over [`DEBIAS_COLORS`], read off the pixels.
fn read_histogram(images: &[image::RgbImage], names: &[String]) -> Histogram {
    let mut counts = vec![0usize; DEBIAS_COLORS.len()];
    for img in images {
        let reading = crate::read::read(img);
        if let Some(k) = reading
            .objects
            .first()
            .and_then(|b| DEBIAS_COLORS.iter().position(|c| *c == b.color))
        {
            counts[k] += 1;
        }
    }
    Histogram {
        categories: names.to_vec(),
        kl_uniform: imprint_eval::attribute::kl_from_uniform(&counts),
        counts,
    }
}

/// Measures the world's circle-colour bias, learns inclusive tokens for [`DEBIAS_COLORS`] and
/// measures again with `--balance`. Returns the result and its report section.
pub fn run_debias(cfg: &BenchConfig, clip: &ClipModel) -> Result<(DebiasResult, String)> {
    let dir = cfg.out.join("debias");
    std::fs::create_dir_all(&dir)?;
    let categories_dir = dir.join("categories");
    write_color_categories(&categories_dir, &DEBIAS_COLORS, 8, cfg.seed)?;
    let names: Vec<String> = DEBIAS_COLORS.iter().map(|c| c.word().to_string()).collect();
    let template = "a {} circle";
    let before_imgs = sample_images(
        cfg,
        BIASED_PROMPT,
        &[],
        cfg.seed,
        &dir.join("before.png"),
        &dir.join("before.log"),
        DEBIAS_SAMPLES,
    )?;
    let before = histogram(clip, &before_imgs, &names, template)?;
    let before_read = read_histogram(&before_imgs, &names);
    // Learns the colour tokens with `method_args`, then samples "a circle" with `--balance color`:
    // (samples, seconds of training).
    let learn_and_balance = |method_args: &[&str], name: &str, what: &str| {
        let tokens = dir.join(format!("{name}.safetensors"));
        let t0 = Instant::now();
        let mut cmd = Command::new(&cfg.exe);
        cmd.args(["train", "debias", "--attribute", "color"]);
        cmd.args(method_args);
        cmd.args(["--categories", &categories_dir.display().to_string()]);
        cmd.args(["--model", &cfg.model.display().to_string()]);
        cmd.args(["--prompt", BIASED_PROMPT, "--seed", &cfg.seed.to_string()]);
        cmd.args(["--out", &tokens.display().to_string()]);
        run_command(&mut cmd, what, &dir.join(format!("train-{name}.log")))?;
        let train_s = t0.elapsed().as_secs_f64();
        let balance = [
            "--concept".into(),
            tokens.display().to_string(),
            "--balance".into(),
            "color".into(),
        ];
        let imgs = sample_images(
            cfg,
            BIASED_PROMPT,
            &balance,
            cfg.seed,
            &dir.join(format!("after-{name}.png")),
            &dir.join(format!("after-{name}.log")),
            DEBIAS_SAMPLES,
        )?;
        anyhow::Ok((imgs, train_s))
    };
    let clip_dir = cfg.clip.display().to_string();
    let (after_imgs, train_s) = learn_and_balance(
        &["--clip", &clip_dir],
        "iti-gen",
        "training inclusive tokens",
    )?;
    let after = histogram(clip, &after_imgs, &names, template)?;
    let after_read = read_histogram(&after_imgs, &names);
    // The same attribute learned through the diffusion model: one TI concept per category.
    let ti_steps = cfg.steps(400.0);
    let ti_args = [
        "--method",
        "ti",
        "--steps",
        &ti_steps,
        "--lr",
        crate::bench::TI_LR,
        "--batch-size",
        crate::bench::TI_BATCH,
        "--grad-accum",
        "1",
    ];
    let (ti_imgs, ti_train_s) = learn_and_balance(
        &ti_args,
        "ti",
        "training inclusive tokens as Textual Inversion concepts",
    )?;
    let ti_after = histogram(clip, &ti_imgs, &names, template)?;
    let ti_after_read = read_histogram(&ti_imgs, &names);
    let row = |h: &Histogram| {
        h.categories
            .iter()
            .zip(&h.counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let html = format!(
        "<h2>Correcting the world's bias (ITI-GEN; Textual Inversion per category)</h2><p>“{BIASED_PROMPT}”, {DEBIAS_SAMPLES} samples, classified by the world CLIP among “{template}” for {}. Before: {} — KL from uniform {:.3}. After <code>train debias</code> + <code>generate --balance color</code> ({train_s:.0} s of training): {} — KL {:.3}. Read off the pixels (the largest object's colour, when it is one of the categories): before {} — KL {:.3}; after {} — KL {:.3}.</p><div><img src=\"debias/before.png\" width=384> <img src=\"debias/after-iti-gen.png\" width=384></div><p>The same tokens learned as one Textual Inversion concept per category, through the diffusion model (<code>train debias --method ti</code>, {ti_train_s:.0} s): {} — KL {:.3}; read off the pixels {} — KL {:.3}.</p><div><img src=\"debias/after-ti.png\" width=384></div>",
        names.join(", "),
        row(&before),
        before.kl_uniform,
        row(&after),
        after.kl_uniform,
        row(&before_read),
        before_read.kl_uniform,
        row(&after_read),
        after_read.kl_uniform,
        row(&ti_after),
        ti_after.kl_uniform,
        row(&ti_after_read),
        ti_after_read.kl_uniform
    );
    Ok((
        DebiasResult {
            name: "debias",
            prompt: BIASED_PROMPT,
            before,
            after,
            before_read,
            after_read,
            train_s,
            ti_after,
            ti_after_read,
            ti_train_s,
        },
        html,
    ))
}

/// Trains `method` (ti or xti, the bench's recipe) on held-out concept `k` with its references
/// captioned by `phrase` (which holds the token `<world-K>`); returns the concept file.
fn train_concept(
    cfg: &BenchConfig,
    method: &str,
    k: usize,
    phrase: &str,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let scenes = concept_reference_scenes(k, cfg.references, cfg.seed);
    train_on(
        cfg,
        method,
        concept(k),
        &scenes,
        |s| s.caption_with(phrase),
        dir,
    )
}

/// Trains `method` on `scenes` captioned by `caption`, written to `dir/images`; `c` gives the
/// token and the initial word. Returns the concept file.
fn train_on(
    cfg: &BenchConfig,
    method: &str,
    c: &HeldOutConcept,
    scenes: &[crate::held_out::ConceptScene],
    caption: impl Fn(&crate::held_out::ConceptScene) -> String,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let images = dir.join("images");
    write_references_with(scenes, caption, &images)?;
    train(cfg, method, c, &images, dir)?;
    Ok(dir.join("concept.safetensors"))
}

/// Trains SVDiff on the two concepts at once with Cut-Mix-Unmix (`weight`: the unmix weight, the
/// default when `None`); returns the concept file.
fn train_cut_mix(
    cfg: &BenchConfig,
    pair: [usize; 2],
    phrases: &[String; 2],
    weight: Option<&str>,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let mut folders = vec![];
    for (i, &k) in pair.iter().enumerate() {
        let images = dir.join(format!("images-{k}"));
        // Cut-mix takes each image's centre strip: the concept alone, at the centre.
        let scenes: Vec<_> = concept_reference_scenes(k, cfg.references, cfg.seed)
            .into_iter()
            .map(centred_alone)
            .collect();
        write_references(&scenes, Some(&phrases[i]), &images)?;
        folders.push(images);
    }
    let out = dir.join("concept.safetensors");
    if out.exists() {
        std::fs::remove_file(&out)?;
    }
    let steps = cfg.steps(400.0);
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(["train", "svdiff", "--model"])
        .arg(&cfg.model)
        .arg("--images")
        .arg(&folders[0])
        .arg("--second-images")
        .arg(&folders[1])
        .arg("--subjects")
        .arg(phrases.join(","))
        .args([
            "--cut-mix-prompt",
            "a {left} at the left and a {right} at the right",
        ])
        .args(["--resolution", "64", "--seed", &cfg.seed.to_string()])
        .args(["--save-every", "100000", "--steps", &steps, "--lr", "1e-3"])
        .args(["--batch-size", "4", "--out"])
        .arg(&out);
    if let Some(w) = weight {
        cmd.args(["--unmix-weight", w]);
    }
    run_command(
        &mut cmd,
        "training SVDiff with Cut-Mix-Unmix",
        &dir.join("train.log"),
    )?;
    Ok(out)
}

/// A reference scene reduced to its concept object, moved to the centre (jitter kept).
fn centred_alone(mut s: crate::held_out::ConceptScene) -> crate::held_out::ConceptScene {
    let mut object = s.scene.objects[s.concept_object].clone();
    object.position = crate::scene::Position::Center;
    let mut asked = s.requested.objects[s.concept_object].clone();
    asked.position = Some(crate::scene::Position::Center);
    s.scene.objects = vec![object];
    s.requested.objects = vec![asked];
    s.concept_object = 0;
    s
}

/// White on the left or right half of a 64 px mask.
fn half_mask(path: &Path, left: bool) -> Result<()> {
    let img = image::GrayImage::from_fn(64, 64, |x, _| {
        image::Luma([if (x < 32) == left { 255 } else { 0 }])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    imprint_models::io::write_atomic(path, &png)?;
    Ok(())
}

/// One half of a sample centred on a 64 px canvas filled with its corner colour (the
/// background), so the DINO processor sees it undistorted.
fn half_on_canvas(img: &image::RgbImage, left: bool) -> image::RgbImage {
    let x0 = if left { 0 } else { 32 };
    let fill = *img.get_pixel(x0 + if left { 0 } else { 31 }, 0);
    image::RgbImage::from_fn(64, 64, |x, y| {
        if (16..48).contains(&x) {
            *img.get_pixel(x0 + x - 16, y)
        } else {
            fill
        }
    })
}

/// How one concept fared in the multi-concept samples.
#[derive(Clone, Debug, Serialize)]
pub struct ConceptInPicture {
    pub concept: usize,
    /// Share of samples with a blob in the concept's colours on its side.
    pub appears: f64,
    /// Share of samples with a blob in the concept's colours anywhere: whether the concept is
    /// drawn at all, whatever the model makes of "at the left".
    pub anywhere: f64,
    /// DINO of its half of the picture to its references.
    pub dino: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MultiVariant {
    pub variant: &'static str,
    pub concepts: Vec<ConceptInPicture>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MultiResult {
    #[serde(rename = "use")]
    pub name: &'static str,
    pub prompt: String,
    pub variants: Vec<MultiVariant>,
    /// Per concept: the DINO of the prompt's background alone (the renderer's solid gray, no
    /// object) to its references, the floor a half with no concept in it scores: the world
    /// DINO also weighs backgrounds, and gray is close to some concepts' reference scenes.
    pub empty_dino: Vec<f64>,
}

/// Two held-out concepts in one picture, jointly and with regional prompting.
pub fn run_multi(
    cfg: &BenchConfig,
    eval: &imprint_eval::Evaluator,
) -> Result<(MultiResult, String)> {
    let pair = match cfg.concepts.as_slice() {
        [a, b, ..] => [*a, *b],
        _ => [0, 1],
    };
    let dir = cfg.out.join("multi");
    std::fs::create_dir_all(&dir)?;
    let mut files = vec![];
    let mut refs = vec![];
    for &k in &pair {
        let token = format!("<world-{k}>");
        let kdir = dir.join(format!("concept-{k}"));
        files.push(train_concept(cfg, "ti", k, &token, &kdir)?);
        let rdir = kdir.join("references");
        write_references(
            &concept_reference_scenes(k, cfg.references, cfg.seed),
            None,
            &rdir,
        )?;
        refs.push(eval.dino_features(&imprint_eval::metrics::read_images(&rdir)?)?);
    }
    let (ta, tb) = (
        format!("<world-{}>", pair[0]),
        format!("<world-{}>", pair[1]),
    );
    let prompt = format!("a {ta} at the left and a {tb} at the right on a solid gray background");
    half_mask(&dir.join("left.png"), true)?;
    half_mask(&dir.join("right.png"), false)?;
    let n = USE_SAMPLES;
    let mut concepts_args = vec![];
    for f in &files {
        concepts_args.push("--concept".to_string());
        concepts_args.push(f.display().to_string());
    }
    let mut regions = concepts_args.clone();
    for (t, side) in [(&ta, "left.png"), (&tb, "right.png")] {
        regions.push("--region".into());
        regions.push(format!("{t}:{}", dir.join(side).display()));
    }
    // SVDiff trained on both concepts at once with Cut-Mix-Unmix (its §3.3), with and without
    // the unmix term: each concept is named by a rare word and its class word.
    let phrases = [
        format!("sks {}", concept(pair[0]).class_word),
        format!("weird {}", concept(pair[1]).class_word),
    ];
    let svdiff_prompt = format!(
        "a {} at the left and a {} at the right on a solid gray background",
        phrases[0], phrases[1]
    );
    let mut cut_mix = vec![];
    for (variant, weight) in [
        ("svdiff cut-mix-unmix", None),
        ("svdiff cut-mix, no unmix", Some("0")),
    ] {
        let vdir = dir.join(variant.replace([' ', ','], "-"));
        let file = train_cut_mix(cfg, pair, &phrases, weight, &vdir)?;
        cut_mix.push((
            variant,
            svdiff_prompt.clone(),
            vec!["--concept".to_string(), file.display().to_string()],
        ));
    }
    let empty = Scene {
        background: Background {
            kind: BackgroundKind::Solid,
            color: Color::Gray,
        },
        objects: vec![],
    }
    .render(64);
    let empty_features = eval.dino_features(&[empty])?;
    let empty_dino = refs
        .iter()
        .map(|r| imprint_eval::metrics::mean_pairwise_cosine(&empty_features, r))
        .collect::<Result<Vec<f64>>>()?;
    let mut variants = vec![];
    let mut html = format!("<h2>Two concepts in one picture</h2><p>TI: “{}”; SVDiff: “{}”; {n} samples each.</p><table class=t><tr><th>variant</th>", html_escape(&prompt), html_escape(&svdiff_prompt));
    for &k in &pair {
        html += &format!("<th>concept {k} on its side (anywhere)</th><th>concept {k} DINO</th>");
    }
    html += "</tr>";
    let mut pictures = String::new();
    // Regional prompts: each concept's own prompt denoised on its half (latent couple).
    let mut region_prompts = concepts_args.clone();
    for (t, side) in [(&ta, "left.png"), (&tb, "right.png")] {
        region_prompts.push("--region-prompt".into());
        region_prompts.push(format!(
            "a {t} on a solid gray background:{}",
            dir.join(side).display()
        ));
    }
    let mut cases = vec![
        ("joint", prompt.clone(), concepts_args.clone()),
        ("regions", prompt.clone(), regions.clone()),
        ("region prompts", prompt.clone(), region_prompts),
    ];
    cases.extend(cut_mix);
    for (variant, prompt, extra) in &cases {
        let variant: &'static str = variant;
        let file_stem = variant.replace([' ', ','], "-");
        let imgs = sample_images(
            cfg,
            prompt,
            extra,
            cfg.seed,
            &dir.join(format!("{file_stem}.png")),
            &dir.join(format!("{file_stem}.log")),
            n,
        )?;
        let mut per = vec![];
        html += &format!("<tr><td>{variant}</td>");
        let readings: Vec<_> = imgs.iter().map(crate::read::read).collect();
        for (side, (&k, r)) in pair.iter().zip(&refs).enumerate() {
            let left = side == 0;
            let colors = concept(k).colors();
            let share = |on_side: bool| {
                readings
                    .iter()
                    .filter(|reading| {
                        reading.objects.iter().any(|b| {
                            colors.contains(&b.color) && (!on_side || (b.centroid.0 < 32.0) == left)
                        })
                    })
                    .count() as f64
                    / n as f64
            };
            let (appears, anywhere) = (share(true), share(false));
            let halves: Vec<image::RgbImage> =
                imgs.iter().map(|i| half_on_canvas(i, left)).collect();
            let dino =
                imprint_eval::metrics::mean_pairwise_cosine(&eval.dino_features(&halves)?, r)?;
            html += &format!("<td>{appears:.2} ({anywhere:.2})</td><td>{dino:.3}</td>");
            per.push(ConceptInPicture {
                concept: k,
                appears,
                anywhere,
                dino,
            });
        }
        html += "</tr>";
        pictures +=
            &format!("<div>{variant}<br><img src=\"multi/{file_stem}.png\" width=384></div>");
        variants.push(MultiVariant {
            variant,
            concepts: per,
        });
    }
    html += "<tr><td>floor: the gray background alone</td>";
    for d in &empty_dino {
        html += &format!("<td></td><td>{d:.3}</td>");
    }
    html += "</tr></table>";
    html += &pictures;
    Ok((
        MultiResult {
            name: "multi",
            prompt,
            variants,
            empty_dino,
        },
        html,
    ))
}

/// One style sample set: what was asked and what came out.
#[derive(Clone, Debug, Serialize)]
pub struct StyleCase {
    pub case: String,
    pub prompt: String,
    /// Share of samples whose main object is painted in the pattern concept's colours.
    pub pattern_colors: f64,
    /// The shape the world CLIP sees most often, and how often.
    pub shape: String,
    pub shape_share: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StyleResult {
    #[serde(rename = "use")]
    pub name: &'static str,
    pub cases: Vec<StyleCase>,
}

/// The shapes the style set shows the pattern on, and the shapes it is then applied to.
const STYLE_SHAPES: [Shape; 3] = [Shape::Heart, Shape::Ring, Shape::Cross];
const NEW_SHAPES: [&str; 4] = ["square", "circle", "star", "triangle"];
/// The style token's initial embedding: the base pattern word nearest the zigzag.
const STYLE_INIT_WORD: &str = "striped";
/// The style LoRA's trigger word (the bench's LoRA and DreamBooth rare word).
const LORA_TRIGGER: &str = "sks";

/// The pattern concept on new shapes (a TI and a LoRA trained on a style set, beside the
/// untrained initial word), and P+ style mixing.
pub fn run_style(cfg: &BenchConfig, clip: &ClipModel) -> Result<(StyleResult, String)> {
    let dir = cfg.out.join("style");
    std::fs::create_dir_all(&dir)?;
    let (pattern, shape_concept) = (1usize, 2usize);
    let pc = concept(pattern);
    let token = format!("<world-{pattern}>");
    // A style set: the pattern on shapes other than those it is then applied to, the word where
    // colour and pattern words go ("a <world-1> ring"), initialised from a pattern word.
    let style = HeldOutConcept {
        class_word: STYLE_INIT_WORD,
        ..*pc
    };
    let style_set = style_reference_scenes(pattern, &STYLE_SHAPES, cfg.references, cfg.seed);
    // The TI token, and beside it a style LoRA on the same set with its trigger word where the
    // token goes ("a sks ring"), as style LoRAs are trained on captioned images.
    let mut style_files = vec![];
    for (method, word) in [("ti", token.as_str()), ("lora", LORA_TRIGGER)] {
        let file = train_on(
            cfg,
            method,
            &style,
            &style_set,
            |s| {
                let shape = s.scene.objects[s.concept_object].shape;
                s.caption_with(&format!("{word} {shape}"))
            },
            &dir.join(format!("pattern-{method}")),
        )?;
        style_files.push((method, word, file));
    }
    let xti_pattern = train_concept(cfg, "xti", pattern, &token, &dir.join("pattern-xti"))?;
    let shape_token = format!("<world-{shape_concept}>");
    let xti_shape = train_concept(
        cfg,
        "xti",
        shape_concept,
        &shape_token,
        &dir.join("shape-xti"),
    )?;
    let shapes: Vec<String> = crate::scene::Shape::BASE
        .iter()
        .map(|s| s.word().to_string())
        .collect();
    let colors = pc.colors();
    let n = USE_SAMPLES;
    let mut cases = vec![];
    let mut html = String::from("<h2>Style: a pattern concept on new shapes (TI and LoRA from a style set), and P+ style mixing</h2><table class=t><tr><th>case</th><th>prompt</th><th>pattern colours</th><th>shape seen</th></tr>");
    let mut pictures = String::new();
    let mut plan: Vec<(String, String, Vec<String>)> = vec![];
    // What the words alone give: the TI's initial word with no concept applied.
    for shape in NEW_SHAPES {
        plan.push((
            format!("baseline on a {shape}"),
            format!("a {STYLE_INIT_WORD} {shape} on a solid gray background"),
            vec![],
        ));
    }
    for (method, word, file) in &style_files {
        for shape in NEW_SHAPES {
            plan.push((
                format!("{method} on a {shape}"),
                format!("a {word} {shape} on a solid gray background"),
                vec!["--concept".into(), file.display().to_string()],
            ));
        }
    }
    plan.push((
        "split-ring (P+)".into(),
        format!("a {shape_token} on a solid gray background"),
        vec!["--concept".into(), xti_shape.display().to_string()],
    ));
    plan.push((
        "zigzag-heart (P+)".into(),
        format!("a {token} on a solid gray background"),
        vec!["--concept".into(), xti_pattern.display().to_string()],
    ));
    plan.push((
        "mix: split-ring coarse + zigzag-heart fine".into(),
        format!("a {shape_token} on a solid gray background"),
        vec![
            "--concept".into(),
            format!("{}@down,mid", xti_shape.display()),
            "--concept".into(),
            format!("{}@up", xti_pattern.display()),
        ],
    ));
    for (i, (case, prompt, extra)) in plan.into_iter().enumerate() {
        let out = dir.join(format!("case-{i}.png"));
        let imgs = sample_images(
            cfg,
            &prompt,
            &extra,
            cfg.seed,
            &out,
            &dir.join(format!("case-{i}.log")),
            n,
        )?;
        let pattern_colors = imgs
            .iter()
            .filter(|img| {
                // The main (largest) object is painted in the concept's colours.
                crate::read::read(img)
                    .objects
                    .first()
                    .is_some_and(|b| colors.contains(&b.color))
            })
            .count() as f64
            / n as f64;
        let h = histogram(clip, &imgs, &shapes, "a {}")?;
        let (best, count) = h
            .counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map(|(i, c)| (h.categories[i].clone(), *c))
            .unwrap_or_default();
        let shape_share = count as f64 / n as f64;
        html += &format!(
            "<tr><td>{}</td><td>{}</td><td>{pattern_colors:.2}</td><td>{best} ({shape_share:.2})</td></tr>",
            html_escape(&case),
            html_escape(&prompt)
        );
        pictures += &format!(
            "<div>{}<br><img src=\"style/case-{i}.png\" width=384></div>",
            html_escape(&case)
        );
        cases.push(StyleCase {
            case,
            prompt,
            pattern_colors,
            shape: best,
            shape_share,
        });
    }
    html += "</table>";
    html += &pictures;
    Ok((
        StyleResult {
            name: "style",
            cases,
        },
        html,
    ))
}

/// Checks the names of `--uses`.
pub fn check_uses(uses: &[String]) -> Result<()> {
    for u in uses {
        if !USES.contains(&u.as_str()) {
            bail!("unknown use '{u}' (known: {})", USES.join(", "))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_scenes_show_one_circle_of_their_colour_on_another_background() {
        for &c in &DEBIAS_COLORS {
            for s in circle_scenes(c, 6, 1) {
                assert_eq!(s.objects.len(), 1);
                assert_eq!(s.objects[0].shape, Shape::Circle);
                assert_eq!(s.objects[0].color, c);
                assert_ne!(s.background.color, c);
                let reading = crate::read::read(&s.render(64));
                assert!(
                    reading.objects.iter().any(|b| b.color == c),
                    "{c:?} read back"
                );
            }
        }
        assert_eq!(
            circle_scenes(Color::Red, 3, 5),
            circle_scenes(Color::Red, 3, 5)
        );
    }
}
