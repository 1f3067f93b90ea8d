//! Extended Textual Inversion (P+) and Perfusion: sampling against the reference implementations
//! of `tools/reference/xti_perfusion.py` on a diffusers-made model with SD 1.x's 16
//! cross-attention layers, kohya XTI files, style mixing, and the refusals.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use imprint_concepts::formats::{self, Format};
use imprint_concepts::{Concept, LayerEmbedding};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    fixtures().join("xti_perfusion")
}

fn manifest() -> Value {
    manifest_of(&dir())
}

/// `imprint debug sample` as a manifest run, with the given concept arguments.
fn sample(run: &Value, concepts: &[String], out: &Path, model: &Path) -> Tensor {
    let latents = dir().join(run["file"].as_str().unwrap());
    debug_sample(model, run, &latents, concepts, out)
}

fn concept_paths(run: &Value) -> Vec<String> {
    run_concepts(&dir(), run)
}

#[test]
fn sampling_matches_the_reference_implementations() {
    let scratch = scratch("xti-perfusion-parity");
    for run in manifest()["runs"].as_array().unwrap() {
        let file = run["file"].as_str().unwrap();
        let out = scratch.join(file);
        let ours = sample(run, &concept_paths(run), &out, &dir().join("model"));
        let reference = &load(&dir().join(file))["expected"];
        let err = rel_err(&ours, reference);
        assert!(err <= 1e-3, "{file}: relative error {err:e}");
        if let Some(plain) = load(&dir().join(file)).get("plain") {
            assert!(
                rel_err(plain, reference) > 1e-2,
                "{file}: the concept has no effect"
            );
        }
    }
}

/// The kohya file's per-layer vectors as a native concept, with `f` choosing each layer's.
fn xti_variant(name: &str, f: impl Fn(usize, &Tensor) -> Tensor) -> PathBuf {
    let kohya = formats::load_any(&dir().join("xti-cat.safetensors")).unwrap();
    let layers = kohya
        .layer_embeddings
        .iter()
        .enumerate()
        .map(|(i, l)| LayerEmbedding::new(&l.layer, f(i, &l.vectors)).unwrap())
        .collect();
    let concept = Concept::extended_textual_inversion("xti-cat", layers);
    let path = scratch("xti-variants").join(name);
    formats::save(&concept, &path, Format::Native).unwrap();
    path
}

#[test]
fn identical_vectors_in_every_layer_give_exactly_textual_inversion() {
    let run = &manifest()["runs"][0];
    let scratch = scratch("xti-identical");
    let model = dir().join("model");
    let first = |_: usize, v: &Tensor| v.clone();
    let kohya = formats::load_any(&dir().join("xti-cat.safetensors")).unwrap();
    let v0 = kohya.layer_embeddings[3].vectors.clone();
    let same = xti_variant("same.safetensors", move |_, _| first(0, &v0));
    let ti =
        Concept::textual_inversion("xti-cat", kohya.layer_embeddings[3].vectors.clone()).unwrap();
    let ti_path = scratch.join("ti.safetensors");
    formats::save(&ti, &ti_path, Format::Native).unwrap();
    let a = sample(
        run,
        &[same.display().to_string()],
        &scratch.join("a.safetensors"),
        &model,
    );
    let b = sample(
        run,
        &[ti_path.display().to_string()],
        &scratch.join("b.safetensors"),
        &model,
    );
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn style_mixing_takes_each_layer_from_the_concept_applied_there() {
    // A on the down layers and B on mid + up, prompted with A's trigger, equals one concept whose
    // down layers are A's and whose other layers are B's.
    let run = &manifest()["runs"][0];
    let scratch = scratch("xti-mixing");
    let model = dir().join("model");
    let a = formats::load_any(&dir().join("xti-cat.safetensors")).unwrap();
    let b_layers: Vec<Tensor> = a
        .layer_embeddings
        .iter()
        .map(|l| (l.vectors.flip(&[0]).unwrap() * 1.5).unwrap())
        .collect();
    let mut b = a.clone();
    b.trigger = "xti-dog".into();
    for (l, v) in b.layer_embeddings.iter_mut().zip(&b_layers) {
        l.vectors = v.clone();
    }
    let b_path = scratch.join("b.safetensors");
    formats::save(&b, &b_path, Format::Native).unwrap();
    let down = 6; // IN01…IN08: the first six layers in forward order
    let mixed_path = xti_variant("mixed.safetensors", move |i, v| {
        if i < down {
            v.clone()
        } else {
            b_layers[i].clone()
        }
    });
    let a_path = dir().join("xti-cat.safetensors").display().to_string();
    let mixed = sample(
        run,
        &[
            format!("{a_path}@down"),
            format!("{}@mid,up", b_path.display()),
        ],
        &scratch.join("m.safetensors"),
        &model,
    );
    let composed = sample(
        run,
        &[mixed_path.display().to_string()],
        &scratch.join("c.safetensors"),
        &model,
    );
    assert!(rel_err(&mixed, &composed) < 1e-6);
    let whole = sample(run, &[a_path], &scratch.join("w.safetensors"), &model);
    assert!(rel_err(&mixed, &whole) > 1e-3, "mixing changed nothing");
}

#[test]
fn kohya_xti_round_trips_through_native_exactly() {
    let scratch = scratch("xti-convert");
    let native = scratch.join("native.safetensors");
    let back = scratch.join("xti-cat.safetensors");
    let src = dir().join("xti-cat.safetensors");
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(&src)
            .arg(&native)
            .args(["--format", "native"]),
    );
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(&native)
            .arg(&back)
            .args(["--format", "kohya"]),
    );
    let (a, b) = (load(&src), load(&back));
    assert_eq!(a.len(), 16);
    for (k, t) in &a {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    let out = run_ok(
        imprint()
            .args(["concept", "inspect", "--json"])
            .arg(&native),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "extended-textual-inversion");
    assert_eq!(v["layer_embeddings"].as_array().unwrap().len(), 16);
    assert_eq!(v["vectors"], 2);
    assert_eq!(v["layer_embeddings"][6]["layer"], "mid_block.attentions.0");
}

fn refused(args: &[&str], concept: &Path, out: &Path, model: &Path) -> String {
    let o = imprint()
        .args(["generate", "--model"])
        .arg(model)
        .args(args)
        .arg("--concept")
        .arg(concept)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!out.exists(), "an output was written");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn mismatched_or_broken_files_are_refused_cleanly() {
    let scratch = scratch("xti-refusals");
    let tiny = tiny_model("tiny");
    let out = scratch.join("never.png");
    let args = ["--prompt", "a xti-cat", "--steps", "2"];
    // A 16-layer XTI file on a UNet with other cross-attention layers.
    let e = refused(&args, &dir().join("xti-cat.safetensors"), &out, &tiny);
    assert!(
        e.contains("this UNet does not have") || e.contains("-dim vectors"),
        "{e}"
    );
    // An XTI file that lacks a layer.
    let mut tensors = load(&dir().join("xti-cat.safetensors"));
    tensors.remove("OUT07");
    let partial = scratch.join("partial.safetensors");
    candle_core::safetensors::save(&tensors, &partial).unwrap();
    let e = refused(&args, &partial, &out, &dir().join("model"));
    assert!(e.contains("lacks OUT07"), "{e}");
    // A Perfusion file for another base model (24-dim words, other layers).
    let e = refused(
        &args,
        &dir().join("perfusion-teddy.safetensors"),
        &out,
        &tiny,
    );
    assert!(e.contains("another base model"), "{e}");
    // A Perfusion file whose target input is the wrong width.
    let mut concept = formats::load_any(&dir().join("perfusion-teddy.safetensors")).unwrap();
    let p = concept.perfusion.as_mut().unwrap();
    p.target_input = Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap();
    let bad = scratch.join("bad-perfusion.safetensors");
    // Saving validates too: write the tensors by hand.
    let mut raw = load(&dir().join("perfusion-teddy.safetensors"));
    raw.insert("perfusion.target_input".into(), p.target_input.clone());
    imprint_models::io::save_safetensors_atomic(
        &bad,
        &raw,
        Some(
            [
                ("imprint.format", "concept"),
                ("imprint.version", "1"),
                ("imprint.method", "perfusion"),
                ("imprint.trigger", "<teddy>"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ),
    )
    .unwrap();
    let e = refused(&args, &bad, &out, &dir().join("model"));
    assert!(e.contains("target_input"), "{e}");
}

#[test]
fn perfusion_gate_overrides_change_the_sample() {
    let run = &manifest()["runs"][2];
    let scratch = scratch("perfusion-gate");
    let model = dir().join("model");
    let base = sample(
        run,
        &concept_paths(run),
        &scratch.join("a.safetensors"),
        &model,
    );
    let mut cmd = imprint();
    cmd.args(["debug", "sample", "--model"])
        .arg(&model)
        .args(["--prompt", run["prompt"].as_str().unwrap()])
        .args(["--scheduler", "ddim", "--steps", "8", "--guidance", "7.5"])
        .arg("--latents")
        .arg(dir().join(run["file"].as_str().unwrap()))
        .arg("--output")
        .arg(scratch.join("b.safetensors"))
        .arg("--concept")
        .arg(&concept_paths(run)[0])
        .args(["--perfusion-beta", "0.3", "--perfusion-tau", "0.05"]);
    run_ok(&mut cmd);
    let other = load(&scratch.join("b.safetensors"))["latents"].clone();
    assert!(rel_err(&base, &other) > 1e-3);
}
