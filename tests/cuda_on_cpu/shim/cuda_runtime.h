// Just enough of the CUDA runtime and device language for our kernels to run on the
// CPU (tests/test_cuda_kernels_on_cpu.py): a cooperative launch forks one process per block,
// so the kernel's __shared__ variables (made `static` by the driver) are per block, and runs
// the block's threads as std::threads; global memory is a MAP_SHARED mapping. __syncthreads
// and the warp shuffles are barriers, so a shuffle or barrier that not every thread reaches
// hangs (and the watchdog reports it) instead of passing silently.
// Not modelled: the memory model beyond x86's (L1 staleness, weak ordering), timing, and
// resource limits other than the shared-memory size the launcher computes. Device and dynamic
// shared memory start as garbage, so a kernel that reads before writing shows it; `static`
// (formerly __shared__) variables start at zero, which the GPU does not promise.
#pragma once
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch failed"; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrCooperativeLaunch };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes { size_t sharedSizeBytes = 0; };

namespace emu {
// The emulated device, set by the harness.
inline int sms = 2;
inline int smem_optin = 227 * 1024;
inline size_t static_shared_bytes = 128;
inline int watchdog_seconds = 120;

inline thread_local unsigned thread_index = 0;
inline unsigned block_index = 0, block_index_y = 0, grid_size = 1, grid_size_y = 1, block_size = 1;
inline std::barrier<>* block_barrier = nullptr;
struct Warp {
  std::barrier<> bar{32};
  uint64_t lanes[32];
};
inline Warp* warps = nullptr;
inline unsigned char* dynamic_shared_memory = nullptr;
inline unsigned char* dynamic_shared() { return dynamic_shared_memory; }

// Global memory that forked blocks share.
inline unsigned char* arena = nullptr;
inline size_t arena_used = 0, arena_size = 0;
// Like cudaMalloc, memory starts as garbage (0xA5 bytes) unless `zeroed`, as at::zeros would give.
template <class T>
T* device_alloc(size_t count, bool zeroed = false) {
  if (arena == nullptr) {
    arena_size = size_t(1) << 30;
    void* p = mmap(nullptr, arena_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { std::perror("mmap"); std::exit(2); }
    arena = static_cast<unsigned char*>(p);
  }
  const size_t bytes = (count * sizeof(T) + 255) / 256 * 256;
  if (arena_used + bytes > arena_size) { std::fprintf(stderr, "arena full\n"); std::exit(2); }
  T* out = reinterpret_cast<T*>(arena + arena_used);
  std::memset(out, zeroed ? 0 : 0xA5, bytes);
  arena_used += bytes;
  return out;
}

template <class F>
void run_threads(unsigned threads, F&& body) {
  std::barrier<> bar(threads);
  const unsigned num_warps = (threads + 31) / 32;
  std::unique_ptr<Warp[]> w(new Warp[num_warps]);
  block_barrier = &bar;
  warps = w.get();
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      thread_index = t;
      body();
    });
  for (auto& th : pool) th.join();
}

// A cooperative launch: every block at once, one forked process each.
template <class P>
cudaError_t cooperative_launch(void (*kernel)(P), dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
  const P params = *static_cast<P*>(args[0]);
  std::vector<pid_t> children;
  for (unsigned b = 0; b < grid.x; ++b) {
    const pid_t pid = fork();
    if (pid == 0) {
      alarm(watchdog_seconds);
      block_index = b;
      block_index_y = 0;
      grid_size = grid.x;
      grid_size_y = 1;
      block_size = block.x;
      std::vector<unsigned char> shared(smem + 16, 0xA5);  // garbage, like shared memory
      dynamic_shared_memory = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared.data()) + 15) / 16 * 16);
      run_threads(block.x, [&] { kernel(params); });
      std::fflush(nullptr);
      _exit(0);
    }
    children.push_back(pid);
  }
  bool ok = true;
  for (pid_t pid : children) {
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ok = false;
      if (WIFSIGNALED(status))
        std::fprintf(stderr, "emulated block (pid %d) died by signal %d%s\n", pid, WTERMSIG(status),
                     WTERMSIG(status) == SIGALRM ? " (watchdog: a barrier or shuffle was never completed)" : "");
    }
  }
  return ok ? cudaSuccess : cudaErrorLaunchFailure;
}

// An ordinary launch: blocks one after another in this process.
template <class... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args&&... args) const {
    std::vector<unsigned char> shared(smem + 16, 0xA5);  // garbage, like shared memory
    dynamic_shared_memory = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared.data()) + 15) / 16 * 16);
    grid_size = grid.x;
    grid_size_y = grid.y;
    block_size = block.x;
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned b = 0; b < grid.x; ++b) {
        block_index = b;
        block_index_y = y;
        run_threads(block.x, [&] { kernel(args...); });
      }
  }
};
template <class... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}

template <class T>
uint64_t to_bits(T v) {
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
inline Warp& my_warp() { return warps[thread_index / 32]; }
}  // namespace emu

#define threadIdx (uint3{emu::thread_index, 0, 0})
#define blockIdx (uint3{emu::block_index, emu::block_index_y, 0})
#define gridDim (uint3{emu::grid_size, emu::grid_size_y, 1})
#define blockDim (uint3{emu::block_size, 1, 1})

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __trap() { std::abort(); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

namespace emu {
// Every lane of the warp publishes `value`; each returns the value of lane source(lane)
// (its own value where source gives -1). Two barriers: all writes land before any read,
// all reads finish before the buffer is reused.
template <class T, class Source>
T exchange(T value, Source source) {
  Warp& w = my_warp();
  const int lane = static_cast<int>(thread_index & 31);
  w.lanes[lane] = to_bits(value);
  w.bar.arrive_and_wait();
  const int from = source(lane);
  const T out = from < 0 ? value : from_bits<T>(w.lanes[from]);
  w.bar.arrive_and_wait();
  return out;
}
}  // namespace emu

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return emu::exchange(value, [&](int lane) { return lane ^ lane_mask; });
}
template <class T>
T __shfl_sync(unsigned, T value, int source) {
  return emu::exchange(value, [&](int) { return source & 31; });
}
template <class T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  return emu::exchange(value, [&](int lane) { return lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : -1; });
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  emu::Warp& w = emu::my_warp();
  const unsigned lane = emu::thread_index & 31;
  w.lanes[lane] = predicate ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned out = 0;
  for (int i = 0; i < 32; ++i) out |= static_cast<unsigned>(w.lanes[i]) << i;
  w.bar.arrive_and_wait();
  return out;
}
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }

// Correctly rounded single operations (the harness is built without contracting a * b + c).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
template <class T> void __stcg(T* p, T v) { *p = v; }

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> ref(*address);
  unsigned long long old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::sms : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::smem_optin : 1;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= emu::smem_optin ? cudaSuccess : cudaErrorLaunchFailure;
}
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, F) {
  attributes->sharedSizeBytes = emu::static_shared_bytes;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F, int, size_t smem) {
  *blocks = smem + emu::static_shared_bytes <= static_cast<size_t>(emu::smem_optin) ? 1 : 0;
  return cudaSuccess;
}
