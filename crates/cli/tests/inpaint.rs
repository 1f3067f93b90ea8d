//! Inpainting: `debug sample --mask` against diffusers' StableDiffusionInpaintPipeline
//! (`tools/reference/inpaint.py`) on a regular and a 9-channel inpainting model, `generate --mask`
//! end to end, and refusals that write nothing.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixtures().join("inpaint")
}

#[test]
fn both_model_kinds_match_diffusers() {
    let manifest: Value = manifest_of(&dir());
    let scratch = scratch("inpaint-parity");
    for run in manifest["runs"].as_array().unwrap() {
        let file = run["file"].as_str().unwrap();
        let model = match run["model"].as_str().unwrap() {
            "diffusers-made" => fixtures().join("diffusers-made/model"),
            other => dir().join(other),
        };
        let out = scratch.join(file);
        let strength = run["strength"].as_f64().unwrap().to_string();
        run_ok(
            imprint()
                .args(["debug", "sample", "--model"])
                .arg(&model)
                .args(["--prompt", run["prompt"].as_str().unwrap()])
                .args([
                    "--negative-prompt",
                    run["negative_prompt"].as_str().unwrap(),
                ])
                .args(["--scheduler", run["scheduler"].as_str().unwrap()])
                .args(["--steps", "8", "--guidance", "7.5", "--strength", &strength])
                .arg("--latents")
                .arg(dir().join(file))
                .arg("--mask")
                .arg(dir().join("mask.png"))
                .arg("--output")
                .arg(&out),
        );
        let reference = load(&dir().join(file));
        let err = rel_err(&load(&out)["latents"], &reference["expected"]);
        assert!(
            err <= 1e-3,
            "{file} ({}): relative error {err:e}",
            run["model"]
        );
        assert!(rel_err(&reference["plain"], &reference["expected"]) > 1e-2);
    }
}

#[test]
fn generate_repaints_and_can_keep_the_rest() {
    let scratch = scratch("inpaint-generate");
    let model = tiny_model("tiny");
    // A 64×64 init image and a mask of its left half.
    let init = scratch.join("init.png");
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
    })
    .save(&init)
    .unwrap();
    let mask = scratch.join("mask.png");
    image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let out = scratch.join("out.png");
    run_ok(
        imprint()
            .args(["generate", "--model"])
            .arg(&model)
            .args([
                "--prompt",
                "a cat",
                "--steps",
                "3",
                "--keep-unmasked",
                "--init-image",
            ])
            .arg(&init)
            .arg("--mask")
            .arg(&mask)
            .arg("--out")
            .arg(&out),
    );
    let (a, b) = (
        image::open(&init).unwrap().to_rgb8(),
        image::open(&out).unwrap().to_rgb8(),
    );
    for y in 0..64 {
        for x in 32..64 {
            let (p, q) = (a.get_pixel(x, y).0, b.get_pixel(x, y).0);
            assert!(
                p.iter().zip(q).all(|(u, v)| u.abs_diff(v) <= 1),
                "kept pixel ({x}, {y}) changed: {p:?} → {q:?}"
            );
        }
    }
    // A broken mask is refused by name and nothing is written.
    let broken = scratch.join("broken.png");
    std::fs::write(&broken, b"\x89PNG not really").unwrap();
    let never = scratch.join("never.png");
    let o = imprint()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "a cat", "--steps", "2", "--init-image"])
        .arg(&init)
        .arg("--mask")
        .arg(&broken)
        .arg("--out")
        .arg(&never)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("broken.png") && err.contains("mask"), "{err}");
    assert!(!never.exists());
    // A mask without an image to repaint is refused too.
    let o = imprint()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "a cat", "--steps", "2", "--mask"])
        .arg(&mask)
        .arg("--out")
        .arg(&never)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--mask needs --init-image"));
    assert!(!never.exists());
}

#[test]
fn inpainting_models_train_with_random_masks() {
    let scratch = scratch("inpaint-train");
    let images = fixtures().join("../../examples/toy");
    let train = |model: &std::path::Path, out: &std::path::Path, inpainting: bool| {
        let mut cmd = imprint();
        cmd.args(["train", "lora", "--model"])
            .arg(model)
            .arg("--images")
            .arg(&images)
            .args(["--instance-prompt", "a photo of a cat", "--steps", "2"])
            .args(["--resolution", "16", "--save-every", "0", "--out"])
            .arg(out);
        if inpainting {
            cmd.arg("--inpainting");
        }
        cmd.output().unwrap()
    };
    let out = scratch.join("lora.safetensors");
    let o = train(&dir().join("model-9ch"), &out, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lora = load(&out);
    assert!(lora.keys().any(|k| k.ends_with("lora_down.weight")));
    // The 9-channel model without --inpainting, and --inpainting on a regular model, are refused.
    let refused = scratch.join("refused.safetensors");
    let o = train(&dir().join("model-9ch"), &refused, false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("add --inpainting"));
    let o = train(&fixtures().join("diffusers-made/model"), &refused, true);
    assert!(String::from_utf8_lossy(&o.stderr).contains("9 input channels"));
    assert!(!refused.exists());
}
