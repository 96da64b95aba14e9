// Runs CUDA kernels on the CPU for tests (tests/cuda_emu): every block in turn, one std::thread per
// CUDA thread, __syncthreads as a block barrier, warp shuffles through a per-warp buffer and barrier,
// atomics under a lock, __shared__ as a function-local static (one block runs at a time). It checks
// what the CPU would let pass: 16-byte alignment of vector loads (HF_CHECK_ALIGN16). Not a timing
// model and not a race detector: it runs the kernels' index and reduction logic on real data.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  unsigned long long buf[32];
};

struct Block {
  explicit Block(unsigned n) : bar(n) {
    for (unsigned w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new Warp);
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local uint3 tl_thread{0, 0, 0};
inline thread_local uint3 tl_blockidx{0, 0, 0};
inline thread_local dim3 tl_blockdim;
inline thread_local dim3 tl_griddim;

inline std::mutex mu;
inline std::string first_error;

inline void report(const std::string& msg) {
  std::lock_guard<std::mutex> g(mu);
  if (first_error.empty()) first_error = msg;
}

// cudaGetLastError: 1 when a kernel broke a rule (the message stays for pop_error).
inline int take_error() {
  std::lock_guard<std::mutex> g(mu);
  return first_error.empty() ? 0 : 1;
}

inline std::string pop_error() {
  std::lock_guard<std::mutex> g(mu);
  std::string m;
  m.swap(first_error);
  return m;
}

inline void check_align16(const void* p, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    report(std::string("misaligned 16-byte access at ") + file + ":" + std::to_string(line) + " (block " +
           std::to_string(tl_blockidx.x) + ", thread " + std::to_string(tl_thread.x) + ")");
}

template <typename T>
T shfl_xor(T v, int o) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffles of up to 8 bytes");
  Warp& w = *tl_block->warps[tl_thread.x / 32];
  const unsigned lane = tl_thread.x % 32;
  std::memcpy(&w.buf[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &w.buf[lane ^ static_cast<unsigned>(o)], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

// One launch: nt threads, created once, run the blocks one after the other (a pool barrier between
// blocks, whose completion step sets up the next block's barriers).
template <typename... P, typename... A>
void run(void (*k)(P...), dim3 grid, dim3 block, A... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt % 32 != 0) report("block size not a multiple of 32");
  if (grid.x == 0 || nt == 0) return;
  unsigned bx = 0;
  std::unique_ptr<Block> cur(new Block(nt));
  auto next = [&]() noexcept {
    ++bx;
    cur.reset(bx < grid.x ? new Block(nt) : nullptr);
  };
  std::barrier<decltype(next)> pool(nt, next);
  std::vector<std::thread> ts;
  ts.reserve(nt);
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      tl_thread = {t, 0, 0};
      tl_blockdim = block;
      tl_griddim = grid;
      while (bx < grid.x) {
        Block* blk = cur.get();
        tl_block = blk;
        tl_blockidx = {bx, 0, 0};
        k(static_cast<P>(args)...);
        // a thread that has returned no longer holds up the barriers of the others
        blk->warps[t / 32]->bar.arrive_and_drop();
        blk->bar.arrive_and_drop();
        pool.arrive_and_wait();
      }
    });
  for (auto& th : ts) th.join();
}

template <typename... P>
struct Launcher {
  void (*k)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A... args) const {
    run(k, grid, block, args...);
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to emu::launch(kernel, grid, block, smem, stream)(args).
template <typename... P>
Launcher<P...> launch(void (*k)(P...), dim3 grid, dim3 block, size_t = 0, void* = nullptr) {
  return Launcher<P...>{k, grid, block};
}

}  // namespace emu

#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_blockidx)
#define blockDim (::emu::tl_blockdim)
#define gridDim (::emu::tl_griddim)
#define HF_CHECK_ALIGN16(p) ::emu::check_align16((p), __FILE__, __LINE__)

template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return emu::shfl_xor(v, o);
}
inline void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> g(emu::mu);
  const unsigned long long old = *p;
  if (v > old) *p = v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> g(emu::mu);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
