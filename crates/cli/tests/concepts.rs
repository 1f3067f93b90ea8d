//! Concept files end to end: sampling with applied textual-inversion concepts matches diffusers'
//! `load_textual_inversion` (fixtures of tools/reference/concept_files.py, DESIGN.md's sampling
//! tolerance), `imprint concept inspect` / `convert`, and clean failures of `generate --concept`.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SAMPLING_TOL: f64 = 1e-3;

fn concepts_dir() -> PathBuf {
    fixtures().join("concepts")
}

fn manifest() -> Value {
    let p = concepts_dir().join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn inspect(file: &Path) -> Value {
    let out = run_ok(imprint().args(["concept", "inspect", "--json"]).arg(file));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn vectors(file: &Path) -> Vec<f32> {
    let tensors = load(file);
    assert_eq!(tensors.len(), 1, "{}", file.display());
    let t = tensors.into_values().next().unwrap();
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The fixtures were computed on the weights `model init` writes (see parity.rs).
fn check_fingerprint(model: &Path) {
    let weights = load(&model.join("unet/diffusion_pytorch_model.safetensors"));
    let sum: f64 = weights
        .values()
        .map(|t| {
            let t = t.to_dtype(candle_core::DType::F64).unwrap();
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    let expected = manifest()["unet_weight_abs_sum"].as_f64().unwrap();
    assert!(
        (sum - expected).abs() <= 1e-6 * expected,
        "`model init --config tiny` no longer writes the weights the concept fixtures were made \
         from ({sum} vs {expected}): regenerate them with tools/reference/concept_files.py"
    );
}

#[test]
fn sampling_with_concepts_matches_diffusers() {
    let model = tiny_model("tiny");
    check_fingerprint(&model);
    let m = manifest();
    for run in m["sampling"].as_array().unwrap() {
        let file = run["file"].as_str().unwrap();
        let input = concepts_dir().join(file);
        let out = scratch("concept-sample").join(file);
        let mut cmd = imprint();
        cmd.args(["debug", "sample", "--model"]).arg(&model);
        cmd.args(["--prompt", run["prompt"].as_str().unwrap()]);
        cmd.args(["--scheduler", run["scheduler"].as_str().unwrap()]);
        cmd.args(["--steps", &run["steps"].to_string()]);
        cmd.args(["--guidance", &run["guidance"].to_string()]);
        if let Some(neg) = run["negative_prompt"].as_str() {
            cmd.args(["--negative-prompt", neg]);
        }
        for c in run["concepts"].as_array().unwrap() {
            cmd.arg("--concept")
                .arg(concepts_dir().join(c.as_str().unwrap()));
        }
        run_ok(cmd.arg("--latents").arg(&input).arg("--output").arg(&out));
        let err = rel_err(&load(&out)["latents"], &load(&input)["expected"]);
        eprintln!("{file}: relative error {err:e}");
        assert!(
            err <= SAMPLING_TOL,
            "sampling with concepts {run}: relative error {err:e}"
        );
    }
}

#[test]
fn a_concept_changes_the_result() {
    // Guards the parity test against concepts silently not being applied: scale 0 zeroes the
    // trigger's vectors, which must change the latents.
    let model = tiny_model("tiny");
    let run = &manifest()["sampling"][0];
    let input = concepts_dir().join(run["file"].as_str().unwrap());
    let out = scratch("concept-scale").join("zero.safetensors");
    let concept = format!(
        "{}:0",
        concepts_dir().join("learned_embeds.safetensors").display()
    );
    run_ok(
        imprint()
            .args([
                "debug",
                "sample",
                "--scheduler",
                "ddim",
                "--steps",
                "8",
                "--guidance",
                "7.5",
            ])
            .args([
                "--prompt",
                run["prompt"].as_str().unwrap(),
                "--concept",
                &concept,
            ])
            .arg("--model")
            .arg(&model)
            .arg("--latents")
            .arg(&input)
            .arg("--output")
            .arg(&out),
    );
    let err = rel_err(&load(&out)["latents"], &load(&input)["expected"]);
    assert!(err > 1e-2, "scale 0 gave the same latents ({err:e})");
}

#[test]
fn a_prompt_without_the_trigger_is_warned_about() {
    let model = tiny_model("tiny");
    let run = &manifest()["sampling"][0];
    let input = concepts_dir().join(run["file"].as_str().unwrap());
    let out = run_ok(
        imprint()
            .args([
                "debug",
                "sample",
                "--scheduler",
                "ddim",
                "--steps",
                "1",
                "--guidance",
                "1",
            ])
            .args(["--prompt", "a photo of a dog", "--concept"])
            .arg(concepts_dir().join("pt-toy.pt"))
            .arg("--model")
            .arg(&model)
            .arg("--latents")
            .arg(&input)
            .arg("--output")
            .arg(scratch("concept-warning").join("out.safetensors")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("pt-toy"),
        "{stderr}"
    );
}

#[test]
fn inspect_reports_trigger_vectors_and_format() {
    let v = inspect(&concepts_dir().join("learned_embeds.safetensors"));
    assert_eq!(v["format"], "diffusers");
    assert_eq!(v["trigger"], "<cat-toy>");
    assert_eq!(v["method"], "textual-inversion");
    assert_eq!(v["vectors"], 2);
    assert_eq!(v["dim"], manifest()["dim"]);
    assert_eq!(v["embeddings"][0]["norms"].as_array().unwrap().len(), 2);

    let v = inspect(&concepts_dir().join("pt-toy.pt"));
    assert_eq!(v["format"], "a1111");
    assert_eq!(v["trigger"], "pt-toy");
    assert_eq!(v["vectors"], 1);
    assert_eq!(v["base_model"], "tiny");

    let text = run_ok(
        imprint()
            .args(["concept", "inspect"])
            .arg(concepts_dir().join("learned_embeds.safetensors")),
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("trigger:    <cat-toy>") && text.contains("2 vectors × 32 dims"),
        "{text}"
    );
}

#[test]
fn convert_round_trip_preserves_vectors_exactly() {
    let dir = scratch("convert");
    let original = concepts_dir().join("learned_embeds.safetensors");
    let a1111 = dir.join("cat-toy.safetensors");
    let native = dir.join("cat-toy.imprint.safetensors");
    let back = dir.join("learned_embeds.safetensors");
    let convert = |input: &Path, output: &Path, format: &str, trigger: Option<&str>| {
        let mut cmd = imprint();
        cmd.args(["concept", "convert"]).arg(input).arg(output);
        cmd.args(["--format", format]);
        if let Some(t) = trigger {
            cmd.args(["--trigger", t]);
        }
        run_ok(&mut cmd);
    };
    convert(&original, &a1111, "a1111", None);
    assert_eq!(load(&a1111).keys().collect::<Vec<_>>(), ["emb_params"]);
    assert_eq!(inspect(&a1111)["trigger"], "cat-toy");
    convert(&a1111, &native, "native", Some("<cat-toy>"));
    let v = inspect(&native);
    assert_eq!(
        (v["format"].as_str(), v["trigger"].as_str()),
        (Some("native"), Some("<cat-toy>"))
    );
    convert(&native, &back, "diffusers", None);
    assert_eq!(inspect(&back)["trigger"], "<cat-toy>");
    assert_eq!(vectors(&back), vectors(&original));
    assert_eq!(vectors(&a1111), vectors(&original));
}

#[test]
fn generate_with_a_mismatched_concept_fails_cleanly() {
    let model = tiny_model("tiny");
    let dir = scratch("mismatch");
    // A 2-vector concept of the wrong width (SD 2.x's 1024 instead of the tiny model's 32).
    let bad = dir.join("learned_embeds.safetensors");
    let t = candle_core::Tensor::zeros(
        (2, 1024),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(&HashMap::from([("<wide>".to_string(), t)]), &bad).unwrap();
    let png = dir.join("out.png");
    let out = imprint()
        .args([
            "generate",
            "--prompt",
            "a <wide> cat",
            "--steps",
            "2",
            "--out",
        ])
        .arg(&png)
        .arg("--model")
        .arg(&model)
        .arg("--concept")
        .arg(format!("{}:0.5", bad.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("learned_embeds.safetensors")
            && stderr.contains("concept '<wide>' has 1024-dim vectors; this text encoder takes 32"),
        "{stderr}"
    );
    assert!(!png.exists(), "an image was written");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "stray files were written"
    );
}

#[test]
fn a_missing_concept_file_is_named() {
    let model = tiny_model("tiny");
    let out_png = scratch("missing-concept").join("x.png");
    let out = imprint()
        .args(["generate", "--prompt", "x", "--steps", "1", "--out"])
        .arg(&out_png)
        .arg("--model")
        .arg(&model)
        .args(["--concept", "no-such-concept.safetensors"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-concept.safetensors"), "{stderr}");
}
