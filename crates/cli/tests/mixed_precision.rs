//! `train --mixed-precision fp16|bf16` on the tiny model: the UNet's frozen weights and activations
//! in half precision, the trained tensors (and what is saved) in f32. Each run's losses follow the
//! f32 run's within half precision's error, and fp16's loss scale is saved in the checkpoints.

mod common;

use candle_core::DType;
use common::*;
use std::path::{Path, PathBuf};

/// Trains `args` at `precision` for 3 steps into `dir/c.safetensors` (a folder `dir/c` for
/// DreamBooth); returns that output and the losses.
fn train(name: &str, args: &[&str], precision: &str) -> (PathBuf, Vec<f64>) {
    let dir = scratch(&format!("mp-{name}-{precision}"));
    let out = if name == "dreambooth" {
        dir.join("c")
    } else {
        dir.join("c.safetensors")
    };
    run_ok(train_on_toy(args, &out).args([
        "--steps",
        "3",
        "--resolution",
        "64",
        "--mixed-precision",
        precision,
        "--save-every",
        "1",
    ]));
    let l = logged_losses(&dir.join("c.log.jsonl"));
    (out, l)
}

fn check_method(name: &str, args: &[&str]) {
    let (_, full) = train(name, args, "no");
    // tools/cuda/device.sh runs this file on the GPU too (IMPRINT_DEVICE=cuda).
    for precision in ["bf16", "fp16"] {
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
        if precision == "fp16" {
            // The loss scale is part of the checkpoint, so a resumed run continues with it.
            let ck = out
                .with_extension("checkpoints")
                .join("step-000002.safetensors");
            let state = load(&ck);
            let scale = state["state.loss_scaler.scale"].to_scalar::<f64>().unwrap();
            assert_eq!(scale, 65536.0, "{name}: {}", ck.display());
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

/// Runs `imprint train ARGS` on the tiny model and the toy images into `out`, expecting a refusal;
/// returns its stderr.
fn refused(args: &[&str], out: &Path) -> String {
    let o = train_on_toy(args, out).output().unwrap();
    assert!(!o.status.success(), "{args:?} ran");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn unknown_precision_and_fp16_with_fused_backward_are_refused() {
    let dir = scratch("mp-refused");
    let db = ["dreambooth", "--instance-prompt", "a photo of sks toy"];
    let fused = [
        "--mixed-precision",
        "fp16",
        "--gradient-checkpointing",
        "--fused-backward",
    ];
    let err = refused(&[&db[..], &fused[..]].concat(), &dir.join("db"));
    assert!(err.contains("--fused-backward"), "{err}");
    let ti = [
        "ti",
        "--token",
        "<x>",
        "--init-word",
        "toy",
        "--mixed-precision",
    ];
    refused(&[&ti[..], &["fp8"]].concat(), &dir.join("x.safetensors"));
}
