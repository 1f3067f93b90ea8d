//! Scaled dot-product attention: a tiled (flash-attention style) CPU kernel with its own backward,
//! a query-chunked form with its own backward for GPUs (the score matrix exists one chunk at a
//! time, through the device's matrix products), and the plain composed form for masks.

use crate::fastmath::FastExp;
use crate::gemm::{matmul, MatRef, Scalar};
use crate::softmax::softmax_last_dim;
use crate::storage::{cpu_slice, into_tensor, same_float, with_cpu_slices, Precomputed};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use std::sync::Mutex;

/// `softmax(q kᵀ · scale + mask) v` for `q [B, Sq, d]`, `k, v [B, Sk, d]` (heads folded into B).
///
/// Without a mask, on the CPU in f32/f64, this runs [`FlashAttention`]: the score matrix exists
/// only one `[TILE_Q, TILE_K]` tile at a time, in the forward and in the backward pass. On CUDA
/// in f16/bf16 with a head dim of at most 128 it runs the fused tensor-core kernels of
/// `src/cuda/flash_attention.cu`; elsewhere off the CPU, [`chunked_attention`]. Otherwise
/// scores and softmax are computed in full, in f32 for half-precision inputs (diffusers'
/// `upcast_softmax`; `upcast_attention` also upcasts the product, which is the same thing here).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype_ok = matches!(q.dtype(), DType::F32 | DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    #[cfg(feature = "cuda")]
    if mask.is_none() && fused::applies(q, k, v) {
        return fused::attention(q, k, v, scale);
    }
    if mask.is_none() && !q.device().is_cpu() && q.rank() == 3 {
        return chunked_attention(q, k, v, scale, CHUNK_SCORE_BYTES);
    }
    if mask.is_none() && q.device().is_cpu() && dtype_ok && q.rank() == 3 {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            FlashAttention {
                scale,
                logsumexp: Mutex::new(None),
            },
        );
    }
    composed_attention(q, k, v, scale, mask)
}

/// The reference form: full scores, the differentiable softmax, and candle's matmul backward.
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let (q, k) = match in_dtype {
        DType::F16 | DType::BF16 => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?),
        _ => (q.clone(), k.clone()),
    };
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // An additive mask (0 / -inf), e.g. CLIP's causal mask; the mask itself is a constant.
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?.detach())?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// The most bytes one chunk's f32 score matrix takes in [`chunked_attention`] (its probabilities
/// take as much again): at SD 1.5's 512 px self-attention (8 heads, 4096 × 4096) this is two
/// chunks per layer, where the composed form keeps a full 512 MiB score matrix per layer alive
/// for the backward pass.
const CHUNK_SCORE_BYTES: usize = 256 << 20;

/// Attention a chunk of query rows at a time, forward and backward: the algorithm of
/// FlashAttention-2 (Dao, arXiv:2307.08691) at the granularity of the device's matrix products.
/// The forward keeps only the output and each row's log-sum-exp; the backward recomputes each
/// chunk's probabilities from them: with `P = exp(S − lse)`, `dV = Σ Pᵀ dO`, `dP = dO Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = dS K · scale`, `dK = Σ dSᵀ Q · scale`.
/// Scores, softmax and the backward's products run in f32 whatever the input dtype (diffusers'
/// `upcast_softmax`). `chunk_bytes` bounds one chunk's score matrix; [`scaled_dot_product_attention`]
/// takes this path off the CPU with 256 MiB.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (b, sq, d) = q.dims3()?;
    let (bk, sk, dk) = k.dims3()?;
    let (bv, skv, dv) = v.dims3()?;
    if bk != b || bv != b || dk != d || skv != sk {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let chunk = (chunk_bytes / (4 * b * sk).max(1)).clamp(1, sq.max(1));
    let cdt = compute_dtype(q);
    let (q32, k32, v32) = (
        q.detach().to_dtype(cdt)?,
        k.detach().to_dtype(cdt)?,
        v.detach().to_dtype(cdt)?,
    );
    let kt = k32.t()?;
    let mut outs = Vec::with_capacity(sq.div_ceil(chunk));
    let mut lses = Vec::with_capacity(outs.capacity());
    for start in (0..sq).step_by(chunk) {
        let rows = chunk.min(sq - start);
        let s = (q32.narrow(1, start, rows)?.matmul(&kt)? * scale)?;
        let m = s.max_keepdim(2)?;
        let p = s.broadcast_sub(&m)?.exp()?;
        let l = p.sum_keepdim(2)?;
        outs.push(p.matmul(&v32)?.broadcast_div(&l)?);
        lses.push((m + l.log()?)?);
    }
    let out = Tensor::cat(&outs, 1)?.to_dtype(v.dtype())?;
    debug_assert_eq!(out.dims(), &[b, sq, dv]);
    q.apply_op3(
        k,
        v,
        ChunkedAttention {
            scale,
            chunk,
            value: Precomputed::new("attention", out),
            logsumexp: Tensor::cat(&lses, 1)?,
        },
    )
}

/// f32, or f64 for f64 inputs (the finite-difference tests).
fn compute_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

struct ChunkedAttention {
    scale: f64,
    chunk: usize,
    /// The output, computed before the op is applied, handed over by its forward.
    value: Precomputed,
    /// `[B, Sq, 1]`, in the compute dtype.
    logsumexp: Tensor,
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }
    crate::storage::hand_over_fwd3!(value);
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let cdt = compute_dtype(q);
        let f32 = |t: &Tensor| t.detach().to_dtype(cdt);
        let (q32, k32, v32, o32, g32) = (f32(q)?, f32(k)?, f32(v)?, f32(out)?, f32(grad)?);
        let sq = q32.dim(1)?;
        let kt = k32.t()?;
        let vt = v32.t()?;
        // rowsum(dO ⊙ O), the softmax backward's correction, for all rows at once: [B, Sq, 1].
        let delta = (&g32 * &o32)?.sum_keepdim(2)?;
        let mut dq = Vec::with_capacity(sq.div_ceil(self.chunk));
        let mut dk: Option<Tensor> = None;
        let mut dv: Option<Tensor> = None;
        let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        };
        for start in (0..sq).step_by(self.chunk) {
            let rows = self.chunk.min(sq - start);
            let qc = q32.narrow(1, start, rows)?;
            let gc = g32.narrow(1, start, rows)?;
            let s = (qc.matmul(&kt)? * self.scale)?;
            let p = s
                .broadcast_sub(&self.logsumexp.narrow(1, start, rows)?)?
                .exp()?;
            if v.track_op() {
                dv = add(dv, p.t()?.matmul(&gc)?)?;
            }
            let dp = gc.matmul(&vt)?;
            let ds = (p * dp.broadcast_sub(&delta.narrow(1, start, rows)?)?)?;
            if q.track_op() {
                dq.push((ds.matmul(&k32)? * self.scale)?);
            }
            if k.track_op() {
                dk = add(dk, (ds.t()?.matmul(&qc)? * self.scale)?)?;
            }
        }
        let back =
            |t: Option<Tensor>, like: &Tensor| t.map(|t| t.to_dtype(like.dtype())).transpose();
        let dq = if dq.is_empty() {
            None
        } else {
            Some(Tensor::cat(&dq, 1)?)
        };
        Ok((back(dq, q)?, back(dk, k)?, back(dv, v)?))
    }
}

/// Query rows and key columns per score tile: 64 × 256 f32 is 64 KiB, well inside L2.
const TILE_Q: usize = 64;
const TILE_K: usize = 256;

/// Attention computed tile by tile with an online softmax (Dao et al., FlashAttention-2,
/// arXiv:2307.08691, algorithms 1 and 2). The forward keeps only the per-row log-sum-exp of the
/// scores; the backward recomputes each score tile from it.
struct FlashAttention {
    scale: f64,
    /// `[B, Sq]` log-sum-exp of the scaled scores, written by the forward for the backward.
    logsumexp: Mutex<Option<Vec<f64>>>,
}

/// Sizes of one call: `B` batch·heads, `Sq` queries, `Sk` keys, head dim `d`.
#[derive(Clone, Copy)]
struct Dims {
    sq: usize,
    sk: usize,
    d: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<(usize, Self)> {
        let (&[b, sq, d], &[bk, sk, dk], &[bv, skv, dv]) = (q, k, v) else {
            bail!("attention: expected q, k, v of rank 3, got {q:?}, {k:?}, {v:?}")
        };
        if b != bk || b != bv || sk != skv || d != dk || d != dv {
            bail!("attention: q {q:?}, k {k:?}, v {v:?} do not fit together")
        }
        Ok((b, Self { sq, sk, d }))
    }
}

/// One head's forward: writes `out [Sq, d]` and `lse [Sq]`.
fn flash_forward_head<T: Scalar + Float + FastExp>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: Dims,
    scale: T,
    out: &mut [T],
    lse: &mut [f64],
) {
    let Dims { sq, sk, d } = dims;
    let mut scores = vec![T::ZERO; TILE_Q * TILE_K];
    let mut row_max = [T::ZERO; TILE_Q];
    let mut row_sum = [T::ZERO; TILE_Q];
    for q0 in (0..sq).step_by(TILE_Q) {
        let tq = TILE_Q.min(sq - q0);
        let q_tile = MatRef::row_major(&q[q0 * d..(q0 + tq) * d], tq, d);
        let acc = &mut out[q0 * d..(q0 + tq) * d];
        acc.fill(T::ZERO);
        row_max[..tq].fill(T::neg_infinity());
        row_sum[..tq].fill(T::ZERO);
        for k0 in (0..sk).step_by(TILE_K) {
            let tk = TILE_K.min(sk - k0);
            let s = &mut scores[..tq * tk];
            let k_tile = MatRef::row_major(&k[k0 * d..(k0 + tk) * d], tk, d);
            matmul(s, false, q_tile, k_tile.t());
            for r in 0..tq {
                let row = &mut s[r * tk..(r + 1) * tk];
                // Separate passes, so the scaling and exponentials vectorize.
                row.iter_mut().for_each(|x| *x = *x * scale);
                let m = row.iter().fold(row_max[r], |m, &x| m.max(x));
                // Rescale what was accumulated under the old maximum.
                let correction = (row_max[r] - m).fast_exp();
                row.iter_mut().for_each(|x| *x = (*x - m).fast_exp());
                let sum = row.iter().fold(T::ZERO, |s, &x| s + x);
                row_sum[r] = row_sum[r] * correction + sum;
                row_max[r] = m;
                for a in &mut acc[r * d..(r + 1) * d] {
                    *a = *a * correction;
                }
            }
            let v_tile = MatRef::row_major(&v[k0 * d..(k0 + tk) * d], tk, d);
            matmul(acc, true, MatRef::row_major(s, tq, tk), v_tile);
        }
        for r in 0..tq {
            let inv = T::ONE / row_sum[r];
            for a in &mut acc[r * d..(r + 1) * d] {
                *a = *a * inv;
            }
            lse[q0 + r] = (row_max[r] + row_sum[r].ln()).to_f64().unwrap_or(f64::NAN);
        }
    }
}

/// Everything one head's backward reads.
struct HeadBackward<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    out: &'a [T],
    grad: &'a [T],
    lse: &'a [f64],
}

/// One head's backward: accumulates `dq [Sq, d]`, `dk, dv [Sk, d]` (zeroed by the caller).
fn flash_backward_head<T: Scalar + Float + FastExp>(
    h: HeadBackward<T>,
    dims: Dims,
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let Dims { sq, sk, d } = dims;
    // D_i = rowsum(dO ∘ O): the softmax Jacobian's correction term per query row.
    let delta: Vec<T> = (0..sq)
        .map(|r| {
            let (g, o) = (&h.grad[r * d..(r + 1) * d], &h.out[r * d..(r + 1) * d]);
            g.iter().zip(o).fold(T::ZERO, |acc, (&a, &b)| acc + a * b)
        })
        .collect();
    let mut probs = vec![T::ZERO; TILE_Q * TILE_K];
    let mut dscores = vec![T::ZERO; TILE_Q * TILE_K];
    for q0 in (0..sq).step_by(TILE_Q) {
        let tq = TILE_Q.min(sq - q0);
        let q_tile = MatRef::row_major(&h.q[q0 * d..(q0 + tq) * d], tq, d);
        let g_tile = MatRef::row_major(&h.grad[q0 * d..(q0 + tq) * d], tq, d);
        for k0 in (0..sk).step_by(TILE_K) {
            let tk = TILE_K.min(sk - k0);
            let k_tile = MatRef::row_major(&h.k[k0 * d..(k0 + tk) * d], tk, d);
            let v_tile = MatRef::row_major(&h.v[k0 * d..(k0 + tk) * d], tk, d);
            let p = &mut probs[..tq * tk];
            matmul(p, false, q_tile, k_tile.t());
            for r in 0..tq {
                let l = T::from(h.lse[q0 + r]).unwrap_or(T::nan());
                for x in &mut p[r * tk..(r + 1) * tk] {
                    *x = (*x * scale - l).fast_exp();
                }
            }
            let p_mat = MatRef::row_major(&*p, tq, tk);
            // dV_j += Pᵀ dO_i
            matmul(&mut dv[k0 * d..(k0 + tk) * d], true, p_mat.t(), g_tile);
            // dS = P ∘ (dO_i V_jᵀ − D_i) · scale
            let ds = &mut dscores[..tq * tk];
            matmul(ds, false, g_tile, v_tile.t());
            for r in 0..tq {
                let dr = delta[q0 + r];
                for (x, &pv) in ds[r * tk..(r + 1) * tk]
                    .iter_mut()
                    .zip(&p[r * tk..(r + 1) * tk])
                {
                    *x = pv * (*x - dr) * scale;
                }
            }
            let ds_mat = MatRef::row_major(&*ds, tq, tk);
            // dQ_i += dS K_j ; dK_j += dSᵀ Q_i
            matmul(&mut dq[q0 * d..(q0 + tq) * d], true, ds_mat, k_tile);
            matmul(&mut dk[k0 * d..(k0 + tk) * d], true, ds_mat.t(), q_tile);
        }
    }
}

impl FlashAttention {
    fn forward<T: Scalar + Float + FastExp>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        dims: Dims,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let Dims { sq, sk, d } = dims;
        let scale = T::from(self.scale).unwrap_or(T::nan());
        let mut out = vec![T::ZERO; b * sq * d];
        let mut lse = vec![0f64; b * sq];
        out.par_chunks_mut(sq * d)
            .zip(lse.par_chunks_mut(sq))
            .enumerate()
            .for_each(|(bi, (o, l))| {
                flash_forward_head(
                    &q[bi * sq * d..(bi + 1) * sq * d],
                    &k[bi * sk * d..(bi + 1) * sk * d],
                    &v[bi * sk * d..(bi + 1) * sk * d],
                    dims,
                    scale,
                    o,
                    l,
                )
            });
        if let Ok(mut slot) = self.logsumexp.lock() {
            *slot = Some(lse);
        }
        out
    }

    /// `[dq | dk | dv]` in one buffer.
    fn backward<T: Scalar + Float + FastExp>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        out: &[T],
        grad: &[T],
        lse: &[f64],
        b: usize,
        dims: Dims,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let Dims { sq, sk, d } = dims;
        let scale = T::from(self.scale).unwrap_or(T::nan());
        let mut dq = vec![T::ZERO; b * sq * d];
        let mut dk = vec![T::ZERO; b * sk * d];
        let mut dv = vec![T::ZERO; b * sk * d];
        dq.par_chunks_mut(sq * d)
            .zip(dk.par_chunks_mut(sk * d))
            .zip(dv.par_chunks_mut(sk * d))
            .enumerate()
            .for_each(|(bi, ((dq, dk), dv))| {
                let (qs, ks) = (
                    bi * sq * d..(bi + 1) * sq * d,
                    bi * sk * d..(bi + 1) * sk * d,
                );
                let head = HeadBackward {
                    q: &q[qs.clone()],
                    k: &k[ks.clone()],
                    v: &v[ks],
                    out: &out[qs.clone()],
                    grad: &grad[qs],
                    lse: &lse[bi * sq..(bi + 1) * sq],
                };
                flash_backward_head(head, dims, scale, dq, dk, dv)
            });
        dq.extend_from_slice(&dk);
        dq.extend_from_slice(&dv);
        dq
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, dims) = Dims::new(l1.dims(), l2.dims(), l3.dims())?;
        let shape = Shape::from(l1.dims());
        let out = same_float!(
            "attention",
            (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?),
            (q, k, v) => self.forward(q, k, v, b, dims)
        );
        Ok((out, shape))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.logsumexp.lock().ok().and_then(|l| l.clone()) else {
            bail!("attention backward: the forward's log-sum-exp is missing")
        };
        let (b, dims) = Dims::new(q.dims(), k.dims(), v.dims())?;
        let grad = grad.contiguous()?;
        let (dev, (sq, sk, d)) = (q.device().clone(), (dims.sq, dims.sk, dims.d));
        let n = b * (sq + 2 * sk) * d;
        let all = with_cpu_slices(&[q, k, v, res, &grad], |s| {
            Ok(same_float!(
                "attention backward",
                (s[0], s[1], s[2], s[3], s[4]),
                (q, k, v, o, g) => self.backward((q, k, v), o, g, &lse, b, dims)
            ))
        })?;
        let all = into_tensor(all, n, &dev)?;
        let part = |start: usize, rows: usize, tracked: bool| -> Result<Option<Tensor>> {
            if !tracked {
                return Ok(None);
            }
            Ok(Some(
                all.narrow(0, start, b * rows * d)?.reshape((b, rows, d))?,
            ))
        };
        Ok((
            part(0, sq, q.track_op())?,
            part(b * sq * d, sk, k.track_op())?,
            part(b * (sq + sk) * d, sk, v.track_op())?,
        ))
    }
}

/// Whether [`scaled_dot_product_attention`] (without a mask) runs the fused CUDA kernels on
/// these inputs.
#[cfg(feature = "cuda")]
pub use fused::applies as fused_attention_applies;

/// The fused CUDA attention (`src/cuda/flash_attention.cu`): FlashAttention-2's algorithm on
/// tensor cores for half-precision inputs; the score matrix never exists in device memory.
#[cfg(feature = "cuda")]
mod fused {
    use crate::cuda::{flash_bwd, flash_fwd, FlashSizes, FLASH_ARCH_OK, FLASH_MAX_HEAD_DIM};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape};
    use candle_core::{Storage, Tensor};
    use std::sync::{Arc, Mutex};

    /// Half-precision q, k, v `[B, Sq|Sk, d]` on CUDA, one head dim ≤ 128, nothing empty, at
    /// most 65 535 batch·heads (the grid's y dimension), kernels built for sm_80 or later.
    pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
        let half = matches!(q.dtype(), DType::F16 | DType::BF16)
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype();
        let fits = match (q.dims3(), k.dims3()) {
            (Ok((b, sq, d)), Ok((bk, sk, dk))) => {
                b == bk
                    && d == dk
                    && k.dims() == v.dims()
                    && d <= FLASH_MAX_HEAD_DIM
                    && b <= 65_535
                    && b * sq * sk * d > 0
            }
            _ => false,
        };
        FLASH_ARCH_OK && q.device().is_cuda() && half && fits
    }

    pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            Forward {
                scale,
                logsumexp: Mutex::new(None),
            },
        )
    }

    fn cuda<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("fused attention: {what} is not on the CUDA device"),
        }
    }

    /// `CustomOp3::cpu_fwd` of ops that exist only on CUDA ([`applies`] keeps them there).
    macro_rules! cuda_only {
        () => {
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                bail!("fused attention runs on CUDA only")
            }
        };
    }

    struct Forward {
        scale: f64,
        /// `[B, Sq]` f32 log-sum-exp of the scaled scores, written by the forward.
        logsumexp: Mutex<Option<Arc<CudaSlice<f32>>>>,
    }

    impl CustomOp3 for Forward {
        fn name(&self) -> &'static str {
            "fused-attention"
        }
        cuda_only!();
        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (o, lse) = flash_fwd((q, lq), (k, lk), (v, lv), self.scale as f32)?;
            match self.logsumexp.lock() {
                Ok(mut slot) => *slot = Some(Arc::new(lse)),
                Err(_) => bail!("fused attention: the log-sum-exp slot is poisoned"),
            }
            Ok((o, lq.shape().clone()))
        }
        /// dQ from one kernel over query tiles, dK and dV from one over key tiles (see
        /// flash_attention.cu), with Δ = rowsum(dO ⊙ O) computed here in f32.
        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            out: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let Some(lse) = self.logsumexp.lock().ok().and_then(|l| l.clone()) else {
                bail!("attention backward: the forward's log-sum-exp is missing")
            };
            let grad = grad.detach().contiguous()?;
            let delta = (grad.to_dtype(DType::F32)? * out.detach().to_dtype(DType::F32)?)?
                .sum(2)?
                .contiguous()?;
            let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
            let op = |keys: bool| Backward {
                scale: self.scale,
                grad: grad.clone(),
                delta: delta.clone(),
                logsumexp: lse.clone(),
                keys,
            };
            let dq = q
                .track_op()
                .then(|| qd.apply_op3(&kd, &vd, op(false)))
                .transpose()?;
            let (dk, dv) = if k.track_op() || v.track_op() {
                let both = qd.apply_op3(&kd, &vd, op(true))?;
                (
                    k.track_op().then(|| both.get(0)).transpose()?,
                    v.track_op().then(|| both.get(1)).transpose()?,
                )
            } else {
                (None, None)
            };
            Ok((dq, dk, dv))
        }
    }

    /// dQ (`keys` false, `[B, Sq, d]`) or dK and dV stacked (`[2, B, Sk, d]`) of [`Forward`].
    struct Backward {
        scale: f64,
        grad: Tensor,
        delta: Tensor,
        logsumexp: Arc<CudaSlice<f32>>,
        keys: bool,
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            "fused-attention-backward"
        }
        cuda_only!();
        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let z = FlashSizes::of(lq, lk, lv)?;
            let (gs, gl) = self.grad.storage_and_layout();
            let (ds, dl) = self.delta.storage_and_layout();
            let out = flash_bwd(
                (q, lq),
                (k, lk),
                (v, lv),
                (cuda(&gs, "the output gradient")?, gl),
                &self.logsumexp,
                (cuda(&ds, "the row sums")?, dl),
                self.scale as f32,
                self.keys,
            )?;
            let shape = if self.keys {
                Shape::from((2, z.batch, z.sk, z.d))
            } else {
                lq.shape().clone()
            };
            Ok((out, shape))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check_grads, rand_tensor};
    use candle_core::Device;

    /// Both forms (composed, tiled) against finite differences on every element.
    #[test]
    fn attention_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let q = rand_tensor(&[2, 3, 4], 1, &dev)?;
        let k = rand_tensor(&[2, 5, 4], 2, &dev)?;
        let v = rand_tensor(&[2, 5, 4], 3, &dev)?;
        let tiled = |t: &[Tensor]| scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.5, None);
        let composed = |t: &[Tensor]| composed_attention(&t[0], &t[1], &t[2], 0.5, None);
        check_grads(&[q.clone(), k.clone(), v.clone()], tiled, 1e-6)?;
        check_grads(&[q, k, v], composed, 1e-6)
    }

    /// The query-chunked form (the GPU path), with chunks of 3 rows over 7 (a ragged last chunk),
    /// against finite differences, and against the composed form in f32.
    #[test]
    fn chunked_attention_gradients_and_values() -> Result<()> {
        let dev = Device::Cpu;
        let q = rand_tensor(&[2, 7, 4], 1, &dev)?;
        let k = rand_tensor(&[2, 5, 4], 2, &dev)?;
        let v = rand_tensor(&[2, 5, 3], 3, &dev)?;
        let bytes = 3 * 4 * 2 * 5; // three rows of f32 scores per chunk
        let chunked = |t: &[Tensor]| chunked_attention(&t[0], &t[1], &t[2], 0.5, bytes);
        check_grads(&[q.clone(), k.clone(), v.clone()], chunked, 1e-6)?;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let got = chunked_attention(&f(&q)?, &f(&k)?, &f(&v)?, 0.5, bytes)?;
        let expect = composed_attention(&q, &k, &v, 0.5, None)?;
        let diff = (got.to_dtype(DType::F64)? - &expect)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// Sizes that cross several query and key tiles with ragged last tiles.
    fn tiled_case(dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let (sq, sk) = (TILE_Q + 7, 2 * TILE_K + 5);
        Ok((
            rand_tensor(&[2, sq, 5], 1, dev)?,
            rand_tensor(&[2, sk, 5], 2, dev)?,
            rand_tensor(&[2, sk, 5], 3, dev)?,
        ))
    }

    #[test]
    fn flash_attention_matches_composed_in_f64_and_f32() -> Result<()> {
        let dev = Device::Cpu;
        let (q, k, v) = tiled_case(&dev)?;
        let expect = composed_attention(&q, &k, &v, 0.7, None)?;
        let got = scaled_dot_product_attention(&q, &k, &v, 0.7, None)?;
        let diff = (&got - &expect)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "f64: {diff}");
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let got = scaled_dot_product_attention(&f(&q)?, &f(&k)?, &f(&v)?, 0.7, None)?;
        let diff = (got.to_dtype(DType::F64)? - &expect)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-5, "f32: {diff}");
        Ok(())
    }

    /// Across several ragged tiles, the tiled backward equals the composed form's.
    #[test]
    fn flash_attention_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (q, k, v) = tiled_case(&dev)?;
        let r = rand_tensor(&[2, TILE_Q + 7, 5], 9, &dev)?;
        let grads =
            |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| -> Result<Vec<Tensor>> {
                let vars: Vec<_> = [&q, &k, &v]
                    .iter()
                    .map(|t| candle_core::Var::from_tensor(t))
                    .collect::<Result<_>>()?;
                let g = f(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                )?
                .mul(&r)?
                .sum_all()?
                .backward()?;
                vars.iter()
                    .map(|v| {
                        g.get(v)
                            .cloned()
                            .ok_or_else(|| candle_core::Error::Msg("no grad".into()))
                    })
                    .collect()
            };
        let flash = grads(&|q, k, v| scaled_dot_product_attention(q, k, v, 0.3, None))?;
        let plain = grads(&|q, k, v| composed_attention(q, k, v, 0.3, None))?;
        for (a, b) in flash.iter().zip(&plain) {
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "{diff}");
        }
        Ok(())
    }
}
