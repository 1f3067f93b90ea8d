// CUDA kernels of imprint-ops' custom ops (issue 9). Compiled to PTX by build.rs when the `cuda`
// feature is on, loaded through candle's CudaDevice::get_or_load_custom_func (src/cuda.rs).
//
// Every kernel reads f32, f16 or bf16 and computes in f32 (the CPU kernels compute in f32/f64;
// the device tests in tests/cuda.rs compare the two). Inputs are contiguous; offsets are applied
// by the caller.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ float block_max(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// Layer norm and group norm (optionally followed by SiLU), one block per row.
//   layer norm: a row is the last dimension; weight/bias index = position in the row
//               (spatial = 1, groups = 1, channels_per_group = row_len).
//   group norm: a row is one group of one sample, channels_per_group × spatial values in
//               channel-major order; weight/bias index = (row % groups) · cpg + position / spatial.
// Mean, then the variance of the centred values (two passes over the row, as the CPU kernel).
template <typename T>
__device__ void norm_fwd(const T* x, const T* w, const T* b, T* y, int row_len, int groups,
                         int spatial, float eps, int silu) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * (int64_t)row_len;
  T* yr = y + row * (int64_t)row_len;
  float s = 0.f;
  for (int i = threadIdx.x; i < row_len; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, scratch) / row_len;
  float q = 0.f;
  for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
    const float d = to_f(xr[i]) - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, scratch) / row_len + eps);
  const int c0 = (int)(row % groups) * (row_len / spatial);
  for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
    const int c = c0 + i / spatial;
    float v = (to_f(xr[i]) - mean) * rstd * to_f(w[c]) + to_f(b[c]);
    if (silu) v = v / (1.f + expf(-v));
    yr[i] = from_f<T>(v);
  }
}

// Softmax over rows of length `cols`, one block per row.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int cols) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * (int64_t)cols;
  T* yr = y + row * (int64_t)cols;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, to_f(xr[i]));
  m = block_max(m, scratch);
  float s = 0.f;
  for (int i = threadIdx.x; i < cols; i += blockDim.x) s += expf(to_f(xr[i]) - m);
  const float inv = 1.f / block_sum(s, scratch);
  for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = from_f<T>(expf(to_f(xr[i]) - m) * inv);
}

// GEGLU (diffusers' GEGLU: `hidden, gate = h.chunk(2, -1); hidden * gelu(gate)`, exact erf GELU).
// h is [rows, 2·inner], y and the gradient g are [rows, inner].
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

template <typename T>
__device__ void geglu_fwd(const T* h, T* y, int64_t n, int inner) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inner, j = i % inner;
    const T* hr = h + r * 2 * inner;
    y[i] = from_f<T>(to_f(hr[j]) * gelu(to_f(hr[inner + j])));
  }
}

// dh[:, :inner] = g · gelu(gate); dh[:, inner:] = g · hidden · gelu'(gate).
template <typename T>
__device__ void geglu_bwd(const T* h, const T* g, T* dh, int64_t n, int inner) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inner, j = i % inner;
    const T* hr = h + r * 2 * inner;
    T* dr = dh + r * 2 * inner;
    const float hidden = to_f(hr[j]), gate = to_f(hr[inner + j]), gi = to_f(g[i]);
    dr[j] = from_f<T>(gi * gelu(gate));
    dr[inner + j] = from_f<T>(gi * hidden * gelu_grad(gate));
  }
}

// im2col for the convolution backward (conv.rs, GemmConvBackward): images x [B, C, H, W] to
// columns [B, C·k·k, Ho·Wo], rows in the weight's (c, ki, kj) order; n = the columns' element count.
template <typename T>
__device__ void im2col(const T* x, T* cols, int64_t n, int c_in, int h, int w, int h_out, int w_out,
                       int k, int stride, int pad) {
  const int64_t p = (int64_t)h_out * w_out, rows = (int64_t)c_in * k * k;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t px = i % p, r = (i / p) % rows, b = i / (p * rows);
    const int oh = (int)(px / w_out), ow = (int)(px % w_out);
    const int c = (int)(r / (k * k)), ki = (int)((r / k) % k), kj = (int)(r % k);
    const int y = oh * stride + ki - pad, xx = ow * stride + kj - pad;
    cols[i] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((b * c_in + c) * h + y) * w + xx] : from_f<T>(0.f);
  }
}

// The adjoint: every pixel of x [B, C, H, W] sums the column entries that read it; n = x's
// element count. Output row oh reads input row oh·stride + ki − pad.
template <typename T>
__device__ void col2im(const T* cols, T* x, int64_t n, int c_in, int h, int w, int h_out, int w_out,
                       int k, int stride, int pad) {
  const int64_t p = (int64_t)h_out * w_out, rows = (int64_t)c_in * k * k;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int xx = (int)(i % w), y = (int)((i / w) % h);
    const int64_t bc = i / ((int64_t)h * w);
    const int c = (int)(bc % c_in);
    const int64_t b = bc / c_in;
    const T* base = cols + (b * rows + (int64_t)c * k * k) * p;
    float s = 0.f;
    for (int ki = 0; ki < k; ++ki) {
      const int t = y + pad - ki;
      if (t < 0 || t % stride != 0 || t / stride >= h_out) continue;
      const int oh = t / stride;
      for (int kj = 0; kj < k; ++kj) {
        const int u = xx + pad - kj;
        if (u < 0 || u % stride != 0 || u / stride >= w_out) continue;
        s += to_f(base[(int64_t)(ki * k + kj) * p + (int64_t)oh * w_out + u / stride]);
      }
    }
    x[i] = from_f<T>(s);
  }
}

#define INSTANTIATE(T, S)                                                                        \
  extern "C" __global__ void imprint_norm_fwd_##S(const T* x, const T* w, const T* b, T* y,      \
                                                  int row_len, int groups, int spatial,          \
                                                  float eps, int silu) {                         \
    norm_fwd<T>(x, w, b, y, row_len, groups, spatial, eps, silu);                                \
  }                                                                                              \
  extern "C" __global__ void imprint_softmax_fwd_##S(const T* x, T* y, int cols) {               \
    softmax_fwd<T>(x, y, cols);                                                                  \
  }                                                                                              \
  extern "C" __global__ void imprint_geglu_fwd_##S(const T* h, T* y, int64_t n, int inner) {     \
    geglu_fwd<T>(h, y, n, inner);                                                                \
  }                                                                                              \
  extern "C" __global__ void imprint_geglu_bwd_##S(const T* h, const T* g, T* dh, int64_t n,     \
                                                   int inner) {                                  \
    geglu_bwd<T>(h, g, dh, n, inner);                                                            \
  }                                                                                              \
  extern "C" __global__ void imprint_im2col_##S(const T* x, T* cols, int64_t n, int c_in, int h, \
                                                int w, int h_out, int w_out, int k, int stride,  \
                                                int pad) {                                       \
    im2col<T>(x, cols, n, c_in, h, w, h_out, w_out, k, stride, pad);                             \
  }                                                                                              \
  extern "C" __global__ void imprint_col2im_##S(const T* cols, T* x, int64_t n, int c_in, int h, \
                                                int w, int h_out, int w_out, int k, int stride,  \
                                                int pad) {                                       \
    col2im<T>(cols, x, n, c_in, h, w, h_out, w_out, k, stride, pad);                             \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
