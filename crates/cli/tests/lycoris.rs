//! LyCORIS files (LoHa, LoKr, (IA)³, diag-OFT in kohya's key layout) applied in generation and
//! baked by `model merge`, against `tools/reference/lycoris_files.py`'s implementation of the
//! LyCORIS modules' math on the diffusers-made tiny model; unknown module types are refused by
//! name.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixtures().join("lycoris")
}

fn model() -> PathBuf {
    fixtures().join("diffusers-made/model")
}

fn manifest() -> Value {
    manifest_of(&dir())
}

fn sample(model: &Path, run: &Value, concepts: &[String], out: &Path) -> Tensor {
    let latents = dir().join(run["file"].as_str().unwrap());
    debug_sample(model, run, &latents, concepts, out)
}

fn concepts(run: &Value) -> Vec<String> {
    run_concepts(&dir(), run)
}

#[test]
fn each_type_applies_as_the_reference_merges_it() {
    let scratch = scratch("lycoris-parity");
    for run in manifest()["runs"].as_array().unwrap() {
        let file = run["file"].as_str().unwrap();
        let ours = sample(&model(), run, &concepts(run), &scratch.join(file));
        let reference = load(&dir().join(file));
        let err = rel_err(&ours, &reference["expected"]);
        assert!(
            err <= 1e-3,
            "{file} ({:?}): relative error {err:e}",
            run["concepts"]
        );
        assert!(rel_err(&reference["plain"], &reference["expected"]) > 1e-2);
    }
}

#[test]
fn model_merge_bakes_the_same_changes() {
    let scratch = scratch("lycoris-merge");
    let run = &manifest()["runs"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let merged = scratch.join("merged");
    let _ = std::fs::remove_dir_all(&merged);
    let mut cmd = imprint();
    cmd.args(["model", "merge", "--model"]).arg(model());
    for c in concepts(run) {
        cmd.arg("--concept").arg(c);
    }
    run_ok(cmd.arg("--out").arg(&merged));
    let ours = sample(&merged, run, &[], &scratch.join("m.safetensors"));
    let reference = load(&dir().join(run["file"].as_str().unwrap()));
    let err = rel_err(&ours, &reference["expected"]);
    assert!(err <= 1e-3, "merged model: relative error {err:e}");
}

fn write(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn unknown_types_dora_and_misfits_are_refused_by_name() {
    let scratch = scratch("lycoris-refusals");
    let z = |dims: &[usize]| Tensor::zeros(dims, candle_core::DType::F32, &Device::Cpu).unwrap();
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let cases: Vec<(&str, Vec<(String, Tensor)>, &str)> = vec![
        (
            "glora.safetensors",
            vec![
                (format!("{k}.a1.weight"), z(&[2, 16])),
                (format!("{k}.b1.weight"), z(&[16, 2])),
            ],
            "unknown module type",
        ),
        (
            "dora.safetensors",
            vec![
                (format!("{k}.hada_w1_a"), z(&[16, 2])),
                (format!("{k}.hada_w1_b"), z(&[2, 16])),
                (format!("{k}.hada_w2_a"), z(&[16, 2])),
                (format!("{k}.hada_w2_b"), z(&[2, 16])),
                (format!("{k}.dora_scale"), z(&[16, 1])),
            ],
            "DoRA",
        ),
        (
            "boft.safetensors",
            vec![(format!("{k}.oft_blocks"), z(&[2, 2, 4, 4]))],
            "BOFT",
        ),
        (
            "misfit.safetensors",
            vec![
                (format!("{k}.hada_w1_a"), z(&[8, 2])),
                (format!("{k}.hada_w1_b"), z(&[2, 16])),
                (format!("{k}.hada_w2_a"), z(&[8, 2])),
                (format!("{k}.hada_w2_b"), z(&[2, 16])),
            ],
            "another architecture",
        ),
    ];
    for (name, tensors, expect) in cases {
        let path = scratch.join(name);
        let refs: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.clone()))
            .collect();
        write(&path, &refs);
        let out = scratch.join(format!("{name}.png"));
        let o = imprint()
            .args(["generate", "--model"])
            .arg(model())
            .args(["--prompt", "a cat", "--steps", "2", "--concept"])
            .arg(&path)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name} was accepted");
        assert!(err.contains(expect), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn inspect_lists_the_modules() {
    let out = run_ok(
        imprint()
            .args(["concept", "inspect", "--json"])
            .arg(dir().join("lokr.safetensors")),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules = v["lycoris"].as_array().unwrap();
    assert_eq!(modules.len(), 4);
    assert!(modules.iter().all(|m| m["type"] == "lokr"));
    assert!(modules.iter().any(|m| m["network"] == "text_encoder"));
}
