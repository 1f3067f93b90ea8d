// Fused scaled-dot-product attention for f16/bf16 inputs on tensor cores (WMMA 16×16×16 products,
// f32 accumulation): the score matrix never exists in global memory, forward or backward.
// Compiled by build.rs once per head-dim class FA_NF (1..8: the kernels for head dims up to
// 16·FA_NF, their accumulators FA_NF fragments wide) into its own PTX module, so a model JIT-
// compiles only the classes its heads use; launched by src/cuda.rs (`flash_fwd`, `flash_bwd`);
// tested against the CPU kernel by tests/cuda.rs.
//
// The algorithm is FlashAttention-2's (Dao, arXiv:2307.08691) with two simplifications that keep
// every accumulator in a WMMA fragment, whose element layout is opaque:
// - the forward takes two passes over the keys: the first finds each query row's log-sum-exp
//   `lse` (online max and sum), the second accumulates `O = Σ exp(S − lse) V` with the final
//   normaliser already known, so the output fragments are never rescaled;
// - the backward is two kernels instead of one with atomics: one per key tile for dK and dV
//   (FA2's algorithm 2), one per query tile for dQ; both recompute the scores from `lse`, and
//   the result is deterministic.
// Layout: q [B, Sq, d], k and v [B, Sk, d], contiguous, heads folded into B; d ≤ 16·FA_NF. Tiles
// are staged in shared memory padded to D = 16·FA_NF columns with zeros, so padded columns add
// nothing to any product; padded rows are masked out of every softmax. Tensor-core bf16
// fragments need sm_80: built for an older target the kernels trap, and src/cuda.rs never
// launches them there.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <mma.h>

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FA_ENABLED 1
#else
#define FA_ENABLED 0
#endif

#define FA_WARPS 2                    // warps per block
#define FA_THREADS (FA_WARPS * 32)
#define FA_TILE 32                    // query rows per block (16 per warp) and keys per tile
#ifndef FA_NF
#error "build.rs defines FA_NF, the head-dim class (1..8)"
#endif

#if FA_ENABLED
namespace fa {
using namespace nvcuda;

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

template <typename T>
using frag_a = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using frag_b_row = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using frag_b_col = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using frag_acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Rows [0, rows) of a [*, d] matrix into a [R, D] shared tile, zero outside the matrix. Eight
// elements (16 bytes) at a time when d and the source allow it (every SD head dim does).
template <typename T>
__device__ __forceinline__ void stage(const T* src, int rows, int d, T* dst, int R, int D) {
  if (d % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int dv = D / 8;
    uint4* out = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < R * dv; i += blockDim.x) {
      const int r = i / dv, c = (i - r * dv) * 8;
      out[i] = (r < rows && c < d)
                   ? *reinterpret_cast<const uint4*>(src + (int64_t)r * d + c)
                   : make_uint4(0, 0, 0, 0);
    }
    return;
  }
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    const int r = i / D, c = i - r * D;
    dst[i] = (r < rows && c < d) ? src[(int64_t)r * d + c] : from_f<T>(0.f);
  }
}

// out [16, FA_TILE] (f32, row-major, ld FA_TILE) = A [16, D] · Bᵀ for B [FA_TILE, D]: a warp's
// 16 rows against a tile's 32 rows, both row-major in shared memory with row length D.
template <typename T>
__device__ __forceinline__ void products_with_rows(const T* a, const T* b, int D, float* out) {
  frag_acc acc[FA_TILE / 16];
#pragma unroll
  for (int n = 0; n < FA_TILE / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (int kk = 0; kk < D; kk += 16) {
    frag_a<T> fa;
    wmma::load_matrix_sync(fa, a + kk, D);
#pragma unroll
    for (int n = 0; n < FA_TILE / 16; ++n) {
      // Bᵀ's 16 × 16 block (kk.., n·16..) read as a column-major matrix from B's rows.
      frag_b_col<T> fb;
      wmma::load_matrix_sync(fb, b + n * 16 * D + kk, D);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < FA_TILE / 16; ++n)
    wmma::store_matrix_sync(out + n * 16, acc[n], FA_TILE, wmma::mem_row_major);
}

// acc[j] += A [16, FA_TILE] · B [FA_TILE, D] for the 16-column blocks j < D/16: A row-major with
// ld FA_TILE, B row-major with row length D.
template <typename T, int NF>
__device__ __forceinline__ void accumulate_times_rows(frag_acc* acc, const T* a, const T* b) {
  constexpr int D = NF * 16;
#pragma unroll
  for (int kk = 0; kk < FA_TILE / 16; ++kk) {
    frag_a<T> fa;
    wmma::load_matrix_sync(fa, a + kk * 16, FA_TILE);
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      frag_b_row<T> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * D + j * 16, D);
      wmma::mma_sync(acc[j], fa, fb, acc[j]);
    }
  }
}

// Writes a warp's 16 × D accumulators, times `mul`, to rows [row0, row0+16) of dst [rows, d]
// (row stride `ld`), through `scratch` (16 × 16 f32).
template <typename T, int NF>
__device__ __forceinline__ void write_rows(frag_acc* acc, float mul, float* scratch, T* dst,
                                           int row0, int rows, int d, int64_t ld) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NF; ++j) {
    wmma::store_matrix_sync(scratch, acc[j], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = row0 + (e >> 4), c = j * 16 + (e & 15);
      if (r < rows && c < d) dst[(int64_t)r * ld + c] = from_f<T>(scratch[e] * mul);
    }
    __syncwarp();
  }
}

// Shared memory of the forward for head dim padded to D (bytes).
__host__ __device__ constexpr int fwd_smem(int D, int elem) {
  return 3 * FA_TILE * D * elem + FA_WARPS * 16 * FA_TILE * (4 + elem);
}

// One block: FA_TILE query rows of one batch·head. o [B, Sq, d], lse [B, Sq] (f32).
template <typename T, int NF>
__device__ __forceinline__ void forward(const T* q, const T* k, const T* v, T* o, float* lse, int sq, int sk,
                        int d, float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int D = NF * 16;
  const int64_t b = blockIdx.y;
  const int q0 = blockIdx.x * FA_TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + FA_TILE * D;
  T* vs = ks + FA_TILE * D;
  float* ss = reinterpret_cast<float*>(vs + FA_TILE * D) + warp * 16 * FA_TILE;
  T* ps = reinterpret_cast<T*>(reinterpret_cast<float*>(vs + FA_TILE * D) +
                               FA_WARPS * 16 * FA_TILE) +
          warp * 16 * FA_TILE;
  const T* qw = qs + warp * 16 * D;
  // Lane `row` (and lane row + 16) own query row `row` of the warp, each for half the columns.
  const int row = lane & 15, c0 = (lane >> 4) * 16;

  stage(q + (b * sq + q0) * d, min(FA_TILE, sq - q0), d, qs, FA_TILE, D);
  // Pass 1: the row's log-sum-exp of the scaled scores, online over key tiles.
  float m = -INFINITY, l = 0.f;
  for (int k0 = 0; k0 < sk; k0 += FA_TILE) {
    __syncthreads();  // the previous tile is read; for the first, the query tile is staged
    stage(k + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, ks, FA_TILE, D);
    __syncthreads();
    products_with_rows(qw, ks, D, ss);
    __syncwarp();
    const int valid = min(FA_TILE, sk - k0);
    float tmax = -INFINITY;
    for (int i = 0; i < 16; ++i) {
      const int c = c0 + ((i + row) & 15);
      if (c < valid) tmax = fmaxf(tmax, ss[row * FA_TILE + c] * scale);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 16));
    const float mnew = fmaxf(m, tmax);
    float s = 0.f;
    for (int i = 0; i < 16; ++i) {
      const int c = c0 + ((i + row) & 15);
      if (c < valid) s += __expf(ss[row * FA_TILE + c] * scale - mnew);
    }
    s += __shfl_xor_sync(0xffffffff, s, 16);
    l = l * __expf(m - mnew) + s;
    m = mnew;
    __syncwarp();
  }
  const float row_lse = m + __logf(l);
  // Pass 2: O = Σ exp(S − lse) V.
  frag_acc acc[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) wmma::fill_fragment(acc[j], 0.f);
  for (int k0 = 0; k0 < sk; k0 += FA_TILE) {
    __syncthreads();
    stage(k + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, ks, FA_TILE, D);
    stage(v + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, vs, FA_TILE, D);
    __syncthreads();
    products_with_rows(qw, ks, D, ss);
    __syncwarp();
    const int valid = min(FA_TILE, sk - k0);
    for (int i = 0; i < 16; ++i) {
      const int c = c0 + ((i + row) & 15);
      ps[row * FA_TILE + c] =
          from_f<T>(c < valid ? __expf(ss[row * FA_TILE + c] * scale - row_lse) : 0.f);
    }
    __syncwarp();
    accumulate_times_rows<T, NF>(acc, ps, vs);
  }
  const int r0 = q0 + warp * 16;
  write_rows<T, NF>(acc, 1.f, ss, o + b * sq * d, r0, sq, d, d);
  if (lane < 16 && r0 + row < sq) lse[b * sq + r0 + row] = row_lse;
}

// Shared memory of the dQ kernel (bytes).
__host__ __device__ constexpr int dq_smem(int D, int elem) {
  return 4 * FA_TILE * D * elem + FA_WARPS * 16 * FA_TILE * (8 + elem);
}

// dQ for FA_TILE query rows of one batch·head: dQ = scale · Σ dS K with
// dS = P ⊙ (dO Vᵀ − Δ), P = exp(scale · Q Kᵀ − lse), Δ = rowsum(dO ⊙ O) (given).
template <typename T, int NF>
__device__ __forceinline__ void backward_dq(const T* q, const T* k, const T* v, const T* go, const float* lse,
                            const float* delta, T* dq, int sq, int sk, int d, float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int D = NF * 16;
  const int64_t b = blockIdx.y;
  const int q0 = blockIdx.x * FA_TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* qs = reinterpret_cast<T*>(smem);
  T* gs = qs + FA_TILE * D;
  T* ks = gs + FA_TILE * D;
  T* vs = ks + FA_TILE * D;
  float* ss = reinterpret_cast<float*>(vs + FA_TILE * D) + warp * 16 * FA_TILE;
  float* dps = reinterpret_cast<float*>(vs + FA_TILE * D) + (FA_WARPS + warp) * 16 * FA_TILE;
  T* dss = reinterpret_cast<T*>(reinterpret_cast<float*>(vs + FA_TILE * D) +
                                2 * FA_WARPS * 16 * FA_TILE) +
           warp * 16 * FA_TILE;
  const int row = lane & 15, c0 = (lane >> 4) * 16;
  const int r0 = q0 + warp * 16;
  const bool row_ok = r0 + row < sq;
  const float row_lse = row_ok ? lse[b * sq + r0 + row] : 0.f;
  const float row_delta = row_ok ? delta[b * sq + r0 + row] : 0.f;

  stage(q + (b * sq + q0) * d, min(FA_TILE, sq - q0), d, qs, FA_TILE, D);
  stage(go + (b * sq + q0) * d, min(FA_TILE, sq - q0), d, gs, FA_TILE, D);
  frag_acc acc[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) wmma::fill_fragment(acc[j], 0.f);
  for (int k0 = 0; k0 < sk; k0 += FA_TILE) {
    __syncthreads();
    stage(k + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, ks, FA_TILE, D);
    stage(v + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, vs, FA_TILE, D);
    __syncthreads();
    products_with_rows(qs + warp * 16 * D, ks, D, ss);
    products_with_rows(gs + warp * 16 * D, vs, D, dps);
    __syncwarp();
    const int valid = min(FA_TILE, sk - k0);
    for (int i = 0; i < 16; ++i) {
      const int c = c0 + ((i + row) & 15);
      const int e = row * FA_TILE + c;
      const float p = (row_ok && c < valid) ? __expf(ss[e] * scale - row_lse) : 0.f;
      dss[e] = from_f<T>(p * (dps[e] - row_delta));
    }
    __syncwarp();
    accumulate_times_rows<T, NF>(acc, dss, ks);
  }
  write_rows<T, NF>(acc, scale, ss, dq + b * sq * d, r0, sq, d, d);
}

// Shared memory of the dK/dV kernel (bytes).
__host__ __device__ constexpr int dkv_smem(int D, int elem) {
  return 4 * FA_TILE * D * elem + FA_WARPS * 16 * FA_TILE * (8 + 2 * elem);
}

// dK and dV for FA_TILE keys of one batch·head (16 per warp), over every query tile:
// dV = Σ Pᵀ dO, dK = scale · Σ dSᵀ Q, computed in the transposed orientation (Sᵀ = K Qᵀ per warp) so
// every product reads row-major tiles. dkv [2, B, Sk, d]: dK then dV.
template <typename T, int NF>
__device__ __forceinline__ void backward_dkv(const T* q, const T* k, const T* v, const T* go, const float* lse,
                             const float* delta, T* dkv, int batch, int sq, int sk, int d,
                             float scale) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int D = NF * 16;
  const int64_t b = blockIdx.y;
  const int k0 = blockIdx.x * FA_TILE;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + FA_TILE * D;
  T* qs = vs + FA_TILE * D;
  T* gs = qs + FA_TILE * D;
  float* f32s = reinterpret_cast<float*>(gs + FA_TILE * D);
  float* sts = f32s + warp * 16 * FA_TILE;                 // Sᵀ: 16 keys × FA_TILE queries
  float* dpts = f32s + (FA_WARPS + warp) * 16 * FA_TILE;   // dPᵀ
  T* pts = reinterpret_cast<T*>(f32s + 2 * FA_WARPS * 16 * FA_TILE) + warp * 16 * FA_TILE;
  T* dsts = reinterpret_cast<T*>(f32s + 2 * FA_WARPS * 16 * FA_TILE) +
            (FA_WARPS + warp) * 16 * FA_TILE;

  stage(k + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, ks, FA_TILE, D);
  stage(v + (b * sk + k0) * d, min(FA_TILE, sk - k0), d, vs, FA_TILE, D);
  frag_acc dk[NF], dv[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) {
    wmma::fill_fragment(dk[j], 0.f);
    wmma::fill_fragment(dv[j], 0.f);
  }
  for (int q0 = 0; q0 < sq; q0 += FA_TILE) {
    __syncthreads();
    stage(q + (b * sq + q0) * d, min(FA_TILE, sq - q0), d, qs, FA_TILE, D);
    stage(go + (b * sq + q0) * d, min(FA_TILE, sq - q0), d, gs, FA_TILE, D);
    __syncthreads();
    products_with_rows(ks + warp * 16 * D, qs, D, sts);
    products_with_rows(vs + warp * 16 * D, gs, D, dpts);
    __syncwarp();
    // Lane = query column of the tile; each runs down the warp's 16 keys. Keys past Sk only
    // reach rows of dK/dV that are never written.
    const bool col_ok = q0 + lane < sq;
    const float col_lse = col_ok ? lse[b * sq + q0 + lane] : 0.f;
    const float col_delta = col_ok ? delta[b * sq + q0 + lane] : 0.f;
    for (int r = 0; r < 16; ++r) {
      const int e = r * FA_TILE + lane;
      const float p = col_ok ? __expf(sts[e] * scale - col_lse) : 0.f;
      pts[e] = from_f<T>(p);
      dsts[e] = from_f<T>(p * (dpts[e] - col_delta));
    }
    __syncwarp();
    accumulate_times_rows<T, NF>(dv, pts, gs);
    accumulate_times_rows<T, NF>(dk, dsts, qs);
  }
  const int r0 = k0 + warp * 16;
  write_rows<T, NF>(dk, scale, sts, dkv + b * sk * d, r0, sk, d, d);
  write_rows<T, NF>(dv, 1.f, sts, dkv + ((int64_t)batch + b) * sk * d, r0, sk, d, d);
}
}  // namespace fa
#endif

// Kernel bodies exist only where the tensor-core fragments do (FA_ENABLED).
#if FA_ENABLED
#define FA_BODY(call) call;
#else
#define FA_BODY(call) __trap();
#endif

#define INSTANTIATE_FLASH(T, S)                                                                   \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) imprint_flash_fwd_##S(                 \
      const T* q, const T* k, const T* v, T* o, float* lse, int sq, int sk, int d, float scale) {   \
    FA_BODY((fa::forward<T, FA_NF>(q, k, v, o, lse, sq, sk, d, scale)))                           \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) imprint_flash_bwd_dq_##S(              \
      const T* q, const T* k, const T* v, const T* go, const float* lse, const float* delta,      \
      T* dq, int sq, int sk, int d, float scale) {                                                \
    FA_BODY((fa::backward_dq<T, FA_NF>(q, k, v, go, lse, delta, dq, sq, sk, d, scale)))           \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(FA_THREADS) imprint_flash_bwd_dkv_##S(             \
      const T* q, const T* k, const T* v, const T* go, const float* lse, const float* delta,      \
      T* dkv, int batch, int sq, int sk, int d, float scale) {                                    \
    FA_BODY((fa::backward_dkv<T, FA_NF>(q, k, v, go, lse, delta, dkv, batch, sq, sk, d, scale)))  \
  }

INSTANTIATE_FLASH(__half, f16)
INSTANTIATE_FLASH(__nv_bfloat16, bf16)
