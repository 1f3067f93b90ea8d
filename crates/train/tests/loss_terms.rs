//! The loss options against their definitions: an all-ones mask and an unreachable γ leave the
//! plain loss unchanged, a zero mask zeroes it, and min-SNR scales each sample by min(SNR, γ)/SNR.

use candle_core::{DType, Device, Tensor};
use imprint_models::init::{write_random_model, KnownConfig};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::TextConditioning;
use imprint_ops::grad_check::rand_tensor;
use imprint_pipeline::StableDiffusion;
use imprint_train::methods::{diffusion_loss, diffusion_loss_with, LossTerms};

#[test]
fn loss_terms_follow_their_definitions() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(KnownConfig::Tiny, &dir.path().join("m"), 0).unwrap();
    let sd = StableDiffusion::load(dir.path().join("m"), DType::F32, &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(&sd.scheduler_config).unwrap();
    let pred = sd.scheduler_config.prediction().unwrap();
    let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let latents = f32(rand_tensor(&[1, 4, 8, 8], 1, &Device::Cpu).unwrap());
    let noise = f32(rand_tensor(&[1, 4, 8, 8], 2, &Device::Cpu).unwrap());
    let text = f32(rand_tensor(&[1, 77, 32], 3, &Device::Cpu).unwrap());
    let cond = TextConditioning::Shared(&text);
    let ts = [300usize];
    let value = |t: Tensor| t.to_scalar::<f32>().unwrap() as f64;
    let plain =
        value(diffusion_loss(&sd.unet, &schedule, pred, &latents, &noise, &ts, cond).unwrap());
    let with = |terms: LossTerms| {
        value(
            diffusion_loss_with(
                &sd.unet, &schedule, pred, &latents, &noise, &ts, cond, terms,
            )
            .unwrap(),
        )
    };
    let ones = Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let zeros = ones.zeros_like().unwrap();
    assert!(
        (with(LossTerms {
            mask: Some(&ones),
            snr_gamma: None,
            ..Default::default()
        }) - plain)
            .abs()
            < 1e-6 * plain
    );
    assert_eq!(
        with(LossTerms {
            mask: Some(&zeros),
            snr_gamma: None,
            ..Default::default()
        }),
        0.0
    );
    assert!(
        (with(LossTerms {
            mask: None,
            snr_gamma: Some(1e12),
            ..Default::default()
        }) - plain)
            .abs()
            < 1e-6 * plain
    );
    // Custom Diffusion's normalization: the masked error summed over the 4 latent channels and
    // divided by the (one-channel) mask's area, so a full mask gives 4 × the mean.
    let normalized = with(LossTerms {
        mask: Some(&ones),
        normalize_by_mask: true,
        ..Default::default()
    });
    assert!(
        (normalized - 4.0 * plain).abs() < 1e-5 * plain,
        "{normalized} vs {plain}"
    );
    let snr = schedule.snr(300);
    let gamma = snr / 4.0;
    let expected = plain * gamma.min(snr) / snr;
    assert!(
        (with(LossTerms {
            mask: None,
            snr_gamma: Some(gamma),
            ..Default::default()
        }) - expected)
            .abs()
            < 1e-5 * expected
    );
}
