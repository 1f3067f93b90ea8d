//! Truncated SVD for extracting a LoRA from a weight difference (DreamBooth `--extract-lora`):
//! `ΔW ≈ U_r Σ_r V_rᵀ`, split as `up = U_r √Σ_r`, `down = √Σ_r V_rᵀ`, as kohya's
//! `extract_lora_from_models.py` does (it uses an exact SVD).
//!
//! Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with 8 oversampling
//! columns and 2 power iterations: the large products run through candle's gemm, the small
//! `k × k` eigenproblem through Jacobi rotations. Exact for matrices of rank ≤ k.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Orthonormalizes the columns of `y` (`m × k`, row-major) in place: Gram–Schmidt applied twice
/// ("twice is enough", Giraud et al. 2005); a column with nothing left of itself after the
/// projections (the matrix has lower rank) is set to zero rather than normalized noise.
fn orthonormalize(y: &mut [f64], m: usize, k: usize) {
    for j in 0..k {
        let before = (0..m).map(|r| y[r * k + j].powi(2)).sum::<f64>().sqrt();
        for _pass in 0..2 {
            for i in 0..j {
                let dot: f64 = (0..m).map(|r| y[r * k + i] * y[r * k + j]).sum();
                for r in 0..m {
                    y[r * k + j] -= dot * y[r * k + i];
                }
            }
        }
        let norm = (0..m).map(|r| y[r * k + j].powi(2)).sum::<f64>().sqrt();
        let keep = norm > 1e-10 * before.max(1e-300);
        for r in 0..m {
            y[r * k + j] = if keep { y[r * k + j] / norm } else { 0.0 };
        }
    }
}

/// Eigen-decomposition of a symmetric `k × k` matrix by cyclic Jacobi rotations: eigenvalues
/// (descending) and the eigenvectors as columns of a row-major `k × k` matrix.
fn symmetric_eigen(c: &[f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = c.to_vec();
    let mut v = vec![0f64; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (cs, sn) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for r in 0..k {
                    let (arp, arq) = (a[r * k + p], a[r * k + q]);
                    a[r * k + p] = cs * arp - sn * arq;
                    a[r * k + q] = sn * arp + cs * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (a[p * k + r], a[q * k + r]);
                    a[p * k + r] = cs * apr - sn * aqr;
                    a[q * k + r] = sn * apr + cs * aqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (v[r * k + p], v[r * k + q]);
                    v[r * k + p] = cs * vrp - sn * vrq;
                    v[r * k + q] = sn * vrp + cs * vrq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| a[j * k + j].total_cmp(&a[i * k + i]));
    let values = order.iter().map(|&i| a[i * k + i]).collect();
    let mut vectors = vec![0f64; k * k];
    for (new, &old) in order.iter().enumerate() {
        for r in 0..k {
            vectors[r * k + new] = v[r * k + old];
        }
    }
    (values, vectors)
}

/// The best rank-`rank` factorization `delta ≈ up · down` of a 2-D tensor `[m, n]`:
/// `up [m, r]`, `down [r, n]` (f32, CPU).
pub fn low_rank(delta: &Tensor, rank: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let (m, n) = delta.dims2()?;
    if rank == 0 || rank > m.min(n) {
        bail!("rank {rank} is out of range for a {m}×{n} weight")
    }
    let dev = Device::Cpu;
    let a = delta.to_device(&dev)?.to_dtype(DType::F64)?;
    let k = (rank + 8).min(m).min(n);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let omega: Vec<f64> = (0..n * k)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let omega = Tensor::from_vec(omega, (n, k), &dev)?;
    let orth = |y: Tensor| -> Result<Tensor> {
        let mut v: Vec<f64> = y.flatten_all()?.to_vec1()?;
        orthonormalize(&mut v, m, k);
        Ok(Tensor::from_vec(v, (m, k), &dev)?)
    };
    let mut q = orth(a.matmul(&omega)?)?;
    for _ in 0..2 {
        let z = a.t()?.matmul(&q)?; // n × k
        q = orth(a.matmul(&z)?)?;
    }
    let b = q.t()?.matmul(&a)?; // k × n
    let c: Vec<f64> = b.matmul(&b.t()?)?.flatten_all()?.to_vec1()?;
    let (values, vectors) = symmetric_eigen(&c, k);
    let w = Tensor::from_vec(vectors, (k, k), &dev)?;
    let u = q.matmul(&w)?.narrow(1, 0, rank)?; // m × r
    let sigma: Vec<f64> = values
        .iter()
        .take(rank)
        .map(|&l| l.max(0.0).sqrt())
        .collect();
    // Vᵀ rows: wᵢᵀ B / σᵢ; down = √σ Vᵀ = wᵢᵀ B / √σᵢ.
    let wt_b = w.t()?.matmul(&b)?.narrow(0, 0, rank)?; // r × n
    let inv_sqrt: Vec<f64> = sigma
        .iter()
        .map(|&s| if s > 1e-12 { 1.0 / s.sqrt() } else { 0.0 })
        .collect();
    let down = wt_b.broadcast_mul(&Tensor::from_vec(inv_sqrt, (rank, 1), &dev)?)?;
    let sqrt_sigma: Vec<f64> = sigma.iter().map(|s| s.sqrt()).collect();
    let up = u.broadcast_mul(&Tensor::from_vec(sqrt_sigma, (1, rank), &dev)?)?;
    Ok((up.to_dtype(DType::F32)?, down.to_dtype(DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imprint_ops::grad_check::rand_tensor;

    #[test]
    fn recovers_a_low_rank_matrix_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let a = rand_tensor(&[30, 3], 1, &dev)?.matmul(&rand_tensor(&[3, 50], 2, &dev)?)?;
        let (up, down) = low_rank(&a, 3, 0)?;
        let back = up
            .to_dtype(DType::F64)?
            .matmul(&down.to_dtype(DType::F64)?)?;
        let err = (back - &a)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-4, "reconstruction error {err}");
        Ok(())
    }

    #[test]
    fn keeps_the_dominant_directions() -> Result<()> {
        let dev = Device::Cpu;
        // A strong rank-2 part plus small noise: rank 2 captures nearly all of it.
        let strong =
            (rand_tensor(&[40, 2], 3, &dev)?.matmul(&rand_tensor(&[2, 40], 4, &dev)?)? * 10.0)?;
        let a = (&strong + (rand_tensor(&[40, 40], 5, &dev)? * 0.01)?)?;
        let (up, down) = low_rank(&a, 2, 0)?;
        let back = up
            .to_dtype(DType::F64)?
            .matmul(&down.to_dtype(DType::F64)?)?;
        let rel = ((back - &strong)?.sqr()?.sum_all()?.sqrt()?
            / strong.sqr()?.sum_all()?.sqrt()?)?
        .to_scalar::<f64>()?;
        assert!(rel < 0.01, "relative error {rel}");
        Ok(())
    }
}
