// CUDA kernel of the hierarchical losses' epilogue: one block per row, a block reduction per segment of the
// label's depth-first path (O(K + L) per row), the gradient written in place. Pure CUDA: compiles with
// `nvcc -c` and no ATen. The row math comes from hier_math.h.
#include "../hier_math.h"
#include "hier_loss_kernels.cuh"

namespace haframe {
namespace cuda {
namespace {

constexpr int kHierBlock = 256;

template <typename T>
__device__ __forceinline__ T hier_warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T hier_warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Block-wide sum (is_max false) or maximum, returned to every thread.
template <typename T>
__device__ T hier_block_reduce(T v, bool is_max) {
  constexpr int kWarps = kHierBlock / 32;
  __shared__ T sm[kWarps];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = is_max ? hier_warp_max(v) : hier_warp_sum(v);
  if (lane == 0) sm[wid] = v;
  __syncthreads();
  T t = is_max ? T(-INFINITY) : T(0);
  for (int w = 0; w < kWarps; ++w) t = is_max ? (sm[w] > t ? sm[w] : t) : t + sm[w];  // same order everywhere
  __syncthreads();  // sm is reused by the next reduction
  return t;
}

// Calls f(c) for the classes of segment s owned by this thread (c = order[position], or the position).
template <typename F>
__device__ __forceinline__ void hier_for_segment(const HierSeg& s, const int64_t* __restrict__ order, F f) {
  for (int64_t j = s.a0 + threadIdx.x; j < s.b0; j += kHierBlock) f(order ? order[j] : j);
  for (int64_t j = s.a1 + threadIdx.x; j < s.b1; j += kHierBlock) f(order ? order[j] : j);
}

template <typename acc_t>
__global__ void __launch_bounds__(kHierBlock)
    hier_epilogue_kernel(acc_t* __restrict__ z, const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                         const int64_t* __restrict__ end, const double* __restrict__ value, int64_t K, int64_t P,
                         int64_t kind, bool need_grad, acc_t gscale, const acc_t* __restrict__ row_scale,
                         acc_t* __restrict__ loss, acc_t* __restrict__ work) {
  const int64_t r = blockIdx.x;
  acc_t* zr = z + r * K;
  const int64_t* ps = start + r * P;
  const int64_t* pe = end + r * P;
  const double* pv = value + r * P;
  acc_t* lse = work + r * 4 * P;  // segment, then nested logsumexps
  acc_t* coef = lse + P;          // HXE: D_i; soft: q_i
  acc_t* segz = coef + P;         // soft: sum of the segment's logits
  acc_t* direct = segz + P;       // 1 where the segment's sum underflowed against the row maximum
  const int64_t L = hier_path_last(ps, P);
  const bool soft = kind == kHierSoft;

  acc_t m = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += kHierBlock) m = zr[k] > m ? zr[k] : m;
  m = hier_block_reduce(m, true);
  if (!(m > -INFINITY && m < INFINITY)) m = 0;  // all -inf, an inf or NaN: let the sums carry it

  for (int64_t i = L; i >= 0; --i) {
    const HierSeg g = hier_segment(ps, pe, i, L);
    acc_t s = 0, zs = 0;
    hier_for_segment(g, order, [&](int64_t c) {
      s += hf_exp(zr[c] - m);
      zs += zr[c];
    });
    s = hier_block_reduce(s, false);
    if (soft) zs = hier_block_reduce(zs, false);
    const bool empty = g.b0 <= g.a0 && g.b1 <= g.a1;
    acc_t l = -INFINITY, dir = 0;
    if (!empty && (s >= hier_tiny_sum<acc_t>() || !(s == s))) {
      l = m + hf_log(s);
    } else if (!empty) {  // every term underflowed: about the segment's own maximum
      acc_t sm = -INFINITY;
      hier_for_segment(g, order, [&](int64_t c) { sm = zr[c] > sm ? zr[c] : sm; });
      sm = hier_block_reduce(sm, true);
      acc_t t = 0;
      if (sm > -INFINITY) hier_for_segment(g, order, [&](int64_t c) { t += hf_exp(zr[c] - sm); });
      t = hier_block_reduce(t, false);
      l = sm > -INFINITY ? sm + hf_log(t) : acc_t(-INFINITY);
      dir = 1;
    }
    if (threadIdx.x == 0) {
      lse[i] = l;
      segz[i] = zs;
      direct[i] = dir;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    hier_nested_lse(lse, L);
    loss[r] = soft ? soft_finish(lse, pv, ps, pe, L, segz, coef) : hxe_finish(lse, pv, L, coef);
  }
  __syncthreads();
  if (!need_grad) return;
  const acc_t scale = gscale * (row_scale ? row_scale[r] : acc_t(1));
  for (int64_t i = 0; i <= L; ++i) {
    const HierSeg g = hier_segment(ps, pe, i, L);
    const acc_t l = soft ? lse[0] : lse[i];
    const acc_t k = soft ? -coef[i] : acc_t(0);
    const acc_t D = soft ? acc_t(1) : coef[i];
    hier_for_segment(g, order, [&](int64_t c) { zr[c] = scale * (hf_exp(zr[c] - l) * D + k); });
  }
}

}  // namespace

template <typename acc_t>
void launch_hier_epilogue(acc_t* z, const int64_t* order, const int64_t* start, const int64_t* end,
                          const double* value, int64_t R, int64_t K, int64_t P, int64_t kind, bool need_grad,
                          acc_t gscale, const acc_t* row_scale, acc_t* loss, acc_t* work, cudaStream_t stream) {
  if (R <= 0) return;
  hier_epilogue_kernel<acc_t><<<static_cast<unsigned>(R), kHierBlock, 0, stream>>>(
      z, order, start, end, value, K, P, kind, need_grad, gscale, row_scale, loss, work);
}

template void launch_hier_epilogue<float>(float*, const int64_t*, const int64_t*, const int64_t*, const double*,
                                          int64_t, int64_t, int64_t, int64_t, bool, float, const float*, float*,
                                          float*, cudaStream_t);
template void launch_hier_epilogue<double>(double*, const int64_t*, const int64_t*, const int64_t*, const double*,
                                           int64_t, int64_t, int64_t, int64_t, bool, double, const double*, double*,
                                           double*, cudaStream_t);

}  // namespace cuda
}  // namespace haframe
