//! Optimizer kernels for the CPU: AdamW's update in place and a gradient's squared norm, each a
//! pass over memory with no temporaries. Composed from tensor ops, one AdamW update allocates a
//! dozen buffers the size of the weights and a norm in f64 two more of twice that size: for
//! DreamBooth on SD 1.5 (860 M weights) some 60 GB of fresh memory per step, most of a step's
//! time on a CPU.

use crate::storage::{cpu_slice, CpuSlice};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task: fixed, so sums are grouped the same way on any machine.
const CHUNK: usize = 1 << 15;

/// One AdamW update's constants (`torch.optim.adamw`, single-tensor path).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `1 − β1ᵗ`.
    pub bias_correction1: f64,
    /// `√(1 − β2ᵗ)`.
    pub bias_correction2_sqrt: f64,
}

/// Whether [`adamw_update`] takes these operands: all on the CPU, contiguous, in one dtype (f32 or
/// f64) and shape, and no two sharing memory (the update writes three of them in turn). Elsewhere
/// [`adamw_composed`] runs.
pub fn adamw_update_applies(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    let dtype = p.dtype();
    let fits = matches!(dtype, DType::F32 | DType::F64)
        && [p, m, v, g].iter().all(|t| {
            t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous() && t.shape() == p.shape()
        });
    if !fits {
        return false;
    }
    let spans: Vec<_> = [p, m, v, g].iter().map(|t| byte_span(t)).collect();
    spans.iter().enumerate().all(|(i, a)| {
        spans[i + 1..]
            .iter()
            .all(|b| matches!((a, b), (Some(a), Some(b)) if a.1 <= b.0 || b.1 <= a.0))
    })
}

/// The bytes a contiguous CPU tensor covers, as addresses.
fn byte_span(t: &Tensor) -> Option<(usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    let (base, size) = match cpu {
        CpuStorage::F32(v) => (v.as_ptr() as usize, 4),
        CpuStorage::F64(v) => (v.as_ptr() as usize, 8),
        _ => return None,
    };
    Some((base + start * size, base + end * size))
}

/// AdamW in place: `m ← m + (1−β1)(g − m)`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·(1 − lr·λ) − (lr/bc1)·m / (√v/√bc2 + ε)`, with the operations of the composed tensor
/// form in the same order and precision, so the result is bit for bit the same.
pub fn adamw_update(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, s: &AdamWStep) -> Result<()> {
    if !adamw_update_applies(p, m, v, g) {
        bail!(
            "adamw_update: expects contiguous CPU tensors of one float dtype and shape, got {:?} {:?}",
            p.dtype(),
            p.shape()
        )
    }
    m.inplace_op2(g, &Moment::First(*s))?;
    v.inplace_op2(g, &Moment::Second(*s))?;
    p.inplace_op3(m, v, &ParamUpdate(*s))
}

/// AdamW composed of tensor ops, any device and dtype: the new `[p, m, v]` (the moment update is
/// torch's lerp_, `m + (1 − β1)(g − m)`). What runs where [`adamw_update`] does not apply, and
/// what it must equal bit for bit.
pub fn adamw_composed(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> Result<[Tensor; 3]> {
    let p = p.affine(1.0 - s.lr * s.weight_decay, 0.0)?;
    let m = (m + ((g - m)? * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((v.sqrt()? / s.bias_correction2_sqrt)? + s.eps)?;
    let p = (p - (m.div(&denom)? * (s.lr / s.bias_correction1))?)?;
    Ok([p, m, v])
}

/// Zeros shaped as `like` for state that is updated in place (AdamW's moments). On the CPU they are
/// written, on transparent huge pages where the kernel offers them: zeros from the allocator's
/// fresh pages map the shared zero page, so an in-place update that reads them first faults every
/// page twice, the second time with a TLB shootdown across the threads (measured: the first
/// DreamBooth update on SD 1.5 took 13.7 s instead of 1.0 s); written zeros fault once, and on 2 MB
/// pages 512 times less often.
pub fn zeros_written(like: &Tensor) -> Result<Tensor> {
    fn written<T: Real + candle_core::WithDType>(like: &Tensor) -> Result<Tensor> {
        let n = like.elem_count();
        let mut v: Vec<T> = Vec::with_capacity(n);
        advise_huge_pages(v.as_mut_ptr() as usize, n * std::mem::size_of::<T>());
        v.resize(n, T::of(0.0));
        Tensor::from_vec(v, like.shape(), like.device())
    }
    if !like.device().is_cpu() {
        return like.zeros_like();
    }
    match like.dtype() {
        DType::F32 => written::<f32>(like),
        DType::F64 => written::<f64>(like),
        _ => like.zeros_like(),
    }
}

/// Asks for transparent huge pages on the 2 MB-aligned part of an allocation not yet touched
/// (`madvise(MADV_HUGEPAGE)`; a hint: nothing changes where THP is off or unavailable).
fn advise_huge_pages(start: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    let (begin, end) = (
        (start + HUGE - 1) & !(HUGE - 1),
        (start + len) & !(HUGE - 1),
    );
    #[cfg(target_os = "linux")]
    if end > begin {
        // SAFETY: the range lies inside an allocation this function's caller owns; MADV_HUGEPAGE
        // changes how its pages are backed, not their contents.
        unsafe {
            libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (begin, end);
}

/// `Σ x²` accumulated in f64 (the global gradient norm's terms), without an f64 copy of `x` on the
/// CPU; other devices sum in f64 through tensor ops.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("sum_squares: expected a CPU tensor")
    };
    let partial: Vec<f64> = match cpu_slice(cpu, layout)? {
        CpuSlice::F32(xs) => xs
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&a| a as f64 * a as f64).sum())
            .collect(),
        CpuSlice::F64(xs) => xs
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&a| a * a).sum())
            .collect(),
    };
    // Partial sums added in order: the same total on any number of threads.
    Ok(partial.iter().sum())
}

/// f32 and f64, for kernels written once.
trait Real:
    Copy
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    /// `x` rounded to this type, as candle rounds an affine op's constants.
    fn of(x: f64) -> Self;
    fn sqrt(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! real {
    ($t:ty, $variant:ident) => {
        impl Real for $t {
            fn of(x: f64) -> Self {
                x as $t
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
real!(f32, F32);
real!(f64, F64);

/// The contiguous part of `s` that `l` covers, as `T`.
fn part<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match (T::slice(s), l.contiguous_offsets()) {
        (Some(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("{op}: operands must be contiguous and of one dtype"),
    }
}

fn part_mut<'a, T: Real>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [T]> {
    match (l.contiguous_offsets(), T::slice_mut(s)) {
        (Some((a, b)), Some(v)) => Ok(&mut v[a..b]),
        _ => bail!("{op}: operands must be contiguous and of one dtype"),
    }
}

/// Runs `$body::<f32>` or `::<f64>` by the destination's dtype.
macro_rules! by_dtype {
    ($s:expr, $op:expr, $f:ident ( $($arg:expr),* )) => {
        match $s.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            other => bail!("{}: f32 or f64, got {other:?}", $op),
        }
    };
}

// Each kernel spells out the composed form's operations: `t * c` and `t / c` are candle's affine
// `t·c' + 0` (c' = c or 1/c, rounded to the dtype) and `t + c` is `t·1 + c`; the `+ 0` stays, as
// it is not an identity for −0.

/// A moment estimate updated in place from the gradient: the first,
/// `m ← m + ((g − m)·(1 − β1) + 0)`, or the second, `v ← (v·β2 + 0) + ((g·g)·(1 − β2) + 0)`.
enum Moment {
    First(AdamWStep),
    Second(AdamWStep),
}

fn moment<T: Real>(
    s: &mut CpuStorage,
    l: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    which: &Moment,
) -> Result<()> {
    fn each<T: Real>(x: &mut [T], g: &[T], f: impl Fn(T, T) -> T + Sync) {
        x.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(x, g)| {
                for (x, &g) in x.iter_mut().zip(g) {
                    *x = f(*x, g);
                }
            });
    }
    let op = "adamw-moment";
    let (g, x, zero) = (part::<T>(g, gl, op)?, part_mut::<T>(s, l, op)?, T::of(0.0));
    match which {
        Moment::First(k) => {
            let c = T::of(1.0 - k.beta1);
            each(x, g, |m, g| m + ((g - m) * c + zero));
        }
        Moment::Second(k) => {
            let (b2, c) = (T::of(k.beta2), T::of(1.0 - k.beta2));
            each(x, g, |v, g| (v * b2 + zero) + ((g * g) * c + zero));
        }
    }
    Ok(())
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        match self {
            Moment::First(_) => "adamw-first-moment",
            Moment::Second(_) => "adamw-second-moment",
        }
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        by_dtype!(s, self.name(), moment(s, l, g, gl, self))
    }
}

/// `p ← (p·(1 − lr·λ) + 0) − ((m / ((√v·(1/√bc2) + 0)·1 + ε))·(lr/bc1) + 0)`.
struct ParamUpdate(AdamWStep);

#[allow(clippy::too_many_arguments)]
fn param_update<T: Real>(
    s: &mut CpuStorage,
    l: &Layout,
    m: &CpuStorage,
    ml: &Layout,
    v: &CpuStorage,
    vl: &Layout,
    k: &AdamWStep,
) -> Result<()> {
    let op = "adamw-param-update";
    let decay = T::of(1.0 - k.lr * k.weight_decay);
    let inv_bc2 = T::of(1.0 / k.bias_correction2_sqrt);
    let (one, eps, zero) = (T::of(1.0), T::of(k.eps), T::of(0.0));
    let step = T::of(k.lr / k.bias_correction1);
    let (m, v) = (part::<T>(m, ml, op)?, part::<T>(v, vl, op)?);
    part_mut::<T>(s, l, op)?
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                let denom = (v.sqrt() * inv_bc2 + zero) * one + eps;
                *p = (*p * decay + zero) - ((m / denom) * step + zero);
            }
        });
    Ok(())
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param-update"
    }
    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        by_dtype!(s, self.name(), param_update(s, l, m, ml, v, vl, &self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Result<Vec<u64>> {
        Ok(match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits() as u64)
                .collect(),
            _ => t.to_vec1::<f64>()?.iter().map(|x| x.to_bits()).collect(),
        })
    }

    #[test]
    fn adamw_in_place_is_the_composed_form_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        // More than one parallel chunk, signed zeros, tiny and large values.
        let n = CHUNK * 2 + 77;
        for dtype in [DType::F32, DType::F64] {
            let mut p = Tensor::randn(0f32, 1.0, n, &dev)?.to_dtype(dtype)?;
            let special = Tensor::new(&[0.0f32, -0.0, 1e-30, -3e20], &dev)?.to_dtype(dtype)?;
            p = p.slice_assign(&[0..4], &special)?;
            let (mut m, mut v) = (p.zeros_like()?, p.zeros_like()?);
            let (fp, fm, fv) = (p.copy()?, m.copy()?, v.copy()?);
            for t in 1..=3 {
                let mut g = (Tensor::randn(0f32, 1.0, n, &dev)?.to_dtype(dtype)? * 1e-3)?;
                if t == 2 {
                    g = g.slice_assign(&[0..4], &special)?;
                }
                let k = AdamWStep {
                    lr: 1e-3 * t as f64,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-2,
                    bias_correction1: 1.0 - 0.9f64.powi(t),
                    bias_correction2_sqrt: (1.0 - 0.999f64.powi(t)).sqrt(),
                };
                [p, m, v] = adamw_composed(&p, &m, &v, &g, &k)?;
                adamw_update(&fp, &fm, &fv, &g, &k)?;
            }
            for (name, a, b) in [("p", &p, &fp), ("m", &m, &fm), ("v", &v, &fv)] {
                assert!(bits(a)? == bits(b)?, "{dtype:?} {name} differs");
            }
        }
        Ok(())
    }

    #[test]
    fn adamw_in_place_refuses_what_it_cannot_take() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::ones((3, 2), DType::F32, &dev)?;
        let k = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction1: 0.1,
            bias_correction2_sqrt: 0.03,
        };
        let (m, v) = (p.zeros_like()?, p.zeros_like()?);
        // A transposed gradient, another dtype, another shape.
        for g in [
            Tensor::ones((2, 3), DType::F32, &dev)?.t()?,
            p.to_dtype(DType::F64)?,
            Tensor::ones(6, DType::F32, &dev)?,
        ] {
            assert!(!adamw_update_applies(&p, &m, &v, &g));
            assert!(adamw_update(&p, &m, &v, &g, &k).is_err());
        }
        // Moments sharing one buffer: refused before anything is written.
        let both = Tensor::zeros((2, 3, 2), DType::F32, &dev)?;
        let (m2, v2) = (both.get(0)?, both.get(0)?);
        let g = p.ones_like()?;
        assert!(!adamw_update_applies(&p, &m2, &v2, &g));
        assert!(adamw_update(&p, &m2, &v2, &g, &k).is_err());
        // Two halves of one buffer do not overlap: taken.
        let (m3, v3) = (both.get(0)?, both.get(1)?);
        assert!(adamw_update_applies(&p, &m3, &v3, &g));
        assert_eq!(p.to_vec2::<f32>()?, vec![vec![1.0; 2]; 3]);
        Ok(())
    }

    #[test]
    fn written_zeros_are_zeros_of_the_shape_and_dtype() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let like = Tensor::ones((3, 5), dtype, &dev)?;
            let z = zeros_written(&like)?;
            assert_eq!((z.dims(), z.dtype()), (like.dims(), dtype));
            assert_eq!(
                z.to_dtype(DType::F64)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f64>()?,
                0.0
            );
        }
        Ok(())
    }

    #[test]
    fn sum_squares_matches_an_f64_sum() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, CHUNK * 3 + 5, &dev)?;
        let exact: f64 = x
            .to_vec1::<f32>()?
            .iter()
            .map(|&a| a as f64 * a as f64)
            .sum();
        let ours = sum_squares(&x)?;
        assert!((ours - exact).abs() <= 1e-12 * exact, "{ours} vs {exact}");
        // Non-contiguous input and f64.
        let y = Tensor::randn(0f64, 1.0, (40, 30), &dev)?.t()?;
        let exact = y.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!((sum_squares(&y)? - exact).abs() <= 1e-12 * exact);
        Ok(())
    }
}
