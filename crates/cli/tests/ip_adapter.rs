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
