//! Extended Textual Inversion (P+) and Perfusion train end to end on the tiny model: the written
//! files have the documented layouts, an interrupted run resumes bit-identically (Perfusion's
//! target-input average included), and gradient checkpointing trains the same vectors.

use candle_core::{Device, Tensor};
use imprint_models::init::{write_random_model, KnownConfig};
use imprint_train::config::{
    extended_textual_inversion_defaults, perfusion_defaults, resolve, PerfusionConfig,
    TextualInversionConfig,
};
use imprint_train::trainer::{train_extended_textual_inversion, train_perfusion, Hooks, Outcome};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn with_paths(mut flags: toml::Table, model: &Path, out: &Path) -> toml::Table {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    flags.insert("model".into(), model.display().to_string().into());
    flags.insert("images".into(), images.display().to_string().into());
    flags.insert("out".into(), out.display().to_string().into());
    flags
}

fn xti_config(model: &Path, out: &Path) -> TextualInversionConfig {
    let flags = toml::toml! {
        token = "<my-toy>"
        init-word = "toy"
        num-vectors = 2
        steps = 4
        grad-accum = 2
        resolution = 64
        crop = "random"
        save-every = 0
        seed = 3
    };
    resolve(
        extended_textual_inversion_defaults(),
        None,
        with_paths(flags, model, out),
    )
    .unwrap()
}

fn perfusion_config(model: &Path, out: &Path) -> PerfusionConfig {
    let flags = toml::toml! {
        token = "<my-toy>"
        superclass = "toy"
        steps = 4
        grad-accum = 2
        resolution = 64
        crop = "random"
        save-every = 0
        seed = 3
    };
    resolve(perfusion_defaults(), None, with_paths(flags, model, out)).unwrap()
}

fn interrupt_after(step: usize) -> Hooks {
    let hooks = Hooks::default();
    let flag = hooks.interrupt.clone();
    Hooks {
        after_step: Some(Arc::new(move |done| {
            if done == step {
                flag.store(true, Ordering::SeqCst)
            }
        })),
        ..hooks
    }
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_same_files(a: &Path, b: &Path) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        assert_eq!(values(t), values(&b[k]), "{k} differs");
    }
}

/// Trains `straight` through, and `resumed` interrupted after step 2 then resumed.
fn train_twice(
    straight: &Path,
    resumed: &Path,
    train: &dyn Fn(&Path, Option<&Path>, &Hooks) -> Outcome,
) {
    assert!(matches!(
        train(straight, None, &Hooks::default()),
        Outcome::Finished { steps: 4 }
    ));
    let Outcome::Interrupted { step, checkpoint } = train(resumed, None, &interrupt_after(2))
    else {
        panic!("the run should stop at the interrupt")
    };
    assert_eq!(step, 2);
    assert!(!resumed.exists());
    train(resumed, Some(&checkpoint), &Hooks::default());
}

#[test]
fn extended_textual_inversion_trains_per_layer_vectors_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let straight = dir.path().join("straight.safetensors");
    let resumed = dir.path().join("resumed.safetensors");
    let train = |out: &Path, resume: Option<&Path>, hooks: &Hooks| {
        let mut cfg = xti_config(&model, out);
        cfg.trainer.resume = resume.map(Path::to_path_buf);
        train_extended_textual_inversion(&cfg, hooks).unwrap()
    };
    train_twice(&straight, &resumed, &train);
    assert_same_files(&straight, &resumed);

    let t = tensors(&straight);
    // The tiny UNet's 7 cross-attention layers, each [2, 32], keyed by transformer path.
    assert_eq!(t.len(), 7);
    let first = &t["unet.down_blocks.0.attentions.0.token_embeddings"];
    assert_eq!(first.dims(), &[2, 32]);
    let mid = &t["unet.mid_block.attentions.0.token_embeddings"];
    assert_ne!(values(first), values(mid), "layers trained alike");
}

#[test]
fn extended_textual_inversion_with_gradient_checkpointing_trains_the_same_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let plain = dir.path().join("plain.safetensors");
    let ckpt = dir.path().join("ckpt.safetensors");
    let mut cfg = xti_config(&model, &plain);
    cfg.trainer.steps = 2;
    train_extended_textual_inversion(&cfg, &Hooks::default()).unwrap();
    let mut cfg = xti_config(&model, &ckpt);
    cfg.trainer.steps = 2;
    cfg.trainer.gradient_checkpointing = true;
    train_extended_textual_inversion(&cfg, &Hooks::default()).unwrap();
    let (a, b) = (tensors(&plain), tensors(&ckpt));
    for (k, t) in &a {
        let diff = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{k}: differs by {diff} with checkpointing");
    }
}

#[test]
fn perfusion_trains_the_documented_file_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let straight = dir.path().join("straight.safetensors");
    let resumed = dir.path().join("resumed.safetensors");
    let train = |out: &Path, resume: Option<&Path>, hooks: &Hooks| {
        let mut cfg = perfusion_config(&model, out);
        cfg.trainer.resume = resume.map(Path::to_path_buf);
        train_perfusion(&cfg, hooks).unwrap()
    };
    train_twice(&straight, &resumed, &train);
    // Bit-identical, the target input's moving average included.
    assert_same_files(&straight, &resumed);

    // C⁻¹ is cached beside the model, computed once.
    let cache = imprint_train::methods::perfusion::cache_path(&model);
    assert!(cache.exists());

    let t = tensors(&straight);
    assert_eq!(t["text_encoder.token_embeddings"].dims(), &[1, 32]);
    assert_eq!(t["perfusion.target_input"].dims(), &[32]);
    assert_eq!(t["perfusion.target_input_cinv"].dims(), &[32]);
    let layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2";
    let key = &t[&format!("{layer}.to_k.target_output")];
    let value = &t[&format!("{layer}.to_v.target_output")];
    assert_eq!(key.dims(), value.dims());
    // 3 + 2 × 7 cross-attention layers.
    assert_eq!(t.len(), 3 + 2 * 7);
    let bytes = std::fs::read(&straight).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["imprint.version"], "1");
    assert_eq!(meta["imprint.method"], "perfusion");
    assert_eq!(meta["imprint.trigger"], "<my-toy>");
    assert_eq!(meta["perfusion.superclass"], "toy");
    assert_eq!(meta["perfusion.beta"], "0.7");
    assert_eq!(meta["perfusion.tau"], "0.15");

    // The keys stay locked: o*_K is the superclass's projection, unchanged by training, while the
    // values and the target input moved.
    let fresh = dir.path().join("one-step.safetensors");
    let mut cfg = perfusion_config(&model, &fresh);
    cfg.trainer.steps = 1;
    train_perfusion(&cfg, &Hooks::default()).unwrap();
    let f = tensors(&fresh);
    assert_eq!(
        values(key),
        values(&f[&format!("{layer}.to_k.target_output")])
    );
    assert_ne!(
        values(value),
        values(&f[&format!("{layer}.to_v.target_output")])
    );
    assert_ne!(
        values(&t["perfusion.target_input"]),
        values(&f["perfusion.target_input"])
    );
}

#[test]
fn perfusion_refuses_a_multi_token_superclass() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let out = dir.path().join("p.safetensors");
    let mut cfg = perfusion_config(&model, &out);
    cfg.superclass = "stuffed animal".into();
    let err = format!(
        "{:#}",
        train_perfusion(&cfg, &Hooks::default()).unwrap_err()
    );
    assert!(err.contains("single token"), "{err}");
    assert!(!out.exists());
}
