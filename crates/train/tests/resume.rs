//! A run interrupted and resumed ends with exactly the embedding of an uninterrupted run (CPU).

use candle_core::Device;
use imprint_models::init::{write_random_model, KnownConfig};
use imprint_train::config::{resolve, textual_inversion_defaults, TextualInversionConfig};
use imprint_train::trainer::{train_textual_inversion, Hooks, Outcome};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn config(model: &Path, out: &Path) -> TextualInversionConfig {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let flags: toml::Table = toml::toml! {
        token = "<my-toy>"
        init-word = "toy"
        num-vectors = 2
        steps = 6
        batch-size = 2
        grad-accum = 2
        resolution = 64
        lr = 0.01
        crop = "random"
        save-every = 4
        seed = 5
    };
    let mut flags = flags;
    flags.insert("model".into(), model.display().to_string().into());
    flags.insert("images".into(), images.display().to_string().into());
    flags.insert("out".into(), out.display().to_string().into());
    resolve(textual_inversion_defaults(), None, flags).unwrap()
}

fn vectors(path: &Path) -> Vec<Vec<f32>> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    t["text_encoder.token_embeddings"].to_vec2().unwrap()
}

/// Hooks that ask the run to stop once `step` has finished (as Ctrl-C does).
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

/// Largest absolute element of a tensor.
fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference of two tensors of one shape.
fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn interrupted_and_resumed_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();

    let straight = dir.path().join("straight.safetensors");
    let outcome = train_textual_inversion(&config(&model, &straight), &Hooks::default()).unwrap();
    assert!(matches!(outcome, Outcome::Finished { steps: 6 }));

    let resumed = dir.path().join("resumed.safetensors");
    let hooks = interrupt_after(3);
    let Outcome::Interrupted { step, checkpoint } =
        train_textual_inversion(&config(&model, &resumed), &hooks).unwrap()
    else {
        panic!("the run should stop at the interrupt")
    };
    assert_eq!(step, 3);
    assert!(!resumed.exists(), "no concept file before the run finishes");
    let mut cfg = config(&model, &resumed);
    cfg.trainer.resume = Some(checkpoint.parent().unwrap().to_path_buf()); // the folder: its latest
    train_textual_inversion(&cfg, &Hooks::default()).unwrap();

    assert_eq!(
        vectors(&straight),
        vectors(&resumed),
        "resumed run must end bit-identical"
    );
    let log = std::fs::read_to_string(dir.path().join("resumed.log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 6);
    assert!(dir.path().join("resumed.config.toml").exists());
    assert!(dir
        .path()
        .join("straight.checkpoints/step-000004.safetensors")
        .exists());
}

#[test]
fn bad_training_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let out = dir.path().join("c.safetensors");
    let mut cfg = config(&model, &out);
    cfg.token = "toy".into();
    let err = format!(
        "{:#}",
        train_textual_inversion(&cfg, &Hooks::default()).unwrap_err()
    );
    assert!(err.contains("already exists"), "{err}");
    let mut cfg = config(&model, &out);
    cfg.init_word = "stuffed animal".into();
    let err = format!(
        "{:#}",
        train_textual_inversion(&cfg, &Hooks::default()).unwrap_err()
    );
    assert!(err.contains("single token"), "{err}");
    let mut cfg = config(&model, &out);
    cfg.trainer.images = dir.path().join("empty");
    std::fs::create_dir_all(&cfg.trainer.images).unwrap();
    assert!(train_textual_inversion(&cfg, &Hooks::default()).is_err());
    assert!(!out.exists());
}

fn lora_config(model: &Path, out: &Path) -> imprint_train::config::LoraConfig {
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let mut flags: toml::Table = toml::toml! {
        instance-prompt = "a photo of sks toy"
        rank = 2
        alpha = 3.0
        targets = "to_q,to_v,proj_in,conv1"
        train-text-encoder = true
        steps = 5
        batch-size = 1
        grad-accum = 2
        resolution = 64
        lr = 0.001
        save-every = 0
        seed = 2
    };
    flags.insert("model".into(), model.display().to_string().into());
    flags.insert("images".into(), images.display().to_string().into());
    flags.insert("out".into(), out.display().to_string().into());
    resolve(imprint_train::config::lora_defaults(), None, flags).unwrap()
}

/// LoRA dropout on, so its masks are part of what must resume exactly.
fn with_dropout(mut cfg: imprint_train::config::LoraConfig) -> imprint_train::config::LoraConfig {
    cfg.dropout = 0.1;
    cfg
}

#[test]
fn lora_trains_and_resumes_exactly() {
    use imprint_train::trainer::train_lora;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let straight = dir.path().join("straight.safetensors");
    train_lora(
        &with_dropout(lora_config(&model, &straight)),
        &Hooks::default(),
    )
    .unwrap();

    let resumed = dir.path().join("resumed.safetensors");
    let hooks = interrupt_after(2);
    let Outcome::Interrupted { checkpoint, .. } =
        train_lora(&with_dropout(lora_config(&model, &resumed)), &hooks).unwrap()
    else {
        panic!("the run should stop at the interrupt")
    };
    let mut cfg = with_dropout(lora_config(&model, &resumed));
    cfg.trainer.resume = Some(checkpoint);
    train_lora(&cfg, &Hooks::default()).unwrap();

    let a = candle_core::safetensors::load(&straight, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&resumed, &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    let mut ups_moved = 0;
    for (k, t) in &a {
        let diff = max_diff(t, &b[k]);
        assert_eq!(diff, 0.0, "{k} differs after resume");
        if k.contains("lora_up") && max_abs(t) > 0.0 {
            ups_moved += 1;
        }
    }
    // UNet targets: to_q, to_v in 7 transformer blocks × 2 (self/cross) + proj_in + conv1 of the resnets;
    // the text encoder's 6 projections × 2 layers. Every up matrix has learned something.
    assert!(
        a.keys().any(|k| k.contains("text_model")),
        "text encoder LoRA saved"
    );
    assert_eq!(
        ups_moved * 2,
        a.keys().filter(|k| k.contains("lora")).count(),
        "every up matrix trained"
    );
}

#[test]
fn gradient_checkpointing_trains_the_same_lora() {
    use imprint_train::trainer::train_lora;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let plain = dir.path().join("plain.safetensors");
    let mut cfg = lora_config(&model, &plain);
    cfg.trainer.steps = 3;
    train_lora(&cfg, &Hooks::default()).unwrap();
    let ckpt = dir.path().join("ckpt.safetensors");
    let mut cfg = lora_config(&model, &ckpt);
    cfg.trainer.steps = 3;
    cfg.trainer.gradient_checkpointing = true;
    train_lora(&cfg, &Hooks::default()).unwrap();
    let a = candle_core::safetensors::load(&plain, &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(&ckpt, &Device::Cpu).unwrap();
    for (k, t) in &a {
        let diff = max_diff(t, &b[k]);
        assert!(
            diff < 1e-5,
            "{k}: differs by {diff} with gradient checkpointing"
        );
    }
}

/// DreamBooth with the optimizer step fused into the backward pass (weights inside checkpointed
/// blocks updated as their gradients arrive) ends with the same UNet and text encoder as the
/// ordinary step, and the fused run refuses what it cannot do.
#[test]
fn fused_backward_trains_the_same_dreambooth_model() {
    use imprint_train::trainer::train_dreambooth;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(KnownConfig::Tiny, &model, 0).unwrap();
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/toy");
    let config = |out: &Path, fused: bool| {
        let mut flags: toml::Table = toml::toml! {
            instance-prompt = "a photo of sks toy"
            train-text-encoder = true
            steps = 3
            resolution = 64
            lr = 0.001
            save-every = 0
            seed = 4
            gradient-checkpointing = true
        };
        flags.insert("fused-backward".into(), fused.into());
        flags.insert("model".into(), model.display().to_string().into());
        flags.insert("images".into(), images.display().to_string().into());
        flags.insert("out".into(), out.display().to_string().into());
        resolve::<imprint_train::config::DreamBoothConfig>(
            imprint_train::config::dreambooth_defaults(),
            None,
            flags,
        )
        .unwrap()
    };
    let (plain, fused) = (dir.path().join("plain"), dir.path().join("fused"));
    train_dreambooth(&config(&plain, false), &Hooks::default()).unwrap();
    train_dreambooth(&config(&fused, true), &Hooks::default()).unwrap();
    for part in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let a = candle_core::safetensors::load(plain.join(part), &Device::Cpu).unwrap();
        let b = candle_core::safetensors::load(fused.join(part), &Device::Cpu).unwrap();
        let base = candle_core::safetensors::load(model.join(part), &Device::Cpu).unwrap();
        let mut moved = 0;
        for (k, t) in &a {
            let diff = max_diff(t, &b[k]);
            assert!(diff < 1e-6, "{part} {k}: fused differs by {diff}");
            if max_diff(t, &base[k]) > 0.0 {
                moved += 1;
            }
        }
        assert!(moved * 2 > a.len(), "{part}: most weights trained");
    }

    let mut bad = config(&dir.path().join("bad"), true);
    bad.trainer.max_grad_norm = Some(1.0);
    let err = train_dreambooth(&bad, &Hooks::default()).unwrap_err();
    assert!(format!("{err:#}").contains("--max-grad-norm"), "{err:#}");
}
