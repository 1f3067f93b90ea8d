//! Shared helpers of the CLI tests: the tiny model folders and running the binary.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

pub fn imprint() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imprint"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("imprint runs");
    assert!(
        out.status.success(),
        "imprint failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The toy example images the README's commands train on.
pub fn toy_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy")
}

/// `imprint train ARGS` on the tiny model and the toy images, writing `out` (more flags may be
/// added to the command).
pub fn train_on_toy(args: &[&str], out: &Path) -> Command {
    let mut cmd = imprint();
    cmd.arg("train")
        .args(args)
        .arg("--model")
        .arg(tiny_model("tiny"))
        .arg("--images")
        .arg(toy_images())
        .arg("--out")
        .arg(out);
    cmd
}

/// The `loss` of every line of a training run's `NAME.log.jsonl`.
pub fn logged_losses(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A scratch folder for this test binary (under cargo's per-target temp dir, named with the
/// process id). The first call also removes the folders of earlier test processes that have
/// exited: a test binary has no teardown, and their models and outputs would pile up run after run.
pub fn scratch(name: &str) -> PathBuf {
    static SWEPT: OnceLock<()> = OnceLock::new();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    SWEPT.get_or_init(|| sweep_finished_scratch(root));
    let p = root.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Removes `NAME-PID` folders whose process is gone (Linux: no `/proc/PID`); elsewhere keeps all.
fn sweep_finished_scratch(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .map(|(_, p)| p)
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The tiny model `config` written by `imprint model init --seed 0`, once per test binary: the same
/// folder the reference fixtures were computed on.
pub fn tiny_model(config: &str) -> PathBuf {
    static MODELS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut models = MODELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = models.get(config) {
        return p.clone();
    }
    let dir = scratch("models").join(config);
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(
        imprint()
            .args(["model", "init", "--config", config, "--seed", "0", "--out"])
            .arg(&dir),
    );
    models.insert(config.to_string(), dir.clone());
    dir
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// max |ours − ref| / max(1, max |ref|).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let ours = ours.to_dtype(candle_core::DType::F64).unwrap();
    let reference = reference.to_dtype(candle_core::DType::F64).unwrap();
    let diff = (ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    diff / scale
}

/// `imprint debug sample` as a reference run of a fixture manifest does it: DDIM, 8 steps,
/// guidance 7.5, the run's `prompt` and `negative_prompt`, the initial noise from `latents`, and
/// the `--concept` arguments given. Returns the final latents.
pub fn debug_sample(
    model: &Path,
    run: &serde_json::Value,
    latents: &Path,
    concepts: &[String],
    out: &Path,
) -> Tensor {
    let mut cmd = imprint();
    cmd.args(["debug", "sample", "--model"])
        .arg(model)
        .args(["--prompt", run["prompt"].as_str().expect("a prompt")])
        .args(["--scheduler", "ddim", "--steps", "8", "--guidance", "7.5"])
        .arg("--latents")
        .arg(latents)
        .arg("--output")
        .arg(out);
    if let Some(n) = run["negative_prompt"].as_str() {
        cmd.args(["--negative-prompt", n]);
    }
    for c in concepts {
        cmd.arg("--concept").arg(c);
    }
    run_ok(&mut cmd);
    load(out)["latents"].clone()
}

/// A fixture folder's `manifest.json`.
pub fn manifest_of(dir: &Path) -> serde_json::Value {
    let p = dir.join("manifest.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A manifest run's `concepts`, as paths inside `dir`.
pub fn run_concepts(dir: &Path, run: &serde_json::Value) -> Vec<String> {
    run["concepts"]
        .as_array()
        .expect("a concepts list")
        .iter()
        .map(|c| {
            dir.join(c.as_str().expect("a file name"))
                .display()
                .to_string()
        })
        .collect()
}

/// The stdout of a finished command, after checking that it succeeded (stderr in the panic).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The stderr of a finished command, after checking that it failed.
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A toy world trained for a few steps per phase (seconds): its text encoder is its CLIP's text
/// tower and it has the committed world's layout.
pub fn smoke_world(dir: &Path) {
    ok(imprint()
        .args(["world", "train", "--steps-scale", "0.002", "--out"])
        .arg(dir)
        .output()
        .unwrap());
}
