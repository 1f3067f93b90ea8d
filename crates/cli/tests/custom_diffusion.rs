//! Custom Diffusion folders: one written by diffusers gives diffusers' samples in imprint, and one
//! written by imprint gives, in diffusers, the samples imprint gives (references from
//! `tools/reference/custom_diffusion_files.py`, which applies the processors itself).

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    fixtures().join("custom_diffusion")
}

#[test]
fn folders_sample_as_diffusers_samples_them() {
    let manifest: Value = manifest_of(&dir());
    let scratch = scratch("custom-diffusion-parity");
    for run in manifest["runs"].as_array().unwrap() {
        let file = run["file"].as_str().unwrap();
        let out = scratch.join(file);
        let folder = dir().join(run["folder"].as_str().unwrap());
        let ours = debug_sample(
            &fixtures().join("diffusers-made/model"),
            run,
            &dir().join(file),
            &[folder.display().to_string()],
            &out,
        );
        let reference = load(&dir().join(file));
        let err = rel_err(&ours, &reference["expected"]);
        assert!(
            err <= 1e-3,
            "{file} ({}): relative error {err:e}",
            run["folder"]
        );
        assert!(rel_err(&reference["plain"], &reference["expected"]) > 1e-2);
    }
}

#[test]
fn inspect_and_native_round_trip() {
    let scratch = scratch("custom-diffusion-native");
    let native = scratch.join("cd.safetensors");
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(dir().join("diffusers-qkvo"))
            .arg(&native)
            .args(["--format", "native"]),
    );
    let back = scratch.join("folder");
    let _ = std::fs::remove_dir_all(&back);
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(&native)
            .arg(&back)
            .args(["--format", "diffusers"]),
    );
    let a = load(&dir().join("diffusers-qkvo/pytorch_custom_diffusion_weights.safetensors"));
    let b = load(&back.join("pytorch_custom_diffusion_weights.safetensors"));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    assert!(back.join("<new2>.safetensors").is_file());
    let out = run_ok(
        imprint()
            .args(["concept", "inspect", "--json"])
            .arg(&native),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "custom-diffusion");
    assert_eq!(v["trigger"], "<new1>");
}
