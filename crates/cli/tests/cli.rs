//! End-to-end tests of the `imprint` binary on the tiny model: generation and bad input.

mod common;

use common::*;
use std::path::Path;

fn generate(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    imprint()
        .args([
            "generate",
            "--prompt",
            "a photo of a red toy",
            "--steps",
            "4",
            "--model",
        ])
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn assert_fails_with(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("error"))
            .count(),
        1,
        "one error line: {err}"
    );
}

#[test]
fn txt2img_writes_requested_size_deterministically() {
    let model = tiny_model("tiny");
    let dir = scratch("gen");
    let (a, b, c) = (dir.join("a.png"), dir.join("b.png"), dir.join("c.png"));
    for (out, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let o = generate(
            &model,
            out,
            &[
                "--seed",
                seed,
                "--width",
                "48",
                "--height",
                "32",
                "--scheduler",
                "euler-a",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let img = image::open(&a).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    assert_ne!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&c).unwrap(),
        "another seed, another image"
    );
}

#[test]
fn several_images_and_a_grid() {
    let model = tiny_model("tiny-sd2");
    let dir = scratch("grid");
    let out = dir.join("g.png");
    let o = generate(
        &model,
        &out,
        &[
            "--num-images",
            "3",
            "--negative-prompt",
            "blurry",
            "--scheduler",
            "ddim",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for i in 0..3 {
        let img = image::open(dir.join(format!("g-{i}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    let grid = image::open(&out).unwrap();
    assert_eq!((grid.width(), grid.height()), (128, 128));
}

#[test]
fn img2img_from_an_init_image() {
    let model = tiny_model("tiny");
    let dir = scratch("img2img");
    let init = dir.join("init.png");
    image::RgbaImage::from_fn(40, 40, |x, y| {
        image::Rgba([(x * 6) as u8, (y * 6) as u8, 90, 200])
    })
    .save(&init)
    .unwrap();
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    for out in [&a, &b] {
        let o = generate(
            &model,
            out,
            &[
                "--init-image",
                init.to_str().unwrap(),
                "--strength",
                "0.5",
                "--scheduler",
                "dpm++2m",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Without --width/--height, img2img keeps the init image's size (rounded to the latent grid).
    assert_eq!(image::open(&a).unwrap().width(), 40);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn debug_tokenize_prints_77_ids() {
    let model = tiny_model("tiny");
    let o = run_ok(
        imprint()
            .args([
                "debug",
                "tokenize",
                "--prompt",
                "a photo of a dog",
                "--model",
            ])
            .arg(&model),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = v["input_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
}

#[test]
fn bad_inputs_fail_cleanly_and_keep_existing_output() {
    let model = tiny_model("tiny");
    let dir = scratch("bad");
    let out = dir.join("keep.png");
    std::fs::write(&out, b"previous result").unwrap();

    assert_fails_with(
        &generate(&dir.join("nope"), &out, &[]),
        "model folder not found",
    );

    let garbage = dir.join("garbage.png");
    std::fs::write(&garbage, b"this is not an image").unwrap();
    assert_fails_with(
        &generate(&model, &out, &["--init-image", garbage.to_str().unwrap()]),
        "garbage.png",
    );

    let long = "a photo of a dog ".repeat(30);
    let o = imprint()
        .args(["generate", "--prompt", &long, "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_fails_with(&o, "at most 77");

    assert_fails_with(
        &generate(&model, &dir.join("no/such/dir/x.png"), &[]),
        "does not exist",
    );
    assert_fails_with(
        &generate(&model, &out, &["--width", "50"]),
        "multiples of 8",
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"previous result",
        "a failed run must not touch existing output"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn broken_model_folders_are_named() {
    let model = tiny_model("tiny");
    let dir = scratch("broken");
    let out = dir.join("x.png");

    let truncated = dir.join("truncated");
    copy_dir(&model, &truncated);
    let weights = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = generate(&truncated, &out, &[]);
    assert_fails_with(&o, "truncated");
    assert_fails_with(&o, "unet/diffusion_pytorch_model.safetensors");

    let unsupported = dir.join("unsupported");
    copy_dir(&model, &unsupported);
    let cfg_path = unsupported.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"DownBlock2D\"", "\"FancyDownBlock2D\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    assert_fails_with(
        &generate(&unsupported, &out, &[]),
        "unsupported block type 'FancyDownBlock2D'",
    );

    let missing = dir.join("missing");
    copy_dir(&model, &missing);
    std::fs::remove_dir_all(missing.join("vae")).unwrap();
    assert_fails_with(
        &generate(&missing, &out, &[]),
        "missing component folder 'vae/'",
    );

    let wrong_shape = dir.join("wrong_shape");
    copy_dir(&model, &wrong_shape);
    let cfg_path = wrong_shape.join("unet/config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 24");
    std::fs::write(&cfg_path, cfg).unwrap();
    assert_fails_with(&generate(&wrong_shape, &out, &[]), "has shape");
    assert!(!out.exists());
}
