//! `imprint train svdiff` end to end on the tiny model: the native file and the public
//! `spectral_shifts` folder give the same sample, a zero shift (scale 0) reproduces the base model
//! exactly, the text encoder trains too, and shifts for layers the model lacks are refused.

mod common;

use common::*;
use std::path::Path;

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    imprint()
        .env("IMPRINT_CACHE_DIR", out.with_extension("cache"))
        .args(["train", "svdiff", "--model"])
        .arg(tiny_model("tiny"))
        .arg("--images")
        .arg(fixtures().join("../../examples/toy"))
        .args(["--instance-prompt", "a photo of sks toy", "--steps", "2"])
        .args([
            "--resolution",
            "64",
            "--save-every",
            "0",
            "--lr",
            "1e-2",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn sample(concept: Option<&str>, out: &Path) -> candle_core::Tensor {
    let mut cmd = imprint();
    cmd.env("IMPRINT_CACHE_DIR", out.with_extension("cache"))
        .args(["debug", "sample", "--model"])
        .arg(tiny_model("tiny"))
        .args(["--prompt", "a photo of sks toy on a table"])
        .args([
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--guidance",
            "7.5",
            "--latents",
        ])
        .arg(fixtures().join("tiny/sample_0.safetensors"))
        .arg("--output")
        .arg(out);
    if let Some(c) = concept {
        cmd.arg("--concept").arg(c);
    }
    run_ok(&mut cmd);
    load(out)["latents"].clone()
}

#[test]
fn trains_shifts_that_round_trip_and_vanish_at_scale_zero() {
    let dir = scratch("svdiff");
    let native = dir.join("sks.safetensors");
    let _ = std::fs::remove_file(&native);
    let o = train(&native, &["--train-text-encoder"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tensors = load(&native);
    assert!(tensors.keys().all(|k| k.ends_with(".delta")));
    assert!(tensors
        .keys()
        .any(|k| k.starts_with("unet.") && k.contains(".norm1.")));
    assert!(tensors
        .keys()
        .any(|k| k.starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")));
    let moved = tensors.values().any(|t| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved, "training moved no shift");

    // The public folder layout holds the same concept.
    let folder = dir.join("sks-svdiff");
    let _ = std::fs::remove_dir_all(&folder);
    run_ok(
        imprint()
            .args(["concept", "convert", "--format", "svdiff"])
            .arg(&native)
            .arg(&folder),
    );
    assert!(folder.join("spectral_shifts.safetensors").is_file());
    assert!(folder.join("spectral_shifts_te.safetensors").is_file());
    let a = sample(Some(native.to_str().unwrap()), &dir.join("a.safetensors"));
    let b = sample(Some(folder.to_str().unwrap()), &dir.join("b.safetensors"));
    assert_eq!(rel_err(&a, &b), 0.0);

    // σ + 0·δ is the base model, bit for bit; the trained shift changes the sample.
    let base = sample(None, &dir.join("base.safetensors"));
    let zero = sample(
        Some(&format!("{}:0", native.display())),
        &dir.join("zero.safetensors"),
    );
    assert_eq!(rel_err(&zero, &base), 0.0);
    assert!(rel_err(&a, &base) > 0.0);
}

#[test]
fn shifts_for_layers_the_model_lacks_are_refused() {
    let dir = scratch("svdiff-bad");
    let bad = dir.join("bad.safetensors");
    let t =
        candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let map =
        std::collections::HashMap::from([("down_blocks.9.resnets.0.conv1.delta".to_string(), t)]);
    let folder = dir.join("shifts");
    std::fs::create_dir_all(&folder).unwrap();
    candle_core::safetensors::save(&map, folder.join("spectral_shifts.safetensors")).unwrap();
    let out = imprint()
        .args([
            "generate",
            "--prompt",
            "a photo of sks toy",
            "--steps",
            "2",
            "--model",
        ])
        .arg(tiny_model("tiny"))
        .arg("--concept")
        .arg(&folder)
        .arg("--out")
        .arg(&bad.with_extension("png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("down_blocks.9.resnets.0.conv1") && msg.contains("not a layer"),
        "{msg}"
    );
    assert!(!bad.with_extension("png").exists());
}

/// Two subjects for Cut-Mix-Unmix: the toy photos and a second folder of two of them.
fn second_subject(dir: &Path) -> std::path::PathBuf {
    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    for name in ["toy-0.png", "toy-2.png"] {
        std::fs::copy(
            fixtures().join("../../examples/toy").join(name),
            second.join(name),
        )
        .unwrap();
    }
    second
}

fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.with_extension("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn cut_mix_unmix_adds_the_weighted_attention_penalty_to_the_loss() {
    let dir = scratch("svdiff-cut-mix");
    let second = second_subject(&dir);
    // A Cut-Mix-Unmix run with `extra` flags; its log lines.
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec![
            "--second-images",
            second.to_str().unwrap(),
            "--second-instance-prompt",
            "a photo of zwx toy",
            "--subjects",
            "sks toy,zwx toy",
            "--cut-mix-prob",
            "1",
        ];
        args.extend_from_slice(extra);
        ok(train(&out, &args));
        log_lines(&out)
    };
    let plain = run("plain", &["--unmix-weight", "0"]);
    let weighted = run("weighted", &["--unmix-weight", "1000"]);
    let unmix = plain[0]["unmix"].as_f64().unwrap();
    assert!(unmix > 0.0 && unmix.is_finite(), "{unmix}");
    // The first step sees the same batch and weights in both runs: the losses differ by the
    // weighted penalty exactly.
    assert!((weighted[0]["unmix"].as_f64().unwrap() - unmix).abs() < 1e-9);
    let gap = weighted[0]["loss"].as_f64().unwrap() - plain[0]["loss"].as_f64().unwrap();
    assert!(
        (gap - 1000.0 * unmix).abs() < 1e-3 * (1000.0 * unmix).max(1e-3),
        "loss gap {gap} vs 1000 × unmix {unmix}"
    );
    // In fp16 mixed precision the penalty (computed from half-precision attention) joins the
    // f32 loss too, and stays close to the f32 run's.
    let half = run("fp16", &["--mixed-precision", "fp16"])[0]["unmix"]
        .as_f64()
        .unwrap();
    assert!(
        (half - unmix).abs() < 1e-2 * unmix,
        "fp16 unmix {half} vs f32 {unmix}"
    );
    // A run without cut-mix logs no unmix term.
    let single = dir.join("single.safetensors");
    ok(train(&single, &[]));
    assert!(log_lines(&single)[0].get("unmix").is_none());
}

#[test]
fn cut_mix_options_are_checked_before_anything_is_written() {
    let dir = scratch("svdiff-cut-mix-bad");
    let second = second_subject(&dir);
    let out = dir.join("concept.safetensors");
    for (extra, expect) in [
        (
            vec!["--second-images", second.to_str().unwrap()],
            "--subjects",
        ),
        (vec!["--subjects", "sks toy,zwx toy"], "--second-images"),
        (
            vec![
                "--second-images",
                second.to_str().unwrap(),
                "--second-instance-prompt",
                "a photo of zwx toy",
                "--subjects",
                "sks toy,zwx toy",
                "--cut-mix-prompt",
                "a {left} and a toy",
            ],
            "{right}",
        ),
        (
            vec![
                "--second-images",
                second.to_str().unwrap(),
                "--subjects",
                "sks toy,zwx toy",
            ],
            "--second-instance-prompt",
        ),
    ] {
        let output = train(&out, &extra);
        assert!(!output.status.success());
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(expect), "{err}");
        assert!(!out.exists() && !out.with_extension("log.jsonl").exists());
    }
}
