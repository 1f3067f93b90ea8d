//! Seeded standard-normal noise, identical on every platform for a given seed.

use candle_core::{Device, Result, Shape, Tensor};
use imprint_models::schedulers::NoiseSource;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Gaussian noise from a ChaCha20 stream (Box–Muller), so the same seed gives the same images on
/// any machine and thread count.
pub struct SeededNoise {
    rng: ChaCha20Rng,
    seed: u64,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
            seed,
        }
    }

    /// The seed and stream position, which restore the generator exactly (training resume).
    pub fn state(&self) -> (u64, u128) {
        (self.seed, self.rng.get_word_pos())
    }

    pub fn from_state(seed: u64, word_pos: u128) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_word_pos(word_pos);
        Self { rng, seed }
    }

    /// The underlying generator, for other random choices drawn from the same stream.
    pub fn rng(&mut self) -> &mut ChaCha20Rng {
        &mut self.rng
    }

    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = self.rng.gen();
            let r = (-2.0 * u1.ln()).sqrt();
            let a = std::f64::consts::TAU * u2;
            v.push((r * a.cos()) as f32);
            v.push((r * a.sin()) as f32);
        }
        v.truncate(n);
        Tensor::from_vec(v, shape, device)
    }
}

impl NoiseSource for SeededNoise {
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.randn(like.shape().clone(), like.device())?
            .to_dtype(like.dtype())
    }
}

/// Noise given in advance, one tensor per call (parity tests feed the reference's noise).
pub struct QueuedNoise {
    queue: std::collections::VecDeque<Tensor>,
}

impl QueuedNoise {
    pub fn new(noise: Vec<Tensor>) -> Self {
        Self {
            queue: noise.into(),
        }
    }
}

impl NoiseSource for QueuedNoise {
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor> {
        match self.queue.pop_front() {
            Some(t) => t
                .reshape(like.shape())?
                .to_dtype(like.dtype())?
                .to_device(like.device()),
            None => candle_core::bail!("the supplied step noise ran out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard() -> Result<()> {
        let a = SeededNoise::new(7).randn((4, 1000), &Device::Cpu)?;
        let b = SeededNoise::new(7).randn((4, 1000), &Device::Cpu)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        let mean = a.mean_all()?.to_scalar::<f32>()?;
        let var = a.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.1,
            "mean {mean} var {var}"
        );
        let mut c = SeededNoise::new(9);
        c.randn(5, &Device::Cpu)?;
        let (seed, pos) = c.state();
        let next = c.randn(3, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(
            SeededNoise::from_state(seed, pos)
                .randn(3, &Device::Cpu)?
                .to_vec1::<f32>()?,
            next
        );
        Ok(())
    }
}
