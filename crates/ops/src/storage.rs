//! Small helpers for custom ops that work on raw storages.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};

/// The contiguous f32 or f64 slice a CPU op reads.
#[derive(Clone, Copy)]
pub(crate) enum CpuSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Borrows the contiguous CPU slices of several tensors (a backward pass reading its inputs) and
/// runs `f` on them.
pub(crate) fn with_cpu_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[CpuSlice]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("imprint-ops: a CPU kernel's operand is on another device")
        };
        slices.push(cpu_slice(cpu, layout)?);
    }
    f(&slices)
}

/// What a CPU kernel produced, as a tensor of `shape` (for outputs built inside a backward pass).
pub(crate) fn into_tensor(s: CpuStorage, shape: impl Into<Shape>, dev: &Device) -> Result<Tensor> {
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, dev),
        other => bail!("imprint-ops: a kernel produced {:?}", other.dtype()),
    }
}

pub(crate) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<CpuSlice<'a>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("imprint-ops: expected a contiguous tensor")
    };
    Ok(match s {
        CpuStorage::F32(v) => CpuSlice::F32(&v[start..end]),
        CpuStorage::F64(v) => CpuSlice::F64(&v[start..end]),
        _ => bail!(
            "imprint-ops: CPU kernel supports f32 and f64, got {:?}",
            s.dtype()
        ),
    })
}

/// Matches operand slices that are all f32 or all f64, binds them to the given names, and wraps
/// the body's `Vec` in the matching `CpuStorage`: each kernel is written once, generically, and
/// mixed dtypes are an error naming the op.
macro_rules! same_float {
    ($op:literal, ($($slice:expr),+ $(,)?), ($($name:ident),+) => $body:expr) => {
        match ($($slice,)+) {
            ($($crate::storage::CpuSlice::F32($name),)+) => candle_core::CpuStorage::F32($body),
            ($($crate::storage::CpuSlice::F64($name),)+) => candle_core::CpuStorage::F64($body),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!(concat!($op, ": operands must share one dtype, f32 or f64")),
        }
    };
}
pub(crate) use same_float;
