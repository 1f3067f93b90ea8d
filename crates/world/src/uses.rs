//! The uses of a concept measured in the world (`imprint world bench --uses …`), beside the
//! methods' fidelity/editability table:
//!
//! * **debias** — the world's documented bias ("a circle" is drawn red ~91 % of the time) before
//!   and after ITI-GEN's inclusive tokens (`imprint train debias` + `generate --balance`): the
//!   world CLIP's zero-shot colour histogram of 32 samples of "a circle" over
//!   [`DEBIAS_COLORS`], and its KL divergence from uniform.
//!
//! Each use runs the same `imprint` commands a user runs and adds a section with its pictures to
//! the bench's report.

use crate::bench::{run_command, BenchConfig};
use crate::scene::{
    pick_color_avoiding, sample_scene_seeded, Color, Object, Pattern, Scene, Shape,
};
use anyhow::{bail, Result};
use imprint_eval::attribute::{histogram, Histogram};
use imprint_eval::ClipModel;
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The uses the bench knows.
pub const USES: [&str; 1] = ["debias"];

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
    pub train_s: f64,
}

/// Samples `prompt` into `out` (a grid, plus `out-<i>.png`) and returns the images.
fn sample(
    cfg: &BenchConfig,
    prompt: &str,
    extra: &[String],
    out: &Path,
    log: &Path,
    n: usize,
) -> Result<Vec<image::RgbImage>> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(["generate", "--model", &cfg.model.display().to_string()]);
    cmd.args(["--prompt", prompt, "--num-images", &n.to_string()]);
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
        &cfg.seed.to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    cmd.args(extra);
    run_command(&mut cmd, &format!("sampling '{prompt}'"), log)?;
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

/// Measures the world's circle-colour bias, learns inclusive tokens for [`DEBIAS_COLORS`] and
/// measures again with `--balance`. Returns the result and its report section.
pub fn run_debias(cfg: &BenchConfig, clip: &ClipModel) -> Result<(DebiasResult, String)> {
    let dir = cfg.out.join("debias");
    std::fs::create_dir_all(&dir)?;
    let categories_dir = dir.join("categories");
    write_color_categories(&categories_dir, &DEBIAS_COLORS, 8, cfg.seed)?;
    let names: Vec<String> = DEBIAS_COLORS.iter().map(|c| c.word().to_string()).collect();
    let template = "a {} circle";
    let before_imgs = sample(
        cfg,
        BIASED_PROMPT,
        &[],
        &dir.join("before.png"),
        &dir.join("before.log"),
        DEBIAS_SAMPLES,
    )?;
    let before = histogram(clip, &before_imgs, &names, template)?;
    let tokens = dir.join("color.safetensors");
    let t0 = Instant::now();
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(["train", "debias", "--attribute", "color"]);
    cmd.args(["--categories", &categories_dir.display().to_string()]);
    cmd.args(["--clip", &cfg.clip.display().to_string()]);
    cmd.args(["--model", &cfg.model.display().to_string()]);
    cmd.args(["--prompt", BIASED_PROMPT, "--seed", &cfg.seed.to_string()]);
    cmd.args(["--out", &tokens.display().to_string()]);
    run_command(
        &mut cmd,
        "training inclusive tokens",
        &dir.join("train.log"),
    )?;
    let train_s = t0.elapsed().as_secs_f64();
    let after_imgs = sample(
        cfg,
        BIASED_PROMPT,
        &[
            "--concept".into(),
            tokens.display().to_string(),
            "--balance".into(),
            "color".into(),
        ],
        &dir.join("after.png"),
        &dir.join("after.log"),
        DEBIAS_SAMPLES,
    )?;
    let after = histogram(clip, &after_imgs, &names, template)?;
    let row = |h: &Histogram| {
        h.categories
            .iter()
            .zip(&h.counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let html = format!(
        "<h2>Correcting the world's bias (ITI-GEN)</h2><p>“{BIASED_PROMPT}”, {DEBIAS_SAMPLES} samples, classified by the world CLIP among “{template}” for {}. Before: {} — KL from uniform {:.3}. After <code>train debias</code> + <code>generate --balance color</code> ({train_s:.0} s of training): {} — KL {:.3}.</p><div><img src=\"debias/before.png\" width=384> <img src=\"debias/after.png\" width=384></div>",
        names.join(", "),
        row(&before),
        before.kl_uniform,
        row(&after),
        after.kl_uniform
    );
    Ok((
        DebiasResult {
            name: "debias",
            prompt: BIASED_PROMPT,
            before,
            after,
            train_s,
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
