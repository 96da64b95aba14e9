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

// Block-wide sum over NT threads, returned to every thread.
template <typename T, int NT = kBlock>
__device__ T block_sum(T v) {
  constexpr int kWarps = NT / 32;
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

// Block-wide reduction (NT threads) of a logsumexp state and two sums, returned to every thread.
template <typename T, int NT = kBlock>
__device__ void block_reduce_row(Lse<T>& l, T& a, T& b) {
  constexpr int kWarps = NT / 32;
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
                        bool need_grad, GradScale<acc_t> scale, acc_t* __restrict__ loss,
                        acc_t* __restrict__ coef, acc_t* __restrict__ inv_n_out, acc_t* __restrict__ u) {
  const int64_t row = blockIdx.x;
  scalar_t* zr = z + row * K;
  const scalar_t* hr = h + row * d;
  const int64_t label = y[row];
  const bool bad = label != ignore_index && (label < 0 || label >= K);  // only under graph capture
  if (label == ignore_index || bad) {
    if (threadIdx.x == 0) {
      loss[row] = bad ? acc_t(NAN) : acc_t(0);
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
  const acc_t gscale = scale.device ? *scale.device : scale.value;

  const acc_t* srow = S ? S + label * K : nullptr;  // row y of S: the target of label y
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
                         const acc_t* __restrict__ inv_n, int64_t d, acc_t alpha, GradScale<acc_t> scale,
                         acc_t* __restrict__ loss,
                         scalar_t* __restrict__ corr) {
  const int64_t row = blockIdx.x;
  const acc_t gscale = scale.device ? *scale.device : scale.value;
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

// ---------------------------------------------------------------------------------------------- tuned path
// 16-byte loads and stores. Needs K and d multiples of V = 16 / sizeof(scalar_t) and 16-byte aligned
// rows (the host checks both). When a row fits in registers (NV > 0: K <= NV V kBlock) the logits and
// the scaled residuals stay there between the two passes, so pass 2 only writes G; otherwise (NV == 0)
// pass 2 reads the row again. The gather-route correction -coef h is written here too (corr != nullptr).

#ifndef HF_CHECK_ALIGN16  // the CPU emulator of tests/cuda_emu checks every vector access
#define HF_CHECK_ALIGN16(p) ((void)0)
#endif

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// Loads N consecutive elements (a multiple of one 16-byte pack) and widens them to acc_t.
template <int N, typename acc_t, typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ p, acc_t (&out)[N]) {
  constexpr int P = 16 / sizeof(T);
  static_assert(N % P == 0, "a vector is a whole number of 16-byte packs");
#pragma unroll
  for (int q = 0; q < N / P; ++q) {
    HF_CHECK_ALIGN16(p + q * P);
    const Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + q * P);
#pragma unroll
    for (int e = 0; e < P; ++e) out[q * P + e] = to_acc<acc_t>(pk.v[e]);
  }
}

// Rounds N acc_t values to T and stores them as 16-byte packs.
template <int N, typename T, typename acc_t>
__device__ __forceinline__ void store_n(T* __restrict__ p, const acc_t (&in)[N]) {
  constexpr int P = 16 / sizeof(T);
  static_assert(N % P == 0, "a vector is a whole number of 16-byte packs");
#pragma unroll
  for (int q = 0; q < N / P; ++q) {
    Pack<T, P> pk;
#pragma unroll
    for (int e = 0; e < P; ++e) pk.v[e] = from_acc<T, acc_t>(in[q * P + e]);
    HF_CHECK_ALIGN16(p + q * P);
    *reinterpret_cast<Pack<T, P>*>(p + q * P) = pk;
  }
}

// Gather route, one vector of V logits from element k0: residuals r, cosines c, and rw = inv_wn r.
template <int V, typename acc_t>
__device__ __forceinline__ void vec_residuals(const acc_t (&zv)[V], const acc_t* __restrict__ srow,
                                              const acc_t* __restrict__ inv_wn, int64_t k0, acc_t in,
                                              acc_t (&r)[V], acc_t (&c)[V], acc_t (&rw)[V]) {
  acc_t s[V], iw[V];
  load_n<V>(srow + k0, s);
  load_n<V>(inv_wn + k0, iw);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    r[e] = cos_residual(zv[e], iw[e], in, s[e], &c[e]);
    rw[e] = iw[e] * r[e];
  }
}

// One row's pass-1 work on a vector of V logits starting at element k0 (residuals scaled by inv_wn kept in rw).
template <int V, typename acc_t>
__device__ __forceinline__ void vec_pass1(const acc_t (&zv)[V], const acc_t* __restrict__ srow,
                                          const acc_t* __restrict__ inv_wn, int64_t k0, acc_t in, Lse<acc_t>& l,
                                          acc_t& lcos, acc_t& rc, acc_t (&rw)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) lse_push(l, zv[e]);
  if (srow) {
    acc_t r[V], c[V];
    vec_residuals<V>(zv, srow, inv_wn, k0, in, r, c, rw);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      lcos += r[e] * r[e];
      rc += r[e] * c[e];
    }
  }
}

// G over one vector of V logits (rw: residuals times inv_wn, unused on the M route).
template <int V, typename acc_t>
__device__ __forceinline__ void vec_grad(acc_t (&zv)[V], const acc_t (&rw)[V], bool gather, int64_t k0,
                                         int64_t label, acc_t lse, acc_t in, acc_t alpha, acc_t gscale) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const acc_t p = hf_exp(zv[e] - lse);
    const bool is_y = k0 + e == label;
    const acc_t g = gather ? gather_grad_coef(p, is_y, rw[e], acc_t(1), in, alpha) : ce_grad_coef(p, is_y, alpha);
    zv[e] = gscale * g;
  }
}

// The per-row d-vectors of one row: corr = -c_h h (gather route) and u = mroute_u(h, in, w_y) (M route), each
// written where its pointer is given. An ignored row passes wy = nullptr: its u is 0 and its corr -0 h.
template <int V, int NT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void vec_row_outputs(const scalar_t* __restrict__ hr, const scalar_t* __restrict__ wy,
                                                int64_t nd, acc_t in, acc_t c_h, acc_t* __restrict__ u,
                                                scalar_t* __restrict__ corr) {
  if (corr)
    for (int64_t i = threadIdx.x; i < nd; i += NT) {
      acc_t x[V];
      load_n<V>(hr + i * V, x);
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = -c_h * x[e];
      store_n<V>(corr + i * V, x);
    }
  if (u)
    for (int64_t i = threadIdx.x; i < nd; i += NT) {
      acc_t x[V], w[V];
      if (wy) {
        load_n<V>(hr + i * V, x);
        load_n<V>(wy + i * V, w);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = wy ? mroute_u(x[e], in, w[e]) : acc_t(0);
      store_n<V>(u + i * V, x);
    }
}

// An ignored row (under graph capture also an out-of-range label: NaN loss) as the generic kernel writes it:
// zero loss, zero G and u, corr = -0 h.
template <int V, int NT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void vec_ignored_row(scalar_t* __restrict__ zr, const scalar_t* __restrict__ hr,
                                                int64_t nk, int64_t nd, bool bad, bool need_grad,
                                                acc_t* __restrict__ loss_row, acc_t* __restrict__ inv_n_row,
                                                acc_t* __restrict__ u_row, scalar_t* __restrict__ corr_row) {
  if (threadIdx.x == 0) {
    *loss_row = bad ? acc_t(NAN) : acc_t(0);
    *inv_n_row = acc_t(0);
  }
  if (need_grad) {
    acc_t x[V];
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = acc_t(0);
    for (int64_t i = threadIdx.x; i < nk; i += NT) store_n<V>(zr + i * V, x);
  }
  const scalar_t* no_wy = nullptr;  // u = 0, corr = -0 h
  vec_row_outputs<V, NT>(hr, no_wy, nd, acc_t(1), acc_t(0), u_row, corr_row);
}

// 1 / max(||h_r||, eps) of one row of nd vectors of V values, reduced over the block.
template <int V, int NT, typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t vec_inv_norm(const scalar_t* __restrict__ hr, int64_t nd) {
  acc_t ss = 0;
  for (int64_t i = threadIdx.x; i < nd; i += NT) {
    acc_t x[V];
    load_n<V>(hr + i * V, x);
#pragma unroll
    for (int e = 0; e < V; ++e) ss += x[e] * x[e];
  }
  return inv_norm(block_sum<acc_t, NT>(ss));
}

template <typename scalar_t, typename acc_t, int V, int NV, int NT>
__global__ void __launch_bounds__(NT)
    row_epilogue_vec_kernel(scalar_t* __restrict__ z, const scalar_t* __restrict__ h,
                            const scalar_t* __restrict__ W, const acc_t* __restrict__ inv_wn,
                            const acc_t* __restrict__ S, const int64_t* __restrict__ y, int64_t K, int64_t d,
                            acc_t alpha, int64_t ignore_index, bool need_grad, GradScale<acc_t> scale,
                            acc_t* __restrict__ loss, acc_t* __restrict__ inv_n_out, acc_t* __restrict__ u,
                            scalar_t* __restrict__ corr) {
  const int64_t row = blockIdx.x;
  scalar_t* zr = z + row * K;
  const scalar_t* hr = h + row * d;
  const int64_t label = y[row];
  const int64_t nk = K / V, nd = d / V;
  const bool bad = label != ignore_index && (label < 0 || label >= K);  // only under graph capture
  if (label == ignore_index || bad) {
    vec_ignored_row<V, NT>(zr, hr, nk, nd, bad, need_grad, loss + row, inv_n_out + row, u ? u + row * d : nullptr,
                           corr ? corr + row * d : nullptr);
    return;  // uniform over the block: no thread reaches a barrier below
  }
  const acc_t in = vec_inv_norm<V, NT, acc_t>(hr, nd);
  const acc_t gscale = scale.device ? *scale.device : scale.value;
  const acc_t* srow = S ? S + label * K : nullptr;  // row y of S: the target of label y

  Lse<acc_t> l = lse_empty<acc_t>();
  acc_t lcos = 0, rc = 0;
  constexpr int NR = NV > 0 ? NV : 1;
  acc_t zreg[NR][V], rwreg[NR][V];
  if (NV > 0) {
#pragma unroll
    for (int t = 0; t < NR; ++t) {
      const int64_t i = threadIdx.x + int64_t(t) * NT;
      if (i < nk) {
        load_n<V>(zr + i * V, zreg[t]);
        vec_pass1<V>(zreg[t], srow, inv_wn, i * V, in, l, lcos, rc, rwreg[t]);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < nk; i += NT) {
      load_n<V>(zr + i * V, zreg[0]);
      vec_pass1<V>(zreg[0], srow, inv_wn, i * V, in, l, lcos, rc, rwreg[0]);
    }
  }
  block_reduce_row<acc_t, NT>(l, lcos, rc);
  const acc_t lse = lse_value(l);
  const acc_t z_y = to_acc<acc_t>(zr[label]);
  __syncthreads();  // every thread has read z_y before G overwrites it

  if (need_grad) {
    if (NV > 0) {
#pragma unroll
      for (int t = 0; t < NR; ++t) {
        const int64_t i = threadIdx.x + int64_t(t) * NT;
        if (i < nk) {
          vec_grad<V>(zreg[t], rwreg[t], srow != nullptr, i * V, label, lse, in, alpha, gscale);
          store_n<V>(zr + i * V, zreg[t]);
        }
      }
    } else {
      for (int64_t i = threadIdx.x; i < nk; i += NT) {
        load_n<V>(zr + i * V, zreg[0]);
        if (srow) {  // recompute the scaled residuals of this vector
          acc_t r[V], c[V];
          vec_residuals<V>(zreg[0], srow, inv_wn, i * V, in, r, c, rwreg[0]);
        }
        vec_grad<V>(zreg[0], rwreg[0], srow != nullptr, i * V, label, lse, in, alpha, gscale);
        store_n<V>(zr + i * V, zreg[0]);
      }
    }
  }
  const acc_t c_h = srow ? gscale * gather_h_coef(rc, in, alpha) : acc_t(0);
  vec_row_outputs<V, NT>(hr, W + label * d, nd, in, c_h, u ? u + row * d : nullptr, corr ? corr + row * d : nullptr);
  if (threadIdx.x == 0) {
    loss[row] = row_loss(lse, z_y, lcos, alpha);
    inv_n_out[row] = in;
  }
}

// Inverse row norms of W, 1 / max(||w_k||, eps) (NaN stays NaN), one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) row_inv_norm_kernel(const scalar_t* __restrict__ W, int64_t K, int64_t d,
                                                               acc_t* __restrict__ out) {
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= K) return;  // whole warps leave together
  const scalar_t* wr = W + row * d;
  acc_t ss = 0;
  for (int64_t j = threadIdx.x & 31; j < d; j += 32) {
    const acc_t x = to_acc<acc_t>(wr[j]);
    ss += x * x;
  }
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) {
    acc_t n = hf_sqrt(ss);
    if (n < acc_t(kEps)) n = acc_t(kEps);
    out[row] = acc_t(1) / n;
  }
}

template <typename acc_t>
__global__ void grad_scale_kernel(const unsigned long long* __restrict__ stats, bool mean, acc_t* __restrict__ out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    const unsigned long long n = stats[0];
    *out = mean ? (n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0)) : acc_t(1);
  }
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
                         bool need_grad, GradScale<acc_t> gscale, acc_t* loss, acc_t* coef, acc_t* inv_n, acc_t* u,
                         cudaStream_t stream) {
  if (R <= 0) return;
  row_epilogue_kernel<scalar_t, acc_t><<<static_cast<unsigned>(R), kBlock, 0, stream>>>(
      z, h, W, inv_wn, S, y, K, d, alpha, ignore_index, need_grad, gscale, loss, coef, inv_n, u);
}

template <typename scalar_t, typename acc_t>
void launch_mroute_finish(const scalar_t* h, const acc_t* u, const acc_t* v, const acc_t* inv_n, int64_t R, int64_t d,
                          acc_t alpha, GradScale<acc_t> gscale, acc_t* loss, scalar_t* corr, cudaStream_t stream) {
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

template <typename scalar_t>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

bool vec_epilogue_supported(int64_t K, int64_t d, int elem_size, const void* const* ptrs, int n_ptrs) {
  const int64_t V = 16 / elem_size;
  if (K % V != 0 || d % V != 0) return false;
  for (int i = 0; i < n_ptrs; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  return true;
}

template <typename scalar_t, typename acc_t>
void launch_row_epilogue_vec(scalar_t* z, const scalar_t* h, const scalar_t* W, const acc_t* inv_wn, const acc_t* S,
                             const int64_t* y, int64_t R, int64_t K, int64_t d, acc_t alpha, int64_t ignore_index,
                             bool need_grad, GradScale<acc_t> gscale, acc_t* loss, acc_t* inv_n, acc_t* u,
                             scalar_t* corr,
                             cudaStream_t stream) {
  if (R <= 0) return;
  constexpr int V = vec_width<scalar_t>();
  constexpr int NV = 16 / V;  // registers for 16 logits per thread: K <= 16 * kBlock stays resident
  const dim3 grid(static_cast<unsigned>(R));
  if (K <= int64_t(NV) * V * kBlock)
    row_epilogue_vec_kernel<scalar_t, acc_t, V, NV, kBlock><<<grid, kBlock, 0, stream>>>(
        z, h, W, inv_wn, S, y, K, d, alpha, ignore_index, need_grad, gscale, loss, inv_n, u, corr);
  else  // long rows are few per chunk (64 MiB of logits): 1024 threads a row keep the SMs full
    row_epilogue_vec_kernel<scalar_t, acc_t, V, 0, 1024><<<grid, 1024, 0, stream>>>(
        z, h, W, inv_wn, S, y, K, d, alpha, ignore_index, need_grad, gscale, loss, inv_n, u, corr);
}

template <typename scalar_t, typename acc_t>
void launch_row_inv_norm(const scalar_t* W, int64_t K, int64_t d, acc_t* out, cudaStream_t stream) {
  if (K <= 0) return;
  const int64_t blocks = (K + kWarps - 1) / kWarps;
  row_inv_norm_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(W, K, d, out);
}

template <typename acc_t>
void launch_grad_scale(const unsigned long long* stats, bool mean, acc_t* out, cudaStream_t stream) {
  grad_scale_kernel<acc_t><<<1, 32, 0, stream>>>(stats, mean, out);
}
template void launch_grad_scale<float>(const unsigned long long*, bool, float*, cudaStream_t);
template void launch_grad_scale<double>(const unsigned long long*, bool, double*, cudaStream_t);

cudaError_t label_check_to_host(const int64_t* y, int64_t B, int64_t K, int64_t ignore_index,
                                unsigned long long* stats, unsigned long long* host_stats, cudaStream_t stream) {
  launch_label_check(y, B, K, ignore_index, stats, stream);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cudaMemcpyAsync(host_stats, stats, 2 * sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream);
  if (err != cudaSuccess) return err;
  return cudaStreamSynchronize(stream);
}

#define HAFRAME_INSTANTIATE(scalar_t, acc_t)                                                                      \
  template void launch_row_epilogue<scalar_t, acc_t>(scalar_t*, const scalar_t*, const scalar_t*, const acc_t*,  \
                                                     const acc_t*, const int64_t*, int64_t, int64_t, int64_t,      \
                                                     acc_t, int64_t, bool, GradScale<acc_t>, acc_t*, acc_t*,       \
                                                     acc_t*, acc_t*,                                               \
                                                     cudaStream_t);                                                \
  template void launch_mroute_finish<scalar_t, acc_t>(const scalar_t*, const acc_t*, const acc_t*, const acc_t*,  \
                                                      int64_t, int64_t, acc_t, GradScale<acc_t>, acc_t*,          \
                                                      scalar_t*,                                                  \
                                                      cudaStream_t);                                              \
  template void launch_gather_correction<scalar_t, acc_t>(const scalar_t*, const acc_t*, int64_t, int64_t,        \
                                                          scalar_t*, cudaStream_t);                                \
  template void launch_row_epilogue_vec<scalar_t, acc_t>(scalar_t*, const scalar_t*, const scalar_t*,            \
                                                         const acc_t*, const acc_t*, const int64_t*, int64_t,       \
                                                         int64_t, int64_t, acc_t, int64_t, bool, GradScale<acc_t>,  \
                                                         acc_t*,                                                    \
                                                         acc_t*, acc_t*, scalar_t*, cudaStream_t);                  \
  template void launch_row_inv_norm<scalar_t, acc_t>(const scalar_t*, int64_t, int64_t, acc_t*, cudaStream_t);

HAFRAME_INSTANTIATE(float, float)
HAFRAME_INSTANTIATE(double, double)
HAFRAME_INSTANTIATE(__half, float)
HAFRAME_INSTANTIATE(__nv_bfloat16, float)

}  // namespace cuda
}  // namespace haframe
