//! Device test: a few steps of TI, LoRA and DreamBooth on CUDA match the same steps on the CPU
//! (issue 9). Built with `--features cuda` and run by `tools/cuda/device.sh` on the GPU machine; it
//! needs a GPU, so CI only compiles it (`tools/cuda/build.sh --check`).
//!
//! The noise and timesteps are drawn on the host from the run's seed, so both devices see the same
//! batches. Compared: the loss of every step (the first is the forward pass alone, the later ones
//! also the updates before them) within 1e-4 relative, and the trained weights' change from their
//! start within 1e-3 relative L2. The change gets the looser bound because Adam's first steps move
//! every weight by about ±lr whatever its gradient's size, so a gradient within rounding of zero
//! can take either sign on either device.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Tensor;
use common::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    imprint_ops::grad_check::rel_l2(a, b).unwrap()
}

/// Trains `args` on both devices into `dir/{cpu,cuda}/OUT` and returns both runs' losses.
fn train_both(name: &str, args: &[&str], out: &str) -> (PathBuf, PathBuf, Vec<f64>, Vec<f64>) {
    let dir = scratch(&format!("cuda-steps-{name}"));
    let mut runs = vec![];
    for device in ["cpu", "cuda"] {
        let d = dir.join(device);
        std::fs::create_dir_all(&d).unwrap();
        let target = d.join(out);
        run_ok(train_on_toy(args, &target).args([
            "--steps",
            "3",
            "--resolution",
            "64",
            "--seed",
            "3",
            "--device",
            device,
        ]));
        let stem = out.trim_end_matches(".safetensors");
        runs.push((target, logged_losses(&d.join(format!("{stem}.log.jsonl")))));
    }
    let (cuda, cuda_losses) = runs.pop().unwrap();
    let (cpu, cpu_losses) = runs.pop().unwrap();
    assert_eq!(cpu_losses.len(), 3);
    assert_eq!(cpu_losses.len(), cuda_losses.len());
    for (step, (a, b)) in cuda_losses.iter().zip(&cpu_losses).enumerate() {
        let err = (a - b).abs() / b.abs().max(1e-12);
        assert!(
            err <= 1e-4,
            "{name} step {}: loss {a} on CUDA, {b} on the CPU",
            step + 1
        );
    }
    (cpu, cuda, cpu_losses, cuda_losses)
}

fn compare_change(
    name: &str,
    cpu: &HashMap<String, Tensor>,
    cuda: &HashMap<String, Tensor>,
    start: impl Fn(&str, &Tensor) -> Tensor,
) {
    assert!(!cpu.is_empty(), "{name}: nothing trained");
    for (key, c) in cpu {
        let g = cuda
            .get(key)
            .unwrap_or_else(|| panic!("{name}: {key} missing from the CUDA run"));
        let s = start(key, c);
        let err = rel_l2(&(g - &s).unwrap(), &(c - &s).unwrap());
        assert!(
            err <= 1e-3,
            "{name} {key}: change differs by {err:e} (relative L2)"
        );
    }
}

#[test]
fn textual_inversion_steps_match_cpu() {
    let (cpu, cuda, ..) = train_both(
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
        "toy.safetensors",
    );
    // The start of every vector is the initializer word's embedding, the same on both runs:
    // compare the vectors themselves, whose change is the whole of what was trained.
    let (a, b) = (load(&cpu), load(&cuda));
    for (key, c) in &a {
        let err = rel_l2(&b[key], c);
        assert!(err <= 1e-4, "ti {key}: relative L2 error {err:e}");
    }
}

#[test]
fn lora_steps_match_cpu() {
    let (cpu, cuda, ..) = train_both(
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
        "toy.safetensors",
    );
    // The up factors start at zero, so their values are the change itself; the down factors
    // start from the same seeded draw on both devices and are compared whole.
    let (a, b) = (load(&cpu), load(&cuda));
    compare_change("lora", &a, &b, |_, t| t.zeros_like().unwrap());
}

#[test]
fn dreambooth_steps_match_cpu() {
    let (cpu, cuda, ..) = train_both(
        "dreambooth",
        &[
            "dreambooth",
            "--instance-prompt",
            "a photo of sks toy",
            "--lr",
            "1e-4",
        ],
        "tuned",
    );
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let base = load(&tiny_model("tiny").join(unet));
    let (a, b) = (load(&cpu.join(unet)), load(&cuda.join(unet)));
    compare_change("dreambooth", &a, &b, |key, _| base[key].clone());
}
