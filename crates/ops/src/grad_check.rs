//! Finite-difference gradient checks, used by the tests of every op with a custom backward.

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// A reproducible tensor of standard-normal-ish values (f64, for finite differences).
pub fn rand_tensor(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0) * 1.7).collect();
    Tensor::from_vec(v, shape, dev)
}

/// `‖a − b‖₂ / ‖b‖₂` over whole tensors, in f64 on the CPU (any device or dtype in): the error
/// measure of the device tests, where half precision makes elementwise bounds meaningless.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("rel_l2: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    let f64_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let (a, b) = (f64_cpu(a)?, f64_cpu(b)?);
    let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let n = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((d / n.max(1e-30)).sqrt())
}

/// Checks `∂/∂inputs` of `Σ f(inputs) ⊙ r` (r a fixed random tensor) against central differences.
///
/// Every input is made a `Var`; inputs must be f64. Fails if any gradient is missing or differs by
/// more than `tol · max(1, |numeric|)`.
pub fn check_grads(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f64,
) -> Result<()> {
    for x in inputs {
        if x.dtype() != DType::F64 {
            bail!("grad_check: inputs must be f64")
        }
    }
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?;
    let r = rand_tensor(y.dims(), 12345, y.device())?;
    let loss = |ts: &[Tensor]| -> Result<f64> { f(ts)?.mul(&r)?.sum_all()?.to_scalar::<f64>() };
    let grads = y.mul(&r)?.sum_all()?.backward()?;
    let eps = 1e-5;
    for (i, v) in vars.iter().enumerate() {
        let Some(g) = grads.get(v) else {
            bail!("grad_check: input {i} received no gradient")
        };
        let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
        let base: Vec<f64> = inputs[i].flatten_all()?.to_vec1()?;
        for j in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[j] += delta;
                let mut ts: Vec<Tensor> = inputs.to_vec();
                ts[i] = Tensor::from_vec(p, inputs[i].dims(), inputs[i].device())?;
                loss(&ts)
            };
            let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let err = (numeric - g[j]).abs();
            if err > tol * numeric.abs().max(1.0) {
                bail!(
                    "grad_check: input {i} element {j}: analytic {} vs numeric {numeric}",
                    g[j]
                )
            }
        }
    }
    Ok(())
}

/// [`check_grads`] for a single input.
pub fn check_input_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f64) -> Result<()> {
    check_grads(std::slice::from_ref(x), |ts| f(&ts[0]), tol)
}
