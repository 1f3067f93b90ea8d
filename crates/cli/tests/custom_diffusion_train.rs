//! `imprint train custom-diffusion` end to end on the tiny model: two modifier tokens trained
//! jointly, diffusers' folder and the native file written, the folder (whole weights) and the
//! native file (weight changes) giving the same sample, and `--rank` compression reported.

mod common;

use common::*;
use std::path::Path;

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny_model("tiny");
    let images = fixtures().join("../../examples/toy");
    imprint()
        .args(["train", "custom-diffusion", "--model"])
        .arg(&model)
        .arg("--images")
        .arg(&images)
        .args([
            "--token",
            "<new1>",
            "--init-word",
            "toy",
            "--token",
            "<new2>",
        ])
        .args([
            "--init-word",
            "robot",
            "--instance-prompt",
            "a <new1> toy and a <new2> robot",
        ])
        .args([
            "--steps",
            "2",
            "--resolution",
            "64",
            "--save-every",
            "0",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn sample(concept: &Path, out: &Path) -> candle_core::Tensor {
    let model = tiny_model("tiny");
    let latents = fixtures().join("tiny/sample_0.safetensors");
    run_ok(
        imprint()
            .args(["debug", "sample", "--model"])
            .arg(&model)
            .args(["--prompt", "a <new1> toy and a <new2> robot on a table"])
            .args([
                "--scheduler",
                "ddim",
                "--steps",
                "4",
                "--guidance",
                "7.5",
                "--latents",
            ])
            .arg(&latents)
            .arg("--output")
            .arg(out)
            .arg("--concept")
            .arg(concept),
    );
    load(out)["latents"].clone()
}

#[test]
fn trains_two_tokens_and_writes_both_forms() {
    let dir = scratch("cd-train");
    let out = dir.join("cd");
    let _ = std::fs::remove_dir_all(&out);
    let o = train(&out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out
        .join("pytorch_custom_diffusion_weights.safetensors")
        .is_file());
    assert!(out.join("<new1>.safetensors").is_file());
    assert!(out.join("<new2>.safetensors").is_file());
    let weights = load(&out.join("pytorch_custom_diffusion_weights.safetensors"));
    // The tiny UNet's 7 cross-attention layers, keys and values.
    assert_eq!(weights.len(), 14);
    assert!(weights
        .keys()
        .all(|k| k.contains(".attn2.processor.to_") && k.ends_with("_custom_diffusion.weight")));
    let native = dir.join("cd.safetensors");
    let a = sample(&out, &dir.join("a.safetensors"));
    let b = sample(&native, &dir.join("b.safetensors"));
    let err = rel_err(&a, &b);
    assert!(err < 1e-5, "folder and native file differ by {err:e}");
    // An existing output is refused.
    let again = train(&out, &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn rank_compression_reports_its_cost() {
    let dir = scratch("cd-rank");
    let out = dir.join("cd");
    let _ = std::fs::remove_dir_all(&out);
    let o = train(&out, &["--rank", "2", "--train-q-out"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 2:") && stderr.contains("bytes"),
        "{stderr}"
    );
    let weights = load(&out.join("pytorch_custom_diffusion_weights.safetensors"));
    assert!(weights
        .keys()
        .any(|k| k.ends_with("to_out_custom_diffusion.0.bias")));
    let native = load(&dir.join("cd.safetensors"));
    assert!(native.keys().any(|k| k.ends_with(".lora_down.weight")));
}

#[test]
fn two_concepts_merge_in_closed_form() {
    let dir = scratch("cd-merge");
    let model = tiny_model("tiny");
    let images = fixtures().join("../../examples/toy");
    let mut outs = vec![];
    // The second concept's native file holds its changes as rank-4 LoRA pairs (--rank).
    for (token, word, rank) in [("<cat1>", "cat", "0"), ("<dog1>", "dog", "4")] {
        let out = dir.join(token.trim_matches(|c| c == '<' || c == '>'));
        let _ = std::fs::remove_dir_all(&out);
        run_ok(
            imprint()
                .args(["train", "custom-diffusion", "--model"])
                .arg(&model)
                .arg("--images")
                .arg(&images)
                .args(["--token", token, "--init-word", word])
                .args(["--instance-prompt", &format!("a photo of {token} {word}")])
                .args([
                    "--steps",
                    "2",
                    "--resolution",
                    "64",
                    "--lr",
                    "1e-3",
                    "--save-every",
                    "0",
                ])
                .args(if rank == "0" {
                    vec![]
                } else {
                    vec!["--rank", rank]
                })
                .arg("--out")
                .arg(&out),
        );
        outs.push(out);
    }
    assert!(load(&dir.join("dog1.safetensors"))
        .keys()
        .any(|k| k.ends_with(".lora_down.weight")));
    let merged = dir.join("merged.safetensors");
    let _ = std::fs::remove_file(&merged);
    let o = run_ok(
        imprint()
            .args(["concept", "merge", "--model"])
            .arg(&model)
            .arg(&outs[0])
            .arg(dir.join("dog1.safetensors"))
            .arg("--out")
            .arg(&merged),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let residual: f64 = stderr
        .split("residual ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no residual reported: {stderr}"));
    assert!(residual < 1e-3, "constraint residual {residual}");
    // The merged concept holds both words and applies.
    let v: serde_json::Value = serde_json::from_slice(
        &run_ok(
            imprint()
                .args(["concept", "inspect", "--json"])
                .arg(&merged),
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(v["trigger"], "<cat1>");
    let out = dir.join("s.safetensors");
    run_ok(
        imprint()
            .args(["debug", "sample", "--model"])
            .arg(&model)
            .args(["--prompt", "a <cat1> cat next to a <dog1> dog"])
            .args([
                "--scheduler",
                "ddim",
                "--steps",
                "2",
                "--guidance",
                "7.5",
                "--latents",
            ])
            .arg(fixtures().join("tiny/sample_0.safetensors"))
            .arg("--output")
            .arg(&out)
            .arg("--concept")
            .arg(&merged),
    );
}
