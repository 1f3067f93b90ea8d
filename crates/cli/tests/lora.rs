//! LoRA end to end: the UNet and text encoder with a LoRA applied match diffusers'
//! `load_lora_weights` (fixtures of tools/reference/lora_files.py: a PEFT file saved by
//! `save_lora_weights` and the same LoRA under kohya's names, rank 4, alpha 8, at scales 1 and
//! 0.5), format conversions keep keys and values exactly, `model merge` bakes the same deltas in,
//! and a LoRA for another architecture fails with one clear line.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

/// Runs `debug forward` on the tiny model with optional `--concept` arguments.
fn forward(
    model: &Path,
    component: &str,
    concepts: &[String],
    out: &Path,
) -> HashMap<String, Tensor> {
    let input = match component {
        "unet" => "unet_in.safetensors",
        _ => "text_encoder_in.safetensors",
    };
    let mut cmd = imprint();
    cmd.args(["debug", "forward", "--component", component, "--model"])
        .arg(model)
        .arg("--input")
        .arg(lora_dir().join(input))
        .arg("--output")
        .arg(out);
    for c in concepts {
        cmd.arg("--concept").arg(c);
    }
    run_ok(&mut cmd);
    load(out)
}

fn concept_arg(file: &Path, scale: Option<&str>) -> String {
    match scale {
        Some(s) => format!("{}:{s}", file.display()),
        None => file.display().to_string(),
    }
}

#[test]
fn unet_and_text_encoder_with_lora_match_diffusers() {
    let model = tiny_model("tiny");
    let dir = scratch("lora-parity");
    let unet_ref = load(&lora_dir().join("unet_lora.safetensors"));
    let te_ref = load(&lora_dir().join("text_encoder_lora.safetensors"));
    for file in ["peft.safetensors", "kohya.safetensors"] {
        for (scale, suffix) in [(None, "1"), (Some("0.5"), "05")] {
            let arg = concept_arg(&lora_dir().join(file), scale);
            let out = forward(&model, "unet", &[arg.clone()], &dir.join("u.safetensors"));
            let err = rel_err(&out["sample"], &unet_ref[&format!("sample_{suffix}")]);
            assert!(err <= TOL, "{file} at {scale:?}: unet rel err {err}");
            let out = forward(&model, "text-encoder", &[arg], &dir.join("t.safetensors"));
            for name in ["last_hidden_state", "pooler_output"] {
                let err = rel_err(&out[name], &te_ref[&format!("{name}_{suffix}")]);
                assert!(err <= TOL, "{file} at {scale:?}: {name} rel err {err}");
            }
        }
    }
    // Without the LoRA the output is the base model's: the LoRA really changes something.
    let base = forward(&model, "unet", &[], &dir.join("b.safetensors"));
    assert!(rel_err(&base["sample"], &unet_ref["sample_base"]) <= TOL);
    assert!(rel_err(&base["sample"], &unet_ref["sample_1"]) > 1e-2);
    // Two LoRAs add up, each at its scale: 0.25 + 0.25 of the same LoRA is 0.5 of it.
    let half = concept_arg(&lora_dir().join("peft.safetensors"), Some("0.25"));
    let quarter_twice = concept_arg(&lora_dir().join("kohya.safetensors"), Some("0.25"));
    let out = forward(
        &model,
        "unet",
        &[half, quarter_twice],
        &dir.join("u2.safetensors"),
    );
    assert!(rel_err(&out["sample"], &unet_ref["sample_05"]) <= TOL);
}

fn convert(input: &Path, output: &Path, format: &str) {
    run_ok(
        imprint()
            .args(["concept", "convert"])
            .arg(input)
            .arg(output)
            .args(["--format", format]),
    );
}

fn sorted(t: HashMap<String, Tensor>) -> BTreeMap<String, Vec<f32>> {
    t.into_iter()
        .map(|(k, v)| {
            let v = v.to_dtype(candle_core::DType::F32).unwrap();
            (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn conversions_keep_keys_and_values() {
    let dir = scratch("lora-convert");
    let kohya = lora_dir().join("kohya.safetensors");
    let peft = lora_dir().join("peft.safetensors");

    // kohya -> diffusers: exactly the keys and shapes diffusers' save_lora_weights wrote, and the
    // same values as its file.
    let ours = dir.join("diffusers.safetensors");
    convert(&kohya, &ours, "diffusers");
    let expected: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(lora_dir().join("keys.json")).unwrap())
            .unwrap();
    let written = load(&ours);
    let shapes: BTreeMap<String, Vec<usize>> = written
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    assert_eq!(shapes, expected);
    assert_eq!(sorted(written), sorted(load(&peft)));

    // diffusers -> kohya reproduces the kohya file, and so does kohya -> native -> kohya.
    let back = dir.join("kohya.safetensors");
    convert(&ours, &back, "kohya");
    assert_eq!(sorted(load(&back)), sorted(load(&kohya)));
    let native = dir.join("native.safetensors");
    convert(&kohya, &native, "native");
    let again = dir.join("kohya2.safetensors");
    convert(&native, &again, "kohya");
    assert_eq!(sorted(load(&again)), sorted(load(&kohya)));
    let meta = safetensors_metadata(&again);
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "8");

    // native -> diffusers keeps alpha in the adapter metadata diffusers reads.
    let d2 = dir.join("d2.safetensors");
    convert(&native, &d2, "diffusers");
    assert_eq!(sorted(load(&d2)), sorted(load(&peft)));
    let adapter: Value =
        serde_json::from_str(&safetensors_metadata(&d2)["lora_adapter_metadata"]).unwrap();
    assert_eq!(adapter["unet.lora_alpha"], 8);
    assert_eq!(adapter["unet.r"], 4);

    // The conv LoRA too: 4-D pairs keep diffusers' shapes, and come back to the kohya file.
    let conv = dir.join("conv.safetensors");
    convert(
        &lora_dir().join("conv_kohya.safetensors"),
        &conv,
        "diffusers",
    );
    let conv_ref = load(&lora_dir().join("conv_peft.safetensors"));
    let shapes = |t: &HashMap<String, Tensor>| -> BTreeMap<String, Vec<usize>> {
        t.iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect()
    };
    assert_eq!(shapes(&load(&conv)), shapes(&conv_ref));
    assert_eq!(sorted(load(&conv)), sorted(conv_ref));
    let conv_back = dir.join("conv_kohya.safetensors");
    convert(&conv, &conv_back, "kohya");
    assert_eq!(
        sorted(load(&conv_back)),
        sorted(load(&lora_dir().join("conv_kohya.safetensors")))
    );

    // inspect shows targets, ranks and alpha.
    let out = run_ok(imprint().args(["concept", "inspect", "--json"]).arg(&peft));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "lora");
    assert_eq!(v["format"], "diffusers");
    let lora = v["lora"].as_array().unwrap();
    assert_eq!(lora.len(), expected.len() / 2);
    assert!(lora.iter().all(|m| m["rank"] == 4 && m["alpha"] == 8.0));
    assert!(lora.iter().any(
        |m| m["module"] == "text_model.encoder.layers.0.self_attn.q_proj"
            && m["network"] == "text_encoder"
    ));
}

fn safetensors_metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

#[test]
fn merged_model_matches_the_applied_lora() {
    let model = tiny_model("tiny");
    let dir = scratch("lora-merge");
    let merged = dir.join("merged");
    let _ = std::fs::remove_dir_all(&merged);
    let arg = concept_arg(&lora_dir().join("kohya.safetensors"), Some("0.5"));
    let merge = || {
        imprint()
            .args(["model", "merge", "--model"])
            .arg(&model)
            .args(["--concept", &arg, "--out"])
            .arg(&merged)
            .output()
            .unwrap()
    };
    assert!(merge().status.success());
    let unet = forward(&merged, "unet", &[], &dir.join("u.safetensors"));
    let reference = load(&lora_dir().join("unet_lora.safetensors"));
    let err = rel_err(&unet["sample"], &reference["sample_05"]);
    assert!(err <= TOL, "merged unet rel err {err}");
    let te = forward(&merged, "text-encoder", &[], &dir.join("t.safetensors"));
    let reference = load(&lora_dir().join("text_encoder_lora.safetensors"));
    let err = rel_err(&te["last_hidden_state"], &reference["last_hidden_state_05"]);
    assert!(err <= TOL, "merged text encoder rel err {err}");
    // The rest of the folder is copied; an existing --out is refused.
    assert!(merged.join("vae/config.json").is_file());
    assert!(merged.join("tokenizer").is_dir());
    let again = merge();
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
}

/// Writes a kohya file with one LoRA pair under `name`.
fn kohya_file(path: &Path, name: &str, inp: usize, out: usize) {
    let dev = Device::Cpu;
    let tensors = HashMap::from([
        (
            format!("{name}.lora_down.weight"),
            Tensor::ones((2, inp), candle_core::DType::F32, &dev).unwrap(),
        ),
        (
            format!("{name}.lora_up.weight"),
            Tensor::ones((out, 2), candle_core::DType::F32, &dev).unwrap(),
        ),
        (format!("{name}.alpha"), Tensor::new(2f32, &dev).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn lora_for_another_architecture_fails_with_one_clear_line() {
    let model = tiny_model("tiny");
    let dir = scratch("lora-foreign");
    let cases = [
        // SDXL's kohya names (the original SGM blocks).
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            32,
            32,
            "another architecture",
        ),
        // A module this model does not have.
        (
            "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q",
            32,
            32,
            "another architecture",
        ),
        // The right module with SD 1.5's width.
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            320,
            320,
            "another architecture",
        ),
    ];
    for (i, (name, inp, out, needle)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("foreign{i}.safetensors"));
        kohya_file(&file, name, inp, out);
        let o = imprint()
            .args(["debug", "forward", "--component", "unet", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(lora_dir().join("unet_in.safetensors"))
            .arg("--output")
            .arg(dir.join("o.safetensors"))
            .arg("--concept")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(needle) && stderr.contains("to_q"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A rank larger than the layer is refused when the file is read.
    let file = dir.join("rank.safetensors");
    kohya_file(
        &file,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        1,
        32,
    );
    let o = imprint()
        .args(["concept", "inspect"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("rank 2 is larger"),
        "{stderr}"
    );
}

/// `debug sample` with a LoRA on both networks equals sampling with the merged model: the
/// pipeline's `apply_concept` attaches the same deltas `model merge` bakes in.
#[test]
fn sampling_with_a_lora_equals_sampling_the_merged_model() {
    let model = tiny_model("tiny");
    let dir = scratch("lora-sample");
    let merged = dir.join("merged");
    let _ = std::fs::remove_dir_all(&merged);
    let arg = concept_arg(&lora_dir().join("peft.safetensors"), Some("0.7"));
    run_ok(
        imprint()
            .args(["model", "merge", "--model"])
            .arg(&model)
            .args(["--concept", &arg, "--out"])
            .arg(&merged),
    );
    let latents = dir.join("latents.safetensors");
    let noise = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), noise)]), &latents)
        .unwrap();
    let sample = |model: &Path, concepts: &[&str], out: &Path| {
        let mut cmd = imprint();
        cmd.args([
            "debug",
            "sample",
            "--prompt",
            "a photo of a cat",
            "--scheduler",
            "ddim",
        ])
        .args(["--steps", "2", "--guidance", "5", "--model"])
        .arg(model)
        .arg("--latents")
        .arg(&latents)
        .arg("--output")
        .arg(out);
        for c in concepts {
            cmd.args(["--concept", c]);
        }
        run_ok(&mut cmd);
        load(out)["latents"].clone()
    };
    let applied = sample(&model, &[&arg], &dir.join("a.safetensors"));
    let baked = sample(&merged, &[], &dir.join("b.safetensors"));
    let plain = sample(&model, &[], &dir.join("c.safetensors"));
    assert!(
        rel_err(&applied, &baked) <= 1e-3,
        "{}",
        rel_err(&applied, &baked)
    );
    assert!(rel_err(&applied, &plain) > 1e-3);
}

/// A LoCon-style LoRA on 3×3 convolutions (the stride-2 downsampler included), 1×1 `proj_in` and
/// the feed-forward output, rank 2, alpha 3: applied, and merged, it matches diffusers.
#[test]
fn conv_lora_matches_diffusers_applied_and_merged() {
    let model = tiny_model("tiny");
    let dir = scratch("lora-conv");
    let reference = load(&lora_dir().join("unet_conv_lora.safetensors"));
    for file in ["conv_peft.safetensors", "conv_kohya.safetensors"] {
        let arg = concept_arg(&lora_dir().join(file), None);
        let out = forward(&model, "unet", &[arg], &dir.join("u.safetensors"));
        let err = rel_err(&out["sample"], &reference["sample_1"]);
        assert!(err <= TOL, "{file}: unet rel err {err}");
    }
    let merged = dir.join("merged");
    let _ = std::fs::remove_dir_all(&merged);
    run_ok(
        imprint()
            .args(["model", "merge", "--model"])
            .arg(&model)
            .arg("--concept")
            .arg(lora_dir().join("conv_kohya.safetensors"))
            .arg("--out")
            .arg(&merged),
    );
    let out = forward(&merged, "unet", &[], &dir.join("m.safetensors"));
    let err = rel_err(&out["sample"], &reference["sample_1"]);
    assert!(err <= TOL, "merged conv LoRA rel err {err}");
}
