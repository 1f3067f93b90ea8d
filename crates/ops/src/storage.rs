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

/// The output of an op computed before the op is applied (on detached inputs), handed over once
/// by its forward: a custom op owns the storage it returns, so the forward returns a copy of this
/// value's storage, and the value itself is dropped with the op's first use. Checkpointed blocks,
/// frozen-weight convolutions and query-chunked attention compute their outputs this way, with
/// candle's own ops, and attach only their backward through the custom op.
pub(crate) struct Precomputed {
    value: std::sync::Mutex<Option<candle_core::Tensor>>,
    /// The op's name, for errors.
    pub what: &'static str,
}

impl Precomputed {
    pub fn new(what: &'static str, value: candle_core::Tensor) -> Self {
        Self {
            value: std::sync::Mutex::new(Some(value)),
            what,
        }
    }

    pub fn take(&self) -> candle_core::Result<candle_core::Tensor> {
        match self.value.lock().ok().and_then(|mut v| v.take()) {
            Some(v) => Ok(v),
            None => candle_core::bail!("{}: forward value already consumed", self.what),
        }
    }
}

/// `Ok((storage, shape))` of a [`Precomputed`] value on device `$variant` (`Cpu`, `Cuda`,
/// `Metal`), for a custom op's `*_fwd`.
macro_rules! hand_over {
    ($value:expr, $variant:ident) => {{
        let value = $value.take()?;
        let shape = value.shape().clone();
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            candle_core::Storage::$variant(s) => {
                use candle_core::backend::BackendStorage;
                Ok((s.try_clone(layout)?, shape))
            }
            _ => candle_core::bail!("{}: value on an unexpected device", $value.what),
        }
    }};
}
pub(crate) use hand_over;

/// The `cpu_fwd`, `cuda_fwd` and `metal_fwd` of a three-operand custom op whose forward hands
/// over the [`Precomputed`] value in `self.$field` (checkpointed blocks, query-chunked attention,
/// the GEMM-backward convolution): written once here instead of in each op.
macro_rules! hand_over_fwd3 {
    ($field:ident) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::storage::hand_over!(self.$field, Cpu)
        }
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            $crate::storage::hand_over!(self.$field, Cuda)
        }
        fn metal_fwd(
            &self,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
            _: &candle_core::MetalStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::MetalStorage, candle_core::Shape)> {
            $crate::storage::hand_over!(self.$field, Metal)
        }
    };
}
pub(crate) use hand_over_fwd3;
