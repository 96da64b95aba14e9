// CUDA kernels of the fused HAFrame loss: the per-row epilogue over the logits (online logsumexp, CE,
// cosine residuals, G written in place), the M-route finish and the gather-route correction.
// Pure CUDA: compiles with `nvcc -c` and no ATen. The row math comes from haframe_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../haframe_math.h"
#include "fused_loss_kernels.cuh"

namespace haframe {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  return static_cast<scalar_t>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum, returned to every thread.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T sm[kWarps];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sm[wid] = v;
  __syncthreads();
  T t = lane < kWarps ? sm[lane] : T(0);
  t = warp_sum(t);
  __syncthreads();  // sm may be reused by the caller's next reduction
  return t;
}

// Block-wide reduction of a logsumexp state and two sums, returned to every thread.
template <typename T>
__device__ void block_reduce_row(Lse<T>& l, T& a, T& b) {
  __shared__ T sm[4][kWarps];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Lse<T> other{__shfl_xor_sync(0xffffffffu, l.m, o), __shfl_xor_sync(0xffffffffu, l.s, o)};
    l = lse_merge(l, other);
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (lane == 0) {
    sm[0][wid] = l.m;
    sm[1][wid] = l.s;
    sm[2][wid] = a;
    sm[3][wid] = b;
  }
  __syncthreads();
  l = lse_empty<T>();
  a = T(0);
  b = T(0);
  for (int w = 0; w < kWarps; ++w) {  // every thread combines the few warp partials in the same order
    l = lse_merge(l, Lse<T>{sm[0][w], sm[1][w]});
    a += sm[2][w];
    b += sm[3][w];
  }
  __syncthreads();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    row_epilogue_kernel(scalar_t* __restrict__ z, const scalar_t* __restrict__ h, const scalar_t* __restrict__ W,
                        const acc_t* __restrict__ inv_wn, const acc_t* __restrict__ S,
                        const int64_t* __restrict__ y, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index,
                        bool need_grad, acc_t gscale, acc_t* __restrict__ loss, acc_t* __restrict__ coef,
                        acc_t* __restrict__ inv_n_out, acc_t* __restrict__ u) {
  const int64_t row = blockIdx.x;
  scalar_t* zr = z + row * K;
  const scalar_t* hr = h + row * d;
  const int64_t label = y[row];
  if (label == ignore_index) {
    if (threadIdx.x == 0) {
      loss[row] = acc_t(0);
      coef[row] = acc_t(0);
      inv_n_out[row] = acc_t(0);
    }
    if (need_grad)
      for (int64_t k = threadIdx.x; k < K; k += kBlock) zr[k] = from_acc<scalar_t, acc_t>(acc_t(0));
    if (u)
      for (int64_t j = threadIdx.x; j < d; j += kBlock) u[row * d + j] = acc_t(0);
    return;
  }
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += kBlock) {
    const acc_t x = to_acc<acc_t>(hr[j]);
    ss += x * x;
  }
  const acc_t in = inv_norm(block_sum(ss));

  const acc_t* srow = S ? S + label * K : nullptr;  // S symmetric: row y is column y
  Lse<acc_t> l = lse_empty<acc_t>();
  acc_t lcos = 0, rc = 0;
  for (int64_t k = threadIdx.x; k < K; k += kBlock) {
    const acc_t zk = to_acc<acc_t>(zr[k]);
    lse_push(l, zk);
    if (srow) {
      acc_t c;
      const acc_t r = cos_residual(zk, inv_wn[k], in, srow[k], &c);
      lcos += r * r;
      rc += r * c;
    }
  }
  block_reduce_row(l, lcos, rc);
  const acc_t lse = lse_value(l);
  const acc_t z_y = to_acc<acc_t>(zr[label]);
  __syncthreads();  // every thread has read z_y before G overwrites it

  if (need_grad) {
    for (int64_t k = threadIdx.x; k < K; k += kBlock) {
      const acc_t zk = to_acc<acc_t>(zr[k]);
      const acc_t p = hf_exp(zk - lse);
      acc_t g;
      if (srow) {
        acc_t c;
        const acc_t r = cos_residual(zk, inv_wn[k], in, srow[k], &c);
        g = gather_grad_coef(p, k == label, r, inv_wn[k], in, alpha);
      } else {
        g = ce_grad_coef(p, k == label, alpha);
      }
      zr[k] = from_acc<scalar_t, acc_t>(gscale * g);
    }
  }
  if (u) {
    const scalar_t* wy = W + label * d;
    for (int64_t j = threadIdx.x; j < d; j += kBlock)
      u[row * d + j] = mroute_u(to_acc<acc_t>(hr[j]), in, to_acc<acc_t>(wy[j]));
  }
  if (threadIdx.x == 0) {
    loss[row] = row_loss(lse, z_y, lcos, alpha);
    coef[row] = srow ? gscale * gather_h_coef(rc, in, alpha) : acc_t(0);
    inv_n_out[row] = in;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    mroute_finish_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ u, const acc_t* __restrict__ v,
                         const acc_t* __restrict__ inv_n, int64_t d, acc_t alpha, acc_t gscale,
                         acc_t* __restrict__ loss,
                         scalar_t* __restrict__ corr) {
  const int64_t row = blockIdx.x;
  const scalar_t* hr = h + row * d;
  const acc_t* ur = u + row * d;
  const acc_t* vr = v + row * d;
  Lse<acc_t> unused = lse_empty<acc_t>();
  acc_t uv = 0, hv = 0;
  for (int64_t j = threadIdx.x; j < d; j += kBlock) {
    uv += ur[j] * vr[j];
    hv += to_acc<acc_t>(hr[j]) * vr[j];
  }
  block_reduce_row(unused, uv, hv);
  const acc_t in = inv_n[row];
  hv *= in;
  if (corr) {
    for (int64_t j = threadIdx.x; j < d; j += kBlock)
      corr[row * d + j] = from_acc<scalar_t, acc_t>(gscale * mroute_grad(vr[j], to_acc<acc_t>(hr[j]), in, hv, alpha));
  }
  if (threadIdx.x == 0) loss[row] += alpha * uv;
}

template <typename scalar_t, typename acc_t>
__global__ void gather_correction_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ coef, int64_t R,
                                         int64_t d, scalar_t* __restrict__ corr) {
  const int64_t n = R * d;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    corr[i] = from_acc<scalar_t, acc_t>(-coef[i / d] * to_acc<acc_t>(h[i]));
}

__global__ void label_check_kernel(const int64_t* __restrict__ y, int64_t B, int64_t K, int64_t ignore_index,
                                   unsigned long long* __restrict__ stats) {
  unsigned long long valid = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = y[i];
    if (v == ignore_index) continue;
    if (v < 0 || v >= K) atomicMax(&stats[1], static_cast<unsigned long long>(B - i));
    else ++valid;
  }
  valid = warp_sum(valid);
  if ((threadIdx.x & 31) == 0 && valid) atomicAdd(&stats[0], valid);
}

}  // namespace

void launch_label_check(const int64_t* y, int64_t B, int64_t K, int64_t ignore_index, unsigned long long* stats,
                        cudaStream_t stream) {
  cudaMemsetAsync(stats, 0, 2 * sizeof(unsigned long long), stream);
  if (B <= 0) return;
  const int64_t blocks = (B + 255) / 256;
  label_check_kernel<<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(y, B, K, ignore_index,
                                                                                                 stats);
}

template <typename scalar_t, typename acc_t>
void launch_row_epilogue(scalar_t* z, const scalar_t* h, const scalar_t* W, const acc_t* inv_wn, const acc_t* S,
                         const int64_t* y, int64_t R, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index,
                         bool need_grad, acc_t gscale, acc_t* loss, acc_t* coef, acc_t* inv_n, acc_t* u,
                         cudaStream_t stream) {
  if (R <= 0) return;
  row_epilogue_kernel<scalar_t, acc_t><<<static_cast<unsigned>(R), kBlock, 0, stream>>>(
      z, h, W, inv_wn, S, y, K, d, alpha, ignore_index, need_grad, gscale, loss, coef, inv_n, u);
}

template <typename scalar_t, typename acc_t>
void launch_mroute_finish(const scalar_t* h, const acc_t* u, const acc_t* v, const acc_t* inv_n, int64_t R, int64_t d,
                          acc_t alpha, acc_t gscale, acc_t* loss, scalar_t* corr, cudaStream_t stream) {
  if (R <= 0) return;
  mroute_finish_kernel<scalar_t, acc_t><<<static_cast<unsigned>(R), kBlock, 0, stream>>>(h, u, v, inv_n, d, alpha,
                                                                                         gscale, loss, corr);
}

template <typename scalar_t, typename acc_t>
void launch_gather_correction(const scalar_t* h, const acc_t* coef, int64_t R, int64_t d, scalar_t* corr,
                              cudaStream_t stream) {
  const int64_t n = R * d;
  if (n <= 0) return;
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  gather_correction_kernel<scalar_t, acc_t><<<grid, 256, 0, stream>>>(h, coef, R, d, corr);
}

#define HAFRAME_INSTANTIATE(scalar_t, acc_t)                                                                      \
  template void launch_row_epilogue<scalar_t, acc_t>(scalar_t*, const scalar_t*, const scalar_t*, const acc_t*,  \
                                                     const acc_t*, const int64_t*, int64_t, int64_t, int64_t,      \
                                                     acc_t, int64_t, bool, acc_t, acc_t*, acc_t*, acc_t*, acc_t*,  \
                                                     cudaStream_t);                                                \
  template void launch_mroute_finish<scalar_t, acc_t>(const scalar_t*, const acc_t*, const acc_t*, const acc_t*,  \
                                                      int64_t, int64_t, acc_t, acc_t, acc_t*, scalar_t*,          \
                                                      cudaStream_t);                                              \
  template void launch_gather_correction<scalar_t, acc_t>(const scalar_t*, const acc_t*, int64_t, int64_t,        \
                                                          scalar_t*, cudaStream_t);

HAFRAME_INSTANTIATE(float, float)
HAFRAME_INSTANTIATE(double, double)
HAFRAME_INSTANTIATE(__half, float)
HAFRAME_INSTANTIATE(__nv_bfloat16, float)

}  // namespace cuda
}  // namespace haframe
