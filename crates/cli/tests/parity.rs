//! Parity with diffusers/transformers through the `imprint debug` commands, against the committed
//! fixtures of tools/reference/make_fixtures.py, at DESIGN.md's tolerances.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

const COMPONENT_TOL: f64 = 1e-4;
const SAMPLING_TOL: f64 = 1e-3;

/// The model a fixture was computed on: committed beside it when diffusers wrote it, else the
/// folder `imprint model init` writes for that config.
fn model_for(config: &str) -> std::path::PathBuf {
    let committed = fixtures().join(config).join("model");
    if committed.is_dir() {
        committed
    } else {
        tiny_model(config)
    }
}

fn manifest(config: &str) -> Value {
    let p = fixtures().join(config).join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The fixtures were computed on the weights `model init` writes; if init changes, they must be
/// regenerated (this names the cause instead of failing every comparison).
fn check_fingerprint(config: &str, model: &Path) {
    let m = manifest(config);
    let weights = load(&model.join("unet/diffusion_pytorch_model.safetensors"));
    let sum: f64 = weights
        .values()
        .map(|t| {
            t.to_dtype(candle_core::DType::F64)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    let expected = m["unet_weight_abs_sum"].as_f64().unwrap();
    assert!(
        (sum - expected).abs() <= 1e-6 * expected,
        "`model init --config {config}` no longer writes the weights the fixtures were made from \
         ({sum} vs {expected}): regenerate them with tools/reference/make_fixtures.py"
    );
}

fn forward_case(config: &str, component: &str, fixture: &str, outputs: &[(&str, &str)]) {
    let model = model_for(config);
    check_fingerprint(config, &model);
    let input = fixtures().join(config).join(fixture);
    let out = scratch("forward").join(format!("{config}-{fixture}"));
    run_ok(
        imprint()
            .args(["debug", "forward", "--component", component, "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out),
    );
    let ours = load(&out);
    let reference = load(&input);
    for (ours_key, ref_key) in outputs {
        let err = rel_err(&ours[*ours_key], &reference[*ref_key]);
        assert!(
            err <= COMPONENT_TOL,
            "{config} {component} {ours_key}: relative error {err:e}"
        );
    }
}

fn tokenize_case(config: &str) {
    let model = model_for(config);
    let m = manifest(config);
    for (prompt, ids) in m["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(m["input_ids"].as_array().unwrap())
    {
        let out = run_ok(
            imprint()
                .args(["debug", "tokenize", "--model"])
                .arg(&model)
                .args(["--prompt", prompt.as_str().unwrap()]),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(&v["input_ids"], ids, "{config}: tokenizing {prompt}");
    }
}

fn sampling_case(config: &str) {
    let model = model_for(config);
    let m = manifest(config);
    for run in m["sampling"].as_array().unwrap() {
        let input = fixtures().join(config).join(run["file"].as_str().unwrap());
        let out = scratch("sample").join(format!("{config}-{}", run["file"].as_str().unwrap()));
        let mut cmd = imprint();
        cmd.args(["debug", "sample", "--model"]).arg(&model);
        cmd.args([
            "--prompt",
            run["prompt"].as_str().unwrap(),
            "--scheduler",
            run["scheduler"].as_str().unwrap(),
        ]);
        cmd.args([
            "--steps",
            &run["steps"].to_string(),
            "--guidance",
            &run["guidance"].to_string(),
        ]);
        if let Some(neg) = run["negative_prompt"].as_str() {
            cmd.args(["--negative-prompt", neg]);
        }
        if run["karras"].as_bool().unwrap() {
            cmd.arg("--karras");
        }
        run_ok(cmd.arg("--latents").arg(&input).arg("--output").arg(&out));
        let err = rel_err(&load(&out)["latents"], &load(&input)["expected"]);
        assert!(
            err <= SAMPLING_TOL,
            "{config} sampling with {}: relative error {err:e}",
            run
        );
    }
}

macro_rules! parity_tests {
    ($modname:ident, $config:literal) => {
        mod $modname {
            use super::*;

            #[test]
            fn tokenizer() {
                tokenize_case($config);
            }

            #[test]
            fn text_encoder() {
                forward_case(
                    $config,
                    "text-encoder",
                    "text_encoder.safetensors",
                    &[
                        ("last_hidden_state", "last_hidden_state"),
                        ("pooler_output", "pooler_output"),
                    ],
                );
            }

            #[test]
            fn unet() {
                forward_case(
                    $config,
                    "unet",
                    "unet.safetensors",
                    &[("sample", "expected")],
                );
                forward_case(
                    $config,
                    "unet",
                    "unet_odd.safetensors",
                    &[("sample", "expected")],
                );
            }

            #[test]
            fn vae_encoder() {
                forward_case(
                    $config,
                    "vae-encoder",
                    "vae_encoder.safetensors",
                    &[("mean", "mean"), ("logvar", "logvar")],
                );
            }

            #[test]
            fn vae_decoder() {
                forward_case(
                    $config,
                    "vae-decoder",
                    "vae_decoder.safetensors",
                    &[("sample", "expected")],
                );
            }

            #[test]
            fn sampling_with_every_scheduler() {
                sampling_case($config);
            }
        }
    };
}

parity_tests!(sd1, "tiny");
parity_tests!(sd2, "tiny-sd2");
parity_tests!(diffusers_made, "diffusers-made");
