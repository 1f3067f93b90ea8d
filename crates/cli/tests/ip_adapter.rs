//! IP-Adapter parity: `imprint debug sample --ip-adapter … --ip-image …` against diffusers'
//! `load_ip_adapter` pipelines on the diffusers-made tiny model (`tools/reference/ip_adapter.py`
//! wrote `tests/fixtures/ip_adapter/`).

mod common;

use common::*;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixtures().join("ip_adapter")
}

fn model() -> PathBuf {
    fixtures().join("diffusers-made/model")
}

/// Runs one manifest case through `debug sample`; returns (ours, expected, plain).
fn run_case(
    name: &str,
) -> (
    candle_core::Tensor,
    candle_core::Tensor,
    candle_core::Tensor,
) {
    let m = manifest_of(&dir());
    let run = m["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone();
    let case = dir().join(run["file"].as_str().unwrap());
    let out = scratch(&format!("ip-{name}")).join("out.safetensors");
    let scale = &run["scale"];
    let mut cmd = imprint();
    cmd.args(["debug", "sample", "--model"])
        .arg(model())
        .args(["--prompt", run["prompt"].as_str().unwrap()])
        .args(["--scheduler", run["scheduler"].as_str().unwrap()])
        .args(["--steps", "8", "--guidance", "7.5", "--latents"])
        .arg(&case)
        .arg("--output")
        .arg(&out)
        .arg("--ip-adapter");
    let adapter = dir().join(run["adapter"].as_str().unwrap());
    if scale.is_number() {
        cmd.arg(format!("{}:{}", adapter.display(), scale.as_f64().unwrap()));
    } else {
        cmd.arg(&adapter)
            .arg("--ip-adapter-blocks")
            .arg(scale.to_string());
    }
    if let Some(n) = run["negative_prompt"].as_str() {
        cmd.args(["--negative-prompt", n]);
    }
    for img in run["images"].as_array().unwrap() {
        cmd.arg("--ip-image").arg(dir().join(img.as_str().unwrap()));
    }
    run_ok(&mut cmd);
    let ours = load(&out)["latents"].clone();
    let reference = load(&case);
    (
        ours,
        reference["expected"].clone(),
        reference["plain"].clone(),
    )
}

fn check(name: &str) {
    let (ours, expected, plain) = run_case(name);
    let err = rel_err(&ours, &expected);
    assert!(err <= 1e-3, "{name}: relative error {err}");
    if name != "base_0.0_ddim" {
        // The adapter changes the result: the comparison tests something.
        assert!(
            rel_err(&plain, &expected) > 0.1,
            "{name}: reference equals plain"
        );
    }
}

#[test]
fn base_adapter_matches_diffusers_ddim_and_euler() {
    check("base_0.7_ddim");
    check("base_1.0_euler");
}

#[test]
fn scale_zero_reproduces_the_base_model_exactly() {
    let (ours, expected, plain) = run_case("base_0.0_ddim");
    assert!(rel_err(&ours, &expected) <= 1e-3);
    assert!(rel_err(&ours, &plain) <= 1e-3);
}

#[test]
fn per_block_scales_follow_instantstyle() {
    check("base_instantstyle_ddim");
}

#[test]
fn plus_adapter_resampler_matches_diffusers() {
    check("plus_0.6_euler");
}

/// Several `--ip-image`s average their image embeddings (diffusers' own multi-image path
/// concatenates tokens instead; the reference for averaging passes the mean embedding).
#[test]
fn several_images_average_their_embeddings() {
    check("base_mean_embeds_ddim");
}

#[test]
fn bad_image_prompts_are_refused_without_output() {
    let out_dir = scratch("ip-bad");
    let out = out_dir.join("out.safetensors");
    let case = dir().join("case_0.safetensors");
    let base = |extra: &[&str]| {
        let mut cmd = imprint();
        cmd.args(["debug", "sample", "--model"])
            .arg(model())
            .args([
                "--prompt",
                "a cat",
                "--scheduler",
                "ddim",
                "--steps",
                "2",
                "--guidance",
                "7.5",
                "--latents",
            ])
            .arg(&case)
            .arg("--output")
            .arg(&out)
            .args(extra);
        cmd.output().unwrap()
    };
    let adapter = dir().join("ip-adapter.safetensors").display().to_string();
    let bad = dir().join("bad.png").display().to_string();
    for (args, needle) in [
        (
            vec!["--ip-adapter", &adapter, "--ip-image", &bad],
            "bad.png",
        ),
        (
            vec!["--ip-adapter", &adapter, "--ip-image", "missing.png"],
            "missing.png",
        ),
        (vec!["--ip-adapter", &adapter], "--ip-image"),
        (vec!["--ip-image", &bad], "--ip-adapter"),
        (
            vec!["--ip-adapter", "nope.safetensors", "--ip-image", &bad],
            "not found",
        ),
    ] {
        let o = base(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "output written despite the error");
    }
}

/// h94's pickled `.bin` (two nested dicts) reads as the safetensors file does, without unpickling.
#[test]
fn pickled_bin_adapter_gives_the_same_result() {
    let case = dir().join("case_0.safetensors");
    let sample = |adapter: &str, out: &std::path::Path| {
        let mut cmd = imprint();
        cmd.args(["debug", "sample", "--model"])
            .arg(model())
            .args([
                "--prompt",
                "a photo of a cat on a table",
                "--negative-prompt",
                "blurry",
            ])
            .args([
                "--scheduler",
                "ddim",
                "--steps",
                "8",
                "--guidance",
                "7.5",
                "--latents",
            ])
            .arg(&case)
            .arg("--output")
            .arg(out)
            .arg("--ip-adapter")
            .arg(format!("{}:0.7", dir().join(adapter).display()))
            .arg("--ip-image")
            .arg(dir().join("image.png"));
        run_ok(&mut cmd);
        load(out)["latents"].clone()
    };
    let s = scratch("ip-bin");
    let a = sample("ip-adapter.safetensors", &s.join("a.safetensors"));
    let b = sample("ip-adapter.bin", &s.join("b.safetensors"));
    assert_eq!(rel_err(&a, &b), 0.0);
}

/// Trains 3 TI steps on the diffusers-made model with validation at every step; `ip` adds an image
/// prompt to the validation. Returns (learned vectors, final grid, grid at step 1).
fn train_with_validation(
    name: &str,
    method: &str,
    ip: Option<&str>,
) -> (Vec<f32>, image::RgbImage, image::RgbImage) {
    let work = scratch(&format!("ip-validation-{name}"));
    let out = work.join("concept.safetensors");
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let mut cmd = imprint();
    cmd.args(["train", method, "--model"])
        .arg(model())
        .arg("--images")
        .arg(&images)
        .arg("--out")
        .arg(&out)
        .args(["--steps", "3", "--resolution", "32", "--batch-size", "1"])
        .args([
            "--validation-prompt",
            "a photo of <toy>",
            "--validation-every",
            "1",
        ])
        .args(["--num-validation-images", "1", "--validation-steps", "3"]);
    if method == "ti" {
        cmd.args([
            "--token",
            "<toy>",
            "--init-word",
            "one",
            "--grad-accum",
            "1",
        ]);
    } else {
        cmd.args(["--instance-prompt", "a photo of <toy>", "--lr", "1e-2"]);
    }
    if let Some(spec) = ip {
        cmd.arg("--validation-ip-adapter")
            .arg(format!("{}:{spec}", dir_file("ip-adapter.safetensors")))
            .arg("--validation-ip-image")
            .arg(dir().join("image.png"));
    }
    ok(cmd.output().unwrap());
    let vectors: Vec<f32> = load(&out)
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let grid = |step: usize| {
        image::open(work.join(format!("concept.validation/step-{step:06}.png")))
            .unwrap()
            .to_rgb8()
    };
    (vectors, grid(3), grid(1))
}

fn dir_file(name: &str) -> String {
    dir().join(name).display().to_string()
}

#[test]
fn validation_image_prompt_leaves_training_unchanged() {
    let (plain, plain_grid, plain_first) = train_with_validation("plain", "ti", None);
    let (zero, zero_grid, _) = train_with_validation("zero", "ti", Some("0.0"));
    let (full, full_grid, full_first) = train_with_validation("full", "ti", Some("1.0"));
    // Training never sees the adapter: the learned vectors are bit for bit the same.
    assert_eq!(plain, zero);
    assert_eq!(plain, full);
    // At scale 0 the validation images are the base model's; at scale 1 the image prompt shows,
    // at the first validation and after training continued past it.
    assert_eq!(plain_grid, zero_grid);
    assert_ne!(plain_grid, full_grid);
    assert_ne!(plain_first, full_first);
}

#[test]
fn validation_image_prompt_sees_a_lora_being_trained() {
    // The adapter goes on a copy of the model: that copy must carry the LoRA as trained so far.
    let (plain, plain_grid, plain_first) = train_with_validation("lora-plain", "lora", None);
    let (zero, zero_grid, zero_first) = train_with_validation("lora-zero", "lora", Some("0.0"));
    assert_eq!(plain, zero);
    assert_ne!(
        plain_first, plain_grid,
        "the LoRA moved between step 1 and 3"
    );
    assert_eq!(plain_grid, zero_grid);
    assert_eq!(plain_first, zero_first);
}

#[test]
fn broken_validation_image_prompt_fails_before_training() {
    let work = scratch("ip-validation-broken");
    let out = work.join("concept.safetensors");
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    for (adapter, image, expect) in [
        (
            dir_file("ip-adapter.safetensors"),
            dir().join("bad.png"),
            "bad.png",
        ),
        (
            dir_file("missing.safetensors"),
            dir().join("image.png"),
            "not found",
        ),
    ] {
        let output = imprint()
            .args([
                "train",
                "ti",
                "--token",
                "<toy>",
                "--init-word",
                "one",
                "--model",
            ])
            .arg(model())
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&out)
            .args(["--steps", "2", "--resolution", "32"])
            .args(["--validation-prompt", "a photo of <toy>"])
            .arg("--ip-adapter")
            .arg(&adapter)
            .arg("--ip-image")
            .arg(&image)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(expect), "{err}");
        assert!(
            std::fs::read_dir(&work).unwrap().next().is_none(),
            "nothing may be written"
        );
    }
}
