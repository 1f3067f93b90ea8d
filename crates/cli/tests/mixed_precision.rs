//! `train --mixed-precision fp16|bf16` on the tiny model: the UNet's frozen weights and activations
//! in half precision, the trained tensors (and what is saved) in f32. Each run's losses follow the
//! f32 run's within half precision's error, and fp16's loss scale is kept across a resume.

mod common;

use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy")
}

fn losses(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Trains `args` at `precision` for 3 steps into `dir/c.safetensors` (a folder `dir/c` for
/// DreamBooth); returns that output and the losses.
fn train(name: &str, args: &[&str], precision: &str) -> (PathBuf, Vec<f64>) {
    let dir = scratch(&format!("mp-{name}-{precision}"));
    let out = if name == "dreambooth" {
        dir.join("c")
    } else {
        dir.join("c.safetensors")
    };
    run_ok(
        imprint()
            .arg("train")
            .args(args)
            .args([
                "--steps",
                "3",
                "--resolution",
                "64",
                "--mixed-precision",
                precision,
            ])
            .arg("--model")
            .arg(tiny_model("tiny"))
            .arg("--images")
            .arg(examples())
            .arg("--out")
            .arg(&out),
    );
    let l = losses(&dir.join("c.log.jsonl"));
    (out, l)
}

fn check_method(name: &str, args: &[&str]) {
    let (_, full) = train(name, args, "no");
    // On the CPU only fp16 (candle's CPU convolution has no bf16 kernel, and training refuses
    // it there); tools/cuda/device.sh runs this file with IMPRINT_DEVICE=cuda for both.
    let on_gpu = std::env::var("IMPRINT_DEVICE").is_ok_and(|d| d.starts_with("cuda"));
    let precisions: &[&str] = if on_gpu { &["bf16", "fp16"] } else { &["fp16"] };
    for &precision in precisions {
        let (out, half) = train(name, args, precision);
        assert_eq!(half.len(), 3);
        // bf16 keeps 8 significant bits: a whole UNet pass loses a few of them.
        let tol = if precision == "bf16" { 5e-2 } else { 1e-2 };
        for (step, (h, f)) in half.iter().zip(&full).enumerate() {
            let err = (h - f).abs() / f.abs();
            assert!(
                err < tol,
                "{name} {precision} step {}: loss {h} against f32's {f}",
                step + 1
            );
        }
        let saved = if name == "dreambooth" {
            out.join("unet/diffusion_pytorch_model.safetensors")
        } else {
            out
        };
        for (key, t) in load(&saved) {
            assert_eq!(
                t.dtype(),
                DType::F32,
                "{name} {precision}: {key} saved as {:?}",
                t.dtype()
            );
        }
    }
}

#[test]
fn textual_inversion_in_half_precision_follows_f32() {
    check_method(
        "ti",
        &[
            "ti",
            "--token",
            "<my-toy>",
            "--init-word",
            "toy",
            "--lr",
            "5e-3",
        ],
    );
}

#[test]
fn lora_in_half_precision_follows_f32() {
    check_method(
        "lora",
        &[
            "lora",
            "--instance-prompt",
            "a photo of sks toy",
            "--rank",
            "2",
            "--lr",
            "1e-3",
        ],
    );
}

/// DreamBooth trains the UNet's own weights: they stay f32 and are cast where they meet the
/// half-precision activations.
#[test]
fn dreambooth_in_half_precision_follows_f32() {
    check_method(
        "dreambooth",
        &[
            "dreambooth",
            "--instance-prompt",
            "a photo of sks toy",
            "--lr",
            "1e-4",
        ],
    );
}

#[test]
fn unknown_precision_and_fp16_with_fused_backward_are_refused() {
    let dir = scratch("mp-refused");
    let out = imprint()
        .args([
            "train",
            "dreambooth",
            "--instance-prompt",
            "a photo of sks toy",
        ])
        .args([
            "--mixed-precision",
            "fp16",
            "--gradient-checkpointing",
            "--fused-backward",
        ])
        .arg("--model")
        .arg(tiny_model("tiny"))
        .arg("--images")
        .arg(examples())
        .arg("--out")
        .arg(dir.join("db"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--fused-backward"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("db").exists());
    let out = imprint()
        .args([
            "train",
            "ti",
            "--token",
            "<x>",
            "--init-word",
            "toy",
            "--mixed-precision",
            "fp8",
        ])
        .arg("--model")
        .arg(tiny_model("tiny"))
        .arg("--images")
        .arg(examples())
        .arg("--out")
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    if std::env::var("IMPRINT_DEVICE").is_err() {
        let out = imprint()
            .args([
                "train",
                "ti",
                "--token",
                "<x>",
                "--init-word",
                "toy",
                "--mixed-precision",
                "bf16",
            ])
            .arg("--model")
            .arg(tiny_model("tiny"))
            .arg("--images")
            .arg(examples())
            .arg("--out")
            .arg(dir.join("x.safetensors"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs a GPU"));
        assert!(!dir.join("x.safetensors").exists());
    }
}
