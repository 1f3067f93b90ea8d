//! One textual-inversion training step against diffusers' script (tools/reference/ti_step.py):
//! loss, the gradient on the new rows, and the rows after one AdamW step, 1e-4 relative.

use candle_core::{DType, Tensor};
use imprint_models::init::{write_random_model, KnownConfig};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::TextConditioning;
use imprint_pipeline::StableDiffusion;
use imprint_train::methods::diffusion_loss;
use imprint_train::methods::textual_inversion::TextualInversion;
use imprint_train::optim::{AdamW, AdamWConfig};
use std::path::Path;

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-12)
}

fn check(config: KnownConfig, name: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
        .join("ti_step.safetensors");
    let bytes = std::fs::read(&fixture).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    // The device IMPRINT_DEVICE names: CPU in CI, CUDA in tools/cuda/device.sh.
    let dev = imprint_pipeline::device_from_env().unwrap();
    let f = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(name);
    write_random_model(config, &model, 0).unwrap();
    let mut sd = StableDiffusion::load(&model, DType::F32, &dev).unwrap();
    let n: usize = meta["num_vectors"].parse().unwrap();
    let ti = TextualInversion::new(
        &mut sd.tokenizer,
        &sd.text_encoder,
        &meta["token"],
        &meta["init_word"],
        n,
    )
    .unwrap();
    assert!(
        rel_err(ti.vectors.as_tensor(), &f["initial"]) < 1e-7,
        "initial vectors differ"
    );

    let caption = meta["caption"].replace(&ti.placeholder_string(), &ti.placeholder_string());
    let ids: Vec<i64> = sd
        .tokenizer
        .encode(&caption)
        .unwrap()
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let ids = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    assert_eq!(
        ids.to_vec2::<i64>().unwrap(),
        f["input_ids"].to_vec2::<i64>().unwrap(),
        "caption ids"
    );

    let schedule = NoiseSchedule::new(&sd.scheduler_config).unwrap();
    let prediction = sd.scheduler_config.prediction().unwrap();
    let timesteps: Vec<usize> = f["timesteps"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let text = ti.encode(&sd.text_encoder, &ids).unwrap();
    let loss = diffusion_loss(
        &sd.unet,
        &schedule,
        prediction,
        &f["latents"],
        &f["noise"],
        &timesteps,
        TextConditioning::Shared(&text),
    )
    .unwrap();
    let loss_err = rel_err(&loss.reshape(1).unwrap(), &f["loss"]);
    assert!(loss_err < 1e-4, "{name}: loss relative error {loss_err:e}");
    let grads = loss.backward().unwrap();
    let grad = grads.get(ti.vectors.as_tensor()).unwrap().clone();
    let grad_err = rel_err(&grad, &f["grad"]);
    assert!(
        grad_err < 1e-4,
        "{name}: gradient relative error {grad_err:e}"
    );
    let lr: f64 = meta["lr"].parse().unwrap();
    let mut adam = AdamW::new(vec![ti.vectors.clone()], AdamWConfig::default()).unwrap();
    adam.step(&[grad], lr).unwrap();
    let upd_err = rel_err(ti.vectors.as_tensor(), &f["updated"]);
    assert!(
        upd_err < 1e-4,
        "{name}: updated vectors relative error {upd_err:e}"
    );
    // Only the new rows are trainable: the embedding table is untouched.
    assert!(grads.get(&sd.text_encoder.token_embedding).is_none());
}

#[test]
fn one_step_matches_diffusers_sd1() {
    check(KnownConfig::Tiny, "tiny");
}

#[test]
fn one_step_matches_diffusers_sd2_v_prediction() {
    check(KnownConfig::TinySd2, "tiny-sd2");
}
