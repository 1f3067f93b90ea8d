//! Parity of the schedulers with diffusers 0.42.1: replays the sampling loops recorded by
//! `tools/reference/schedulers.py` (synthetic model, fixed noise) and compares timesteps,
//! init_noise_sigma, add_noise and the final latents.

use candle_core::{DType, Device, Tensor};
use imprint_models::schedulers::ddpm::NoiseSchedule;
use imprint_models::schedulers::{
    build, NoiseSource, PredictionType, SchedulerConfig, SchedulerKind,
};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixture_dir();
        let tensors =
            candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu)
                .unwrap();
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("schedulers.json")).unwrap())
                .unwrap();
        Self { tensors, meta }
    }
    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
    fn vec(&self, name: &str) -> Vec<f64> {
        self.get(name)
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    fn config(&self, name: &str) -> SchedulerConfig {
        serde_json::from_value(self.meta["configs"][name].clone()).unwrap()
    }
}

/// Hands out the reference's noise tensors in the order diffusers drew them.
struct Queue {
    noises: Vec<Tensor>,
    used: usize,
}

impl NoiseSource for Queue {
    fn noise_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        let n = self
            .noises
            .get(self.used)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("noise queue empty".into()))?;
        self.used += 1;
        assert_eq!(n.dims(), like.dims());
        n.to_dtype(like.dtype())
    }
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// The spacing of float32 values at `x`.
fn ulp_f32(x: f64) -> f64 {
    let x = (x as f32).abs();
    (x.next_up() - x) as f64
}

/// The reference's synthetic denoiser: tanh(0.5·x)·(1 + t/1000).
fn model(x: &Tensor, t: f64) -> Tensor {
    x.affine(0.5, 0.0)
        .unwrap()
        .tanh()
        .unwrap()
        .affine(1.0 + t / 1000.0, 0.0)
        .unwrap()
}

// Named `schedulers::…` so that `cargo test -p imprint-models schedulers` selects them.
mod schedulers {
    use super::*;

    #[test]
    fn sampling_loops_match_diffusers() {
        let fx = Fixture::load();
        let steps = fx.meta["steps"].as_u64().unwrap() as usize;
        let init = fx.get("init");
        let noises: Vec<Tensor> = (0..steps)
            .map(|i| fx.get(&format!("noise.{i}")).clone())
            .collect();
        let mut failures = Vec::new();
        for case in fx.meta["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let cfg = fx.config(case["config"].as_str().unwrap());
            let kind: SchedulerKind = case["kind"].as_str().unwrap().parse().unwrap();
            let karras = case["karras"].as_bool().unwrap();
            let mut sched = build(kind, &cfg, steps, karras).unwrap();

            let ref_ts = fx.vec(&format!("{name}.timesteps"));
            let ts_err = ref_ts
                .iter()
                .zip(sched.timesteps())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            // Integer timesteps must match exactly. Fractional (Karras) ones may differ by one float32
            // ulp: numpy's SIMD float32 `log` of the training sigmas is not correctly rounded (it
            // differs from libm in ~20% of the values), and that last bit moves the interpolation.
            let ts_ok = ref_ts
                .iter()
                .zip(sched.timesteps())
                .all(|(a, b)| (a - b).abs() <= 1e-6f64.max(ulp_f32(*a)));
            if ref_ts.len() != sched.timesteps().len() || !ts_ok {
                failures.push(format!(
                    "{name}: timesteps {:?} vs reference {ref_ts:?}",
                    sched.timesteps()
                ));
            }
            let ref_sigma = fx.vec(&format!("{name}.init_noise_sigma"))[0];
            if (sched.init_noise_sigma() - ref_sigma).abs() > 1e-6 * ref_sigma {
                failures.push(format!(
                    "{name}: init_noise_sigma {} vs {ref_sigma}",
                    sched.init_noise_sigma()
                ));
            }

            let noisy = sched
                .add_noise(fx.get("original"), fx.get("add_noise_noise"), 3)
                .unwrap();
            let reference = fx.get(&format!("{name}.add_noise"));
            let add_err = max_diff(&noisy, reference);
            if add_err > 1e-5 * max_abs(reference).max(1.0) {
                failures.push(format!("{name}: add_noise differs by {add_err:e}"));
            }

            let mut queue = Queue {
                noises: noises.clone(),
                used: 0,
            };
            let mut latents = init.affine(sched.init_noise_sigma(), 0.0).unwrap();
            for i in 0..sched.timesteps().len() {
                let t = sched.timesteps()[i];
                let input = sched.scale_model_input(&latents, i).unwrap();
                latents = sched
                    .step(&model(&input, t), i, &latents, &mut queue)
                    .unwrap();
            }
            let reference = fx.get(&format!("{name}.final"));
            let err = max_diff(&latents, reference);
            let scale = max_abs(reference).max(1.0);
            eprintln!("{name:32} final max|diff| {err:.3e} (scale {scale:.3}), timesteps {ts_err:.1e}, add_noise {add_err:.1e}");
            if err > 1e-4 * scale {
                failures.push(format!(
                    "{name}: final latents differ by {err:e} (scale {scale})"
                ));
            }
            // img2img: continue from the add_noise result at step index 3.
            let mut queue2 = Queue {
                noises: noises.clone(),
                used: 0,
            };
            let mut latents = noisy;
            let mut fresh = build(kind, &cfg, steps, karras).unwrap();
            for i in 3..fresh.timesteps().len() {
                let t = fresh.timesteps()[i];
                let input = fresh.scale_model_input(&latents, i).unwrap();
                latents = fresh
                    .step(&model(&input, t), i, &latents, &mut queue2)
                    .unwrap();
            }
            if queue2.used != case["img2img_noise_used"].as_u64().unwrap() as usize {
                failures.push(format!(
                    "{name}: img2img drew {} noise tensors, diffusers drew {}",
                    queue2.used, case["img2img_noise_used"]
                ));
            }
            let reference = fx.get(&format!("{name}.img2img"));
            let err = max_diff(&latents, reference);
            if err > 1e-4 * max_abs(reference).max(1.0) {
                failures.push(format!("{name}: img2img final latents differ by {err:e}"));
            }
            let used = case["noise_used"].as_u64().unwrap() as usize;
            if queue.used != used {
                failures.push(format!(
                    "{name}: drew {} noise tensors, diffusers drew {used}",
                    queue.used
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn noise_schedule_matches_diffusers() {
        let fx = Fixture::load();
        let cfg = fx.config(fx.meta["train"]["config"].as_str().unwrap());
        let schedule = NoiseSchedule::new(&cfg).unwrap();
        // The float32 emulation of torch's linspace/cumprod should be bit-exact.
        let reference = fx.vec("train.alphas_cumprod");
        assert_eq!(schedule.alphas_cumprod, reference);

        let timesteps: Vec<usize> = fx.meta["train"]["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        let (x0, noise) = (fx.get("train.x0"), fx.get("train.noise"));
        let noisy = schedule.add_noise(x0, noise, &timesteps).unwrap();
        assert!(max_diff(&noisy, fx.get("train.add_noise")) < 1e-6);
        let velocity = schedule.velocity(x0, noise, &timesteps).unwrap();
        assert!(max_diff(&velocity, fx.get("train.velocity")) < 1e-6);
        let target = schedule
            .target(PredictionType::VPrediction, x0, noise, &timesteps)
            .unwrap();
        assert!(max_diff(&target, &velocity) == 0.0);
        let target = schedule
            .target(PredictionType::Epsilon, x0, noise, &timesteps)
            .unwrap();
        assert!(max_diff(&target, noise) == 0.0);

        // SNR = ᾱ/(1-ᾱ): decreasing in t, and v = sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x0 has unit-variance
        // weights, so snr also equals (x0 weight of x_t / noise weight)².
        for t in [0usize, 10, 500, 999] {
            let a = reference[t];
            assert!((schedule.snr(t) - a / (1.0 - a)).abs() <= 1e-12 * schedule.snr(t));
        }
        assert!(schedule.snr(0) > schedule.snr(500) && schedule.snr(500) > schedule.snr(999));
        // A mismatched batch is an error, not a panic.
        assert!(schedule.add_noise(x0, noise, &[1]).is_err());
        assert!(schedule.add_noise(x0, noise, &[1, 1000]).is_err());
    }

    #[test]
    fn unsupported_config_values_are_errors() {
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap();
        let err = build(SchedulerKind::Ddim, &cfg, 8, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("beta_schedule"),
            "{err}"
        );
        let cfg: SchedulerConfig =
            serde_json::from_str(r#"{"timestep_spacing": "uniform"}"#).unwrap();
        let err = build(SchedulerKind::Euler, &cfg, 8, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("timestep_spacing"),
            "{err}"
        );
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"prediction_type": "flow"}"#).unwrap();
        let err = build(SchedulerKind::DpmPlusPlus2M, &cfg, 8, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("prediction_type"),
            "{err}"
        );
        let cfg: SchedulerConfig = serde_json::from_str("{}").unwrap();
        assert!(build(SchedulerKind::EulerAncestral, &cfg, 8, true).is_err());
        assert!(build(SchedulerKind::Ddpm, &cfg, 0, false).is_err());
    }
}
