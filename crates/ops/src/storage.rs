//! Small helpers for custom ops that work on raw storages.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// The contiguous f32 or f64 slice a CPU op reads; `None` for other dtypes.
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
