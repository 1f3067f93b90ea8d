//! Launches the kernels of `src/cuda/kernels.cu` and `src/cuda/flash_attention.cu` (compiled to
//! PTX by build.rs) on candle's CUDA storages: the forward passes of norm (+SiLU), softmax and
//! GEGLU, GEGLU's backward, the im2col/col2im of the convolution backward, and the fused
//! attention's forward and backward. The other backward passes are composed from candle ops and
//! so run on any device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "imprint_ops";

/// The dtypes the kernels take, each with its name suffix.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("imprint CUDA kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// Whether `dtype` has a kernel here.
pub(crate) fn supported(dtype: DType) -> bool {
    suffix(dtype).is_ok()
}

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => bail!("{what}: the CUDA kernel needs a contiguous input"),
    }
}

/// Threads per block for a row of `len` values: a multiple of 32, at most 1024.
fn row_threads(len: usize) -> u32 {
    (len.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn elementwise(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn wrap<T>(slice: CudaSlice<T>, device: &CudaDevice) -> CudaStorage
where
    T: candle_core::cuda_backend::CudaDType,
{
    CudaStorage::wrap_cuda_slice(slice, device.clone())
}

/// A storage with no elements (a launch with an empty grid is an error).
fn empty(dev: &CudaDevice, dtype: DType) -> Result<CudaStorage> {
    Ok(match dtype {
        DType::F32 => wrap(dev.alloc_zeros::<f32>(0)?, dev),
        DType::F16 => wrap(dev.alloc_zeros::<half::f16>(0)?, dev),
        DType::BF16 => wrap(dev.alloc_zeros::<half::bf16>(0)?, dev),
        other => bail!("imprint CUDA kernels take f32, f16 or bf16, not {other:?}"),
    })
}

/// Calls `$body` with `$T` bound to the Rust element type of `$dtype`, and `$get` a function that
/// takes the matching slice out of a storage.
macro_rules! by_dtype {
    ($dtype:expr, |$T:ident, $get:ident| $body:block) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                fn $get(s: &CudaStorage) -> Result<&CudaSlice<f32>> {
                    match &s.slice {
                        CudaStorageSlice::F32(v) => Ok(v),
                        _ => bail!("dtype mismatch between the inputs of a CUDA kernel"),
                    }
                }
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                fn $get(s: &CudaStorage) -> Result<&CudaSlice<half::f16>> {
                    match &s.slice {
                        CudaStorageSlice::F16(v) => Ok(v),
                        _ => bail!("dtype mismatch between the inputs of a CUDA kernel"),
                    }
                }
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                fn $get(s: &CudaStorage) -> Result<&CudaSlice<half::bf16>> {
                    match &s.slice {
                        CudaStorageSlice::BF16(v) => Ok(v),
                        _ => bail!("dtype mismatch between the inputs of a CUDA kernel"),
                    }
                }
                $body
            }
            other => bail!("imprint CUDA kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

/// Layer or group norm of rows of `row_len` values (see `norm_fwd` in kernels.cu for the layout),
/// optionally followed by SiLU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    row_len: usize,
    groups: usize,
    spatial: usize,
    eps: f64,
    silu: bool,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let n = x.1.shape().elem_count();
    if n == 0 {
        return empty(&dev, x.0.dtype());
    }
    let rows = n / row_len.max(1);
    let name = format!("imprint_norm_fwd_{}", suffix(x.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(row_len), 1, 1),
        shared_mem_bytes: 0,
    };
    let (row_len, groups, spatial) = (row_len as i32, groups as i32, spatial as i32);
    let (eps, silu) = (eps as f32, silu as i32);
    by_dtype!(x.0.dtype(), |T, get| {
        let (xs, ws, bs) = (get(x.0)?, get(w.0)?, get(b.0)?);
        let (xv, wv, bv) = (
            view(xs, x.1, "norm")?,
            view(ws, w.1, "norm")?,
            view(bs, b.1, "norm")?,
        );
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let mut args = func.builder();
        args.arg(&xv).arg(&wv).arg(&bv).arg(&y);
        args.arg(&row_len)
            .arg(&groups)
            .arg(&spatial)
            .arg(&eps)
            .arg(&silu);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(cfg) }.w()?;
        Ok(wrap(y, &dev))
    })
}

/// Softmax over the last dimension (`cols` values per row).
pub(crate) fn softmax_fwd(x: (&CudaStorage, &Layout), cols: usize) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let n = x.1.shape().elem_count();
    if n == 0 {
        return empty(&dev, x.0.dtype());
    }
    let name = format!("imprint_softmax_fwd_{}", suffix(x.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: ((n / cols.max(1)) as u32, 1, 1),
        block_dim: (row_threads(cols), 1, 1),
        shared_mem_bytes: 0,
    };
    let cols = cols as i32;
    by_dtype!(x.0.dtype(), |T, get| {
        let xv = view(get(x.0)?, x.1, "softmax")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let mut args = func.builder();
        args.arg(&xv).arg(&y).arg(&cols);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(cfg) }.w()?;
        Ok(wrap(y, &dev))
    })
}

/// GEGLU forward: `h [rows, 2·inner]` to `[rows, inner]`.
pub(crate) fn geglu_fwd(h: (&CudaStorage, &Layout), inner: usize) -> Result<CudaStorage> {
    let dev = h.0.device().clone();
    let n = h.1.shape().elem_count() / 2;
    if n == 0 {
        return empty(&dev, h.0.dtype());
    }
    let name = format!("imprint_geglu_fwd_{}", suffix(h.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (n64, inner) = (n as i64, inner as i32);
    by_dtype!(h.0.dtype(), |T, get| {
        let hv = view(get(h.0)?, h.1, "geglu")?;
        // SAFETY: every element is written by the kernel.
        let y = unsafe { dev.alloc::<T>(n)? };
        let mut args = func.builder();
        args.arg(&hv).arg(&y).arg(&n64).arg(&inner);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(elementwise(n)) }.w()?;
        Ok(wrap(y, &dev))
    })
}

/// GEGLU backward: `∂h [rows, 2·inner]` from `h` and the output gradient `g [rows, inner]`.
pub(crate) fn geglu_bwd(
    h: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    inner: usize,
) -> Result<CudaStorage> {
    let dev = h.0.device().clone();
    let n = g.1.shape().elem_count();
    if n == 0 {
        return empty(&dev, h.0.dtype());
    }
    let name = format!("imprint_geglu_bwd_{}", suffix(h.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (n64, inner) = (n as i64, inner as i32);
    by_dtype!(h.0.dtype(), |T, get| {
        let hv = view(get(h.0)?, h.1, "geglu backward")?;
        let gv = view(get(g.0)?, g.1, "geglu backward")?;
        // SAFETY: every element is written by the kernel.
        let dh = unsafe { dev.alloc::<T>(2 * n)? };
        let mut args = func.builder();
        args.arg(&hv).arg(&gv).arg(&dh).arg(&n64).arg(&inner);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(elementwise(n)) }.w()?;
        Ok(wrap(dh, &dev))
    })
}

/// The sizes of one convolution, as `imprint_im2col_*` and `imprint_col2im_*` take them.
pub(crate) struct ConvSizes {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub h_out: usize,
    pub w_out: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

/// im2col of images `[B, C, H, W]` into `[B, C·k·k, Ho·Wo]` or, with `adjoint`, col2im: columns
/// `[B, C·k·k, Ho·Wo]` summed back onto `[B, C, H, W]` (each pixel gathers its own terms: no
/// atomics, and the sum is in f32 whatever the dtype).
pub(crate) fn im2col(
    g: &ConvSizes,
    src: (&CudaStorage, &Layout),
    adjoint: bool,
) -> Result<CudaStorage> {
    let dev = src.0.device().clone();
    let batch = src.1.dims()[0];
    let (image, cols) = (
        batch * g.c_in * g.h * g.w,
        batch * g.c_in * g.k * g.k * g.h_out * g.w_out,
    );
    let (n, expected) = if adjoint {
        (image, cols)
    } else {
        (cols, image)
    };
    if src.1.shape().elem_count() != expected {
        bail!(
            "im2col: input {:?} does not fit the convolution's sizes",
            src.1.dims()
        )
    }
    if n == 0 {
        return empty(&dev, src.0.dtype());
    }
    let kernel = if adjoint { "col2im" } else { "im2col" };
    let name = format!("imprint_{kernel}_{}", suffix(src.0.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let n64 = n as i64;
    let sizes = [g.c_in, g.h, g.w, g.h_out, g.w_out, g.k, g.stride, g.padding].map(|v| v as i32);
    by_dtype!(src.0.dtype(), |T, get| {
        let sv = view(get(src.0)?, src.1, kernel)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut args = func.builder();
        args.arg(&sv).arg(&out).arg(&n64);
        for s in &sizes {
            args.arg(s);
        }
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(elementwise(n)) }.w()?;
        Ok(wrap(out, &dev))
    })
}

/// Query rows per block and keys per tile of the fused attention kernels, and their threads per
/// block (`FA_TILE`, `FA_THREADS` in flash_attention.cu).
const FLASH_TILE: usize = 32;
const FLASH_THREADS: u32 = 64;
/// The fused attention's PTX per head-dim class N (head dims up to 16·N), one file per class of
/// build.rs's `FLASH_CLASSES`.
const FLASH_PTX: [&str; 8] = [
    include_str!(concat!(env!("OUT_DIR"), "/flash_1.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_2.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_3.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_4.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_5.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_6.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_7.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/flash_8.ptx")),
];
pub(crate) const FLASH_MAX_HEAD_DIM: usize = 16 * FLASH_PTX.len();
/// The compute capability the PTX targets (build.rs): bf16 tensor-core fragments need 8.0.
pub(crate) const FLASH_ARCH_OK: bool = {
    let cap = env!("IMPRINT_CUDA_COMPUTE_CAP").as_bytes();
    (!cap.is_empty() && cap[0] >= b'8') || cap.len() > 2
};

/// Which fused attention kernel, for its shared memory.
#[derive(Clone, Copy)]
enum Flash {
    Forward,
    BackwardDq,
    BackwardDkv,
}

impl Flash {
    fn name(self) -> &'static str {
        match self {
            Flash::Forward => "fwd",
            Flash::BackwardDq => "bwd_dq",
            Flash::BackwardDkv => "bwd_dkv",
        }
    }
    /// Dynamic shared memory in bytes for head dim `d` of 2-byte elements (`fwd_smem`,
    /// `dq_smem`, `dkv_smem`; d padded to its class's 16·N columns): at most 44 KiB at
    /// d = 128, inside the 48 KiB a launch gets without opting in.
    fn shared_bytes(self, d: usize) -> u32 {
        let (dp, e, warp_scores) = (d.div_ceil(16) * 16, 2, 2 * 16 * FLASH_TILE);
        (match self {
            Flash::Forward => 3 * FLASH_TILE * dp * e + warp_scores * (4 + e),
            Flash::BackwardDq => 4 * FLASH_TILE * dp * e + warp_scores * (8 + e),
            Flash::BackwardDkv => 4 * FLASH_TILE * dp * e + warp_scores * (8 + 2 * e),
        }) as u32
    }
    /// One block per `FLASH_TILE` rows (queries, or keys for dK/dV) of each batch·head.
    fn config(self, rows: usize, batch: usize, d: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(FLASH_TILE) as u32, batch as u32, 1),
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: self.shared_bytes(d),
        }
    }
    /// The kernel's name for `dtype`, and its module and PTX for head dim `d`
    /// (`CudaFunc`, what loading returns, is not nameable outside candle).
    fn locate(self, dtype: DType, d: usize) -> Result<(String, String, &'static str)> {
        let s = match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("fused attention takes f16 or bf16, not {other:?}"),
        };
        let class = d.div_ceil(16).max(1);
        let Some(ptx) = FLASH_PTX.get(class - 1) else {
            bail!("fused attention: head dim {d} > {FLASH_MAX_HEAD_DIM}")
        };
        Ok((
            format!("imprint_flash_{}_{s}", self.name()),
            format!("imprint_flash_{class}"),
            ptx,
        ))
    }
}

/// Sizes of one fused attention call: batch·heads, query rows, key rows, head dim.
pub(crate) struct FlashSizes {
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
}

impl FlashSizes {
    /// `q [B, Sq, d]`, `k` and `v [B, Sk, d]`, all non-empty, `d ≤ FLASH_MAX_HEAD_DIM`.
    pub(crate) fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        let (b, sq, d) = q.shape().dims3()?;
        let (bk, sk, dk) = k.shape().dims3()?;
        if k.dims() != v.dims() || bk != b || dk != d || d > FLASH_MAX_HEAD_DIM || sq * sk * d == 0
        {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit (non-empty, one head dim ≤ {FLASH_MAX_HEAD_DIM})",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        Ok(Self {
            batch: b,
            sq,
            sk,
            d,
        })
    }
    fn ints(&self) -> [i32; 3] {
        [self.sq as i32, self.sk as i32, self.d as i32]
    }
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(v) => view(v, l, what),
        _ => bail!("{what}: expected f32"),
    }
}

/// Fused attention forward: the output `[B, Sq, d]` and each query row's log-sum-exp of the
/// scaled scores `[B, Sq]` (f32), which the backward kernels take.
pub(crate) fn flash_fwd(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = q.0.device().clone();
    let z = FlashSizes::of(q.1, k.1, v.1)?;
    let (name, module, ptx) = Flash::Forward.locate(q.0.dtype(), z.d)?;
    let func = dev.get_or_load_custom_func(&name, &module, ptx)?;
    let cfg = Flash::Forward.config(z.sq, z.batch, z.d);
    let [sq, sk, d] = z.ints();
    by_dtype!(q.0.dtype(), |T, get| {
        let (qv, kv, vv) = (
            view(get(q.0)?, q.1, "attention q")?,
            view(get(k.0)?, k.1, "attention k")?,
            view(get(v.0)?, v.1, "attention v")?,
        );
        // SAFETY: every element is written by the kernel.
        let o = unsafe { dev.alloc::<T>(z.batch * z.sq * z.d)? };
        let lse = unsafe { dev.alloc::<f32>(z.batch * z.sq)? };
        let mut args = func.builder();
        args.arg(&qv).arg(&kv).arg(&vv).arg(&o).arg(&lse);
        args.arg(&sq).arg(&sk).arg(&d).arg(&scale);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(cfg) }.w()?;
        Ok((wrap(o, &dev), lse))
    })
}

/// Fused attention backward. `go` is the output gradient, `lse` the forward's log-sum-exp and
/// `delta` = rowsum(dO ⊙ O) `[B, Sq]` (f32). Returns `dq [B, Sq, d]`, or with `keys` the
/// gradients of keys and values stacked `[2, B, Sk, d]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flash_bwd(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    go: (&CudaStorage, &Layout),
    lse: &CudaSlice<f32>,
    delta: (&CudaStorage, &Layout),
    scale: f32,
    keys: bool,
) -> Result<CudaStorage> {
    let dev = q.0.device().clone();
    let z = FlashSizes::of(q.1, k.1, v.1)?;
    if go.1.dims() != q.1.dims() || delta.1.shape().elem_count() != z.batch * z.sq {
        bail!(
            "fused attention backward: gradient {:?} / row sums {:?} do not fit q {:?}",
            go.1.dims(),
            delta.1.dims(),
            q.1.dims()
        )
    }
    let kernel = if keys {
        Flash::BackwardDkv
    } else {
        Flash::BackwardDq
    };
    let (name, module, ptx) = kernel.locate(q.0.dtype(), z.d)?;
    let func = dev.get_or_load_custom_func(&name, &module, ptx)?;
    let cfg = kernel.config(if keys { z.sk } else { z.sq }, z.batch, z.d);
    let [sq, sk, d] = z.ints();
    let batch = z.batch as i32;
    by_dtype!(q.0.dtype(), |T, get| {
        let (qv, kv, vv, gv) = (
            view(get(q.0)?, q.1, "attention q")?,
            view(get(k.0)?, k.1, "attention k")?,
            view(get(v.0)?, v.1, "attention v")?,
            view(get(go.0)?, go.1, "attention output gradient")?,
        );
        let dv = f32_view(delta.0, delta.1, "attention row sums")?;
        let n = if keys {
            2 * z.batch * z.sk
        } else {
            z.batch * z.sq
        } * z.d;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let mut args = func.builder();
        args.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&gv)
            .arg(lse)
            .arg(&dv)
            .arg(&out);
        if keys {
            args.arg(&batch);
        }
        args.arg(&sq).arg(&sk).arg(&d).arg(&scale);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { args.launch(cfg) }.w()?;
        Ok(wrap(out, &dev))
    })
}
