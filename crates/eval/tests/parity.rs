//! Parity with transformers on tiny random CLIPModel / ViTModel folders
//! (`tools/reference/eval_models.py` wrote `tests/fixtures/eval/`).

use candle_core::{Device, Tensor};
use imprint_eval::metrics::{mean_pairwise_cosine, read_images};
use imprint_eval::{ClipModel, Evaluator, ViTModel};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// max |ours − ref| ≤ tol · max(1, max |ref|), as DESIGN.md's parity rule.
fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let ours = &ours.to_device(&Device::Cpu).unwrap();
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    assert!(
        diff <= tol * scale,
        "{name}: max diff {diff} (scale {scale})"
    );
}

/// The device IMPRINT_DEVICE names: CPU in CI, CUDA in tools/cuda/device.sh.
fn dev() -> Device {
    imprint_ops::device_from_env().unwrap()
}

fn evaluator() -> Evaluator {
    Evaluator::load(&fixtures().join("clip"), &fixtures().join("dino"), &dev()).unwrap()
}

#[test]
fn pixel_values_match_the_pil_processors_exactly() {
    let e = expected();
    let ev = evaluator();
    for set in ["generated", "odd"] {
        let imgs = read_images(&fixtures().join("images").join(set)).unwrap();
        let clip = ev.clip.processor.preprocess_batch(&imgs, &dev()).unwrap();
        assert_close(
            &format!("clip {set}"),
            &clip,
            &e[&format!("clip_pixel_values_{set}")],
            1e-6,
        );
        let dino = ev
            .dino
            .processor
            .as_ref()
            .unwrap()
            .preprocess_batch(&imgs, &dev())
            .unwrap();
        assert_close(
            &format!("dino {set}"),
            &dino,
            &e[&format!("dino_pixel_values_{set}")],
            1e-6,
        );
    }
}

#[test]
fn features_match_transformers() {
    let e = expected();
    let ev = evaluator();
    for set in ["generated", "references", "odd"] {
        let imgs = read_images(&fixtures().join("images").join(set)).unwrap();
        assert_close(
            &format!("clip image embeds {set}"),
            &ev.clip_features(&imgs).unwrap(),
            &e[&format!("clip_image_embeds_{set}")],
            1e-4,
        );
        assert_close(
            &format!("dino cls {set}"),
            &ev.dino_features(&imgs).unwrap(),
            &e[&format!("dino_cls_{set}")],
            1e-4,
        );
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let text = ev.clip.prompt_features(&refs).unwrap();
    assert_close("clip text embeds", &text, &e["clip_text_embeds"], 1e-4);
    // The ids themselves, as the reference tokenizer pads them.
    let ids = e["clip_input_ids"]
        .to_dtype(candle_core::DType::I64)
        .unwrap();
    let ours: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            ev.clip
                .tokenizer
                .encode(p)
                .unwrap()
                .iter()
                .map(|&i| i as i64)
                .collect()
        })
        .collect();
    assert_eq!(ours, ids.to_vec2::<i64>().unwrap());
}

#[test]
fn metrics_match_the_protocol() {
    let e = expected();
    let ev = evaluator();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let prompt0 = meta["prompts"][0].as_str().unwrap();
    let s = ev
        .score_dirs(
            &fixtures().join("images/generated"),
            &fixtures().join("images/references"),
            prompt0,
        )
        .unwrap();
    let scalar = |k: &str| e[k].to_scalar::<f32>().unwrap() as f64;
    assert!((s.clip_i - scalar("clip_i")).abs() < 1e-4, "{s:?}");
    assert!((s.clip_t - scalar("clip_t_prompt0")).abs() < 1e-4, "{s:?}");
    assert!((s.dino - scalar("dino")).abs() < 1e-4, "{s:?}");
    // Not degenerate: the fixture's cosines vary.
    let g = read_images(&fixtures().join("images/generated")).unwrap();
    let f = ev.clip_features(&g).unwrap();
    assert!(mean_pairwise_cosine(&f, &f).unwrap() < 0.99);
}

#[test]
fn bad_inputs_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let ev = evaluator();
    let refs = fixtures().join("images/references");
    let err = ev.score_dirs(&empty, &refs, "a dog").unwrap_err();
    assert!(format!("{err:#}").contains("no images"), "{err:#}");
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("broken.png"), b"not a png").unwrap();
    let err = ev.score_dirs(&bad, &refs, "a dog").unwrap_err();
    assert!(format!("{err:#}").contains("broken.png"), "{err:#}");
    let long = vec!["dog"; 100].join(" ");
    let err = ev.score_dirs(&refs, &refs, &long).unwrap_err();
    assert!(format!("{err:#}").contains("tokens"), "{err:#}");
    let err = ClipModel::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(format!("{err:#}").contains("CLIPModel"), "{err:#}");
    let err = ViTModel::load(&empty, &Device::Cpu).err().unwrap();
    assert!(format!("{err:#}").contains("ViTModel"), "{err:#}");
}
