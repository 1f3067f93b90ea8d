//! Regional prompting (`--region WORD:MASK`) through `imprint debug sample` on the diffusers-made
//! tiny model.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// `imprint debug sample` with `flag VALUE` for each value (`--region` or `--region-prompt`).
fn sample_with(out: &Path, prompt: &str, flag: &str, values: &[String]) -> std::process::Output {
    let mut cmd = imprint();
    cmd.args(["debug", "sample", "--model"])
        .arg(fixtures().join("diffusers-made/model"))
        .args([
            "--prompt",
            prompt,
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--guidance",
            "7.5",
        ])
        .arg("--latents")
        .arg(fixtures().join("ip_adapter/case_0.safetensors"))
        .arg("--output")
        .arg(out);
    for v in values {
        cmd.arg(flag).arg(v);
    }
    cmd.output().unwrap()
}

fn sample(out: &Path, prompt: &str, regions: &[String]) -> std::process::Output {
    sample_with(out, prompt, "--region", regions)
}

fn sample_regions(out: &Path, prompt: &str, region_prompts: &[String]) -> std::process::Output {
    sample_with(out, prompt, "--region-prompt", region_prompts)
}

fn mask(dir: &Path, name: &str, inside: impl Fn(u32, u32) -> bool) -> PathBuf {
    let p = dir.join(name);
    image::GrayImage::from_fn(16, 16, |x, y| {
        image::Luma([if inside(x, y) { 255 } else { 0 }])
    })
    .save(&p)
    .unwrap();
    p
}

#[test]
fn a_region_covering_everything_changes_nothing_and_a_half_region_does() {
    let dir = scratch("region");
    let prompt = "a photo of a cat and a dog";
    let plain = dir.join("plain.safetensors");
    assert!(sample(&plain, prompt, &[]).status.success());
    let all = mask(&dir, "all.png", |_, _| true);
    let left = mask(&dir, "left.png", |x, _| x < 8);
    let full = dir.join("full.safetensors");
    let out = sample(&full, prompt, &[format!("cat:{}", all.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        rel_err(&load(&full)["latents"], &load(&plain)["latents"]),
        0.0
    );
    let half = dir.join("half.safetensors");
    let out = sample(
        &half,
        prompt,
        &[
            format!("cat:{}", left.display()),
            format!("dog:{}", mask(&dir, "right.png", |x, _| x >= 8).display()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rel_err(&load(&half)["latents"], &load(&plain)["latents"]) > 1e-3);
}

#[test]
fn regions_for_absent_words_or_broken_masks_are_refused_without_output() {
    let dir = scratch("region-bad");
    let out = dir.join("out.safetensors");
    let all = mask(&dir, "all.png", |_, _| true);
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    for (arg, needle) in [
        (format!("horse:{}", all.display()), "does not occur"),
        (format!("cat:{}", broken.display()), "broken.png"),
        ("cat".to_string(), "WORD:MASK"),
    ] {
        let o = sample(&out, "a photo of a cat", &[arg.clone()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{arg}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn region_prompts_reduce_to_one_prompt_where_a_region_covers_all_or_nothing() {
    let dir = scratch("region-prompt");
    let (base, cat) = ("a photo of grass", "a photo of a cat");
    let run = |name: &str, prompt: &str, regions: &[String]| {
        let p = dir.join(name);
        let out = sample_regions(&p, prompt, regions);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        load(&p)["latents"].clone()
    };
    let plain_base = run("base.safetensors", base, &[]);
    let plain_cat = run("cat.safetensors", cat, &[]);
    let all = mask(&dir, "all.png", |_, _| true);
    let none = mask(&dir, "none.png", |_, _| false);
    let left = mask(&dir, "left.png", |x, _| x < 8);
    // A region over the whole image: its prompt alone; over nothing: the base prompt alone.
    let whole = run(
        "whole.safetensors",
        base,
        &[format!("{cat}:{}", all.display())],
    );
    assert!(rel_err(&whole, &plain_cat) < 1e-5);
    let empty = run(
        "empty.safetensors",
        base,
        &[format!("{cat}:{}", none.display())],
    );
    assert!(rel_err(&empty, &plain_base) < 1e-5);
    // Half the image: unlike either prompt alone.
    let half = run(
        "half.safetensors",
        base,
        &[format!("{cat}:{}", left.display())],
    );
    assert!(rel_err(&half, &plain_base) > 1e-3);
    assert!(rel_err(&half, &plain_cat) > 1e-3);
}

#[test]
fn region_prompts_with_broken_masks_or_no_mask_are_refused_without_output() {
    let dir = scratch("region-prompt-bad");
    let out = dir.join("out.safetensors");
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    for (arg, needle) in [
        (format!("a cat:{}", broken.display()), "broken.png"),
        ("a cat".to_string(), "PROMPT:MASK"),
        (
            format!("a cat:{}", dir.join("missing.png").display()),
            "missing.png",
        ),
    ] {
        let o = sample_regions(&out, "a photo", &[arg.clone()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{arg}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn region_prompts_and_balance_are_refused_together() {
    let dir = scratch("region-prompt-balance");
    let out = dir.join("out.png");
    let all = mask(&dir, "all.png", |_, _| true);
    let o = imprint()
        .args(["generate", "--model"])
        .arg(fixtures().join("diffusers-made/model"))
        .args(["--prompt", "a photo", "--balance", "color", "--out"])
        .arg(&out)
        .arg("--region-prompt")
        .arg(format!("a cat:{}", all.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--region-prompt"),
        "{err}"
    );
    assert!(!out.exists());
}
