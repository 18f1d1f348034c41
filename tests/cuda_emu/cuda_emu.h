// A CPU emulation of the CUDA execution model, enough to run this project's CUDA kernels (csrc/*.cu)
// on CPU tensors in CI, where there is no GPU.  tests/cuda_emu/build.py rewrites a .cu file into a
// C++ file that includes this header first (launches become cuda_emu::launch calls, dynamic shared
// memory becomes a per-block buffer) and compiles it as a torch extension.
//
// Execution: the blocks of a launch run one after the other; the threads of a block run as fibers
// on the calling thread, switched only at the synchronisation points (__syncthreads and the warp
// shuffles), so the emulation is deterministic.  On x86-64 a fiber switch saves and loads the
// callee-saved registers and the stack pointer (a few nanoseconds; the kernels' block reductions
// make thousands of switches per block); elsewhere it is ucontext's swapcontext.  What it checks, beyond the results:
// - a __syncthreads that not every live thread of the block reaches, and a warp shuffle that not
//   all 32 lanes reach, is a hang on a GPU: here it is an error naming the kernel's launch;
// - shared memory, dynamic and static, is filled with NaN bytes before each block (reads of
//   unwritten shared memory show up in the results), and the dynamic buffer is guarded after its
//   end (an overrun is an error);
// - the launch limits of the real device: threads per block, grid size, and dynamic shared memory
//   against the limit the shim's cudaDeviceGetAttribute reports (cuda_emu::set_shared_limit).
// Not emulated: memory ordering between threads (fibers see each other's writes at once), warp
// lockstep outside the shuffles, atomics.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The per-block dynamic shared-memory limit the emulated device reports (48 KiB, as without opt-in
// on every recent GPU); tests lower it to drive the kernels' fallbacks.
inline int64_t& shared_limit() {
  static int64_t bytes = 48 * 1024;
  return bytes;
}
inline void set_shared_limit(int64_t bytes) { shared_limit() = bytes; }

// How many launches ran since load (tests check that a call launched what it should).
inline int64_t& launch_count() {
  static int64_t n = 0;
  return n;
}

namespace detail {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuard = 0xA5;

inline void fiber_main();

#if defined(__x86_64__)
// switch_stack(save, load): pushes the callee-saved registers, stores the stack pointer in *save,
// takes load as the stack pointer and pops the registers saved there (System V x86-64 ABI).
extern "C" void projkernels_emu_switch_stack(void** save, void* load);
asm(R"(
  .text
  .globl projkernels_emu_switch_stack
  .hidden projkernels_emu_switch_stack
  .type projkernels_emu_switch_stack, @function
projkernels_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size projkernels_emu_switch_stack, .-projkernels_emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};
// A fresh stack whose first switch "returns" into fiber_main as if it had been called.
inline void make_context(Context& c, std::vector<char>& stack) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                    // fiber_main's return address: it never returns
  *--sp = reinterpret_cast<void*>(&fiber_main);       // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp, rbx, r12-r15
  c.sp = sp;
}
inline void switch_context(Context& from, Context& to) { projkernels_emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t ctx;
};
inline void make_context(Context& c, std::vector<char>& stack) {
  getcontext(&c.ctx);
  c.ctx.uc_stack.ss_sp = stack.data();
  c.ctx.uc_stack.ss_size = stack.size();
  c.ctx.uc_link = nullptr;
  makecontext(&c.ctx, fiber_main, 0);
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.ctx, &to.ctx); }
#endif

struct Fiber {
  Context ctx;
  std::vector<char> stack;
  bool done = false;
  bool at_barrier = false;    // waiting at a __syncthreads of phase barrier_phase
  uint64_t barrier_phase = 0;
};

struct BlockState {
  dim3 grid, block, block_idx;
  unsigned n_threads = 0, current = 0, live = 0;
  std::vector<Fiber> fibers;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  // __syncthreads: arrivals in the current phase, and the phase number
  unsigned block_waiting = 0;
  uint64_t block_phase = 0;
  // warp barriers (the shuffles): the same per warp
  std::vector<unsigned> warp_waiting;
  std::vector<uint64_t> warp_phase;
  std::vector<uint64_t> shuffle;  // [warps * 32] lane values, 8 bytes each
  bool or_accum = false, or_result = false;  // __syncthreads_or of the current and the last phase
  uint64_t events = 0;            // arrivals, releases and exits: progress of the block
  std::vector<unsigned char> shared;
  size_t shared_bytes = 0;
  std::vector<std::pair<void*, size_t>> statics;  // the static __shared__ arrays met so far
  std::string error;
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}

inline void release_block(BlockState& s) {
  s.block_waiting = 0;
  s.or_result = s.or_accum;
  s.or_accum = false;
  ++s.block_phase;
}

inline void yield() {
  BlockState* s = state();
  switch_context(s->fibers[s->current].ctx, s->scheduler);
}

inline void fiber_main() {
  BlockState* s = state();
  try {
    (*s->body)();
  } catch (const std::exception& e) {
    if (s->error.empty()) s->error = e.what();
  } catch (...) {
    if (s->error.empty()) s->error = "a thread threw a non-standard exception";
  }
  s->fibers[s->current].done = true;
  --s->live;
  ++s->events;
  // A barrier that was waiting only for threads that have now exited is released.
  if (s->block_waiting > 0 && s->block_waiting == s->live) release_block(*s);
  switch_context(s->fibers[s->current].ctx, s->scheduler);  // never resumed
}

inline void run_block(BlockState& s, const char* what) {
  s.live = s.n_threads;
  s.block_waiting = 0;
  s.or_accum = s.or_result = false;
  std::fill(s.warp_waiting.begin(), s.warp_waiting.end(), 0u);
  for (unsigned t = 0; t < s.n_threads; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    f.at_barrier = false;
    make_context(f.ctx, f.stack);
  }
  // Warp-major: one warp runs as far as it can (its lanes switching at the shuffles) before the next
  // warp starts, so a warp that reads what another warp writes without a barrier in between reads it
  // unwritten (NaN in shared memory).  Blocks alternate the order of their warps, so both directions
  // of such a race are taken in any launch of two blocks or more.
  const unsigned warps = (s.n_threads + 31) / 32;
  const bool reverse = (s.block_idx.x + s.block_idx.y + s.block_idx.z) % 2 == 1;
  while (s.live > 0 && s.error.empty()) {
    const uint64_t sweep = s.events;
    for (unsigned k = 0; k < warps && s.error.empty(); ++k) {
      const unsigned w = reverse ? warps - 1 - k : k;
      const unsigned end = std::min(s.n_threads, (w + 1) * 32);
      for (uint64_t before = s.events - 1; before != s.events && s.error.empty();) {
        before = s.events;
        for (unsigned t = w * 32; t < end; ++t) {
          Fiber& f = s.fibers[t];
          if (f.done || (f.at_barrier && f.barrier_phase == s.block_phase)) continue;
          s.current = t;
          switch_context(s.scheduler, f.ctx);
        }
      }
    }
    if (s.error.empty() && s.live > 0 && s.events == sweep)
      s.error = std::string(what) + ": the block hangs: some threads wait at a __syncthreads or a warp shuffle "
                "that other threads of the block (or lanes of the warp) never reach";
  }
}

}  // namespace detail

inline dim3 to_dim3(dim3 d) { return d; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline dim3 to_dim3(T n) { return dim3(static_cast<unsigned>(n)); }

// The launch `kernel<<<grid, block, shared_bytes, stream>>>(args)` as build.py rewrites it: body is
// the kernel call, run by every thread of every block.
template <typename Grid, typename Block, typename Stream, typename Body>
void launch(const char* what, Grid grid_arg, Block block_arg, size_t shared_bytes, const Stream& /*stream*/, Body&& body) {
  const dim3 grid = to_dim3(grid_arg), block = to_dim3(block_arg);
  const uint64_t n_threads = uint64_t(block.x) * block.y * block.z;
  if (n_threads == 0 || n_threads > 1024 || block.z > 64)
    throw std::runtime_error(std::string(what) + ": invalid block size " + std::to_string(n_threads));
  if (grid.x == 0 || grid.y > 65535 || grid.z > 65535 || uint64_t(grid.x) > 2147483647ull)
    throw std::runtime_error(std::string(what) + ": invalid grid " + std::to_string(grid.x) + " x " +
                             std::to_string(grid.y) + " x " + std::to_string(grid.z));
  if (static_cast<int64_t>(shared_bytes) > shared_limit())
    throw std::runtime_error(std::string(what) + ": " + std::to_string(shared_bytes) +
                             " bytes of dynamic shared memory exceed the device's " +
                             std::to_string(shared_limit()) + " (CUDA: invalid argument)");
  ++launch_count();
  std::function<void()> fn = std::forward<Body>(body);
  detail::BlockState s;
  s.grid = grid;
  s.block = block;
  s.n_threads = static_cast<unsigned>(n_threads);
  s.fibers.resize(s.n_threads);
  for (auto& f : s.fibers) f.stack.resize(detail::kStackBytes);
  const unsigned warps = (s.n_threads + 31) / 32;
  s.warp_waiting.assign(warps, 0);
  s.warp_phase.assign(warps, 0);
  s.shuffle.assign(size_t(warps) * 32, 0);
  s.shared_bytes = shared_bytes;
  s.shared.resize(shared_bytes + detail::kGuardBytes);
  s.body = &fn;
  detail::BlockState* saved = detail::state();
  detail::state() = &s;
  for (unsigned z = 0; z < grid.z && s.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && s.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
        s.block_idx = dim3(x, y, z);
        std::memset(s.shared.data(), 0xFF, shared_bytes);  // NaN in every float type
        for (const auto& st : s.statics) std::memset(st.first, 0xFF, st.second);
        std::memset(s.shared.data() + shared_bytes, detail::kGuard, detail::kGuardBytes);
        detail::run_block(s, what);
        for (size_t i = 0; i < detail::kGuardBytes && s.error.empty(); ++i)
          if (s.shared[shared_bytes + i] != detail::kGuard)
            s.error = std::string(what) + ": block " + std::to_string(x) + " wrote past its " +
                      std::to_string(shared_bytes) + " bytes of dynamic shared memory";
      }
  detail::state() = saved;
  if (!s.error.empty()) throw std::runtime_error(s.error);
}

// A kernel's static __shared__ array, declared by every thread of every block (build.py adds the
// call after the declaration).  The first time it is met it is poisoned at once (no thread has
// written it yet: it is met at the first statement that declares it); launch() poisons every array
// met so far at the start of each later block, as it does the dynamic buffer.
inline void shared_static(void* p, size_t bytes) {
  detail::BlockState* s = detail::state();
  for (const auto& known : s->statics)
    if (known.first == p) return;
  s->statics.emplace_back(p, bytes);
  std::memset(p, 0xFF, bytes);
}

inline dim3 thread_idx() {
  const detail::BlockState* s = detail::state();
  const unsigned t = s->current;
  return dim3(t % s->block.x, (t / s->block.x) % s->block.y, t / (s->block.x * s->block.y));
}
inline dim3 block_idx() { return detail::state()->block_idx; }
inline dim3 block_dim() { return detail::state()->block; }
inline dim3 grid_dim() { return detail::state()->grid; }
inline unsigned char* dynamic_shared() { return detail::state()->shared.data(); }

inline void syncthreads() {
  detail::BlockState* s = detail::state();
  const uint64_t phase = s->block_phase;
  ++s->events;
  if (++s->block_waiting == s->live) {
    detail::release_block(*s);
    return;
  }
  detail::Fiber& f = s->fibers[s->current];
  f.at_barrier = true;  // the scheduler leaves it until the barrier opens
  f.barrier_phase = phase;
  while (s->block_phase == phase) detail::yield();
  f.at_barrier = false;
}

// __syncthreads_or: the barrier, and whether any thread of the block passed a non-zero predicate.
inline int syncthreads_or(int predicate) {
  detail::BlockState* s = detail::state();
  s->or_accum = s->or_accum || predicate != 0;
  syncthreads();
  return s->or_result ? 1 : 0;  // fixed until every thread has reached the next barrier
}

inline void warp_barrier() {
  detail::BlockState* s = detail::state();
  const unsigned w = s->current / 32;
  const unsigned lanes = std::min(32u, s->n_threads - w * 32);
  const uint64_t phase = s->warp_phase[w];
  ++s->events;
  if (++s->warp_waiting[w] == lanes) {
    s->warp_waiting[w] = 0;
    ++s->warp_phase[w];
    return;
  }
  while (s->warp_phase[w] == phase) detail::yield();
}

template <typename T>
T shfl_down_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  if (mask != 0xffffffffu) throw std::runtime_error("__shfl_down_sync: only full-warp masks are emulated");
  detail::BlockState* s = detail::state();
  const unsigned lane = s->current % 32, base = s->current - lane;
  std::memcpy(&s->shuffle[s->current], &v, sizeof(T));
  warp_barrier();  // every lane has written
  T out = v;
  if (lane + delta < 32 && base + lane + delta < s->n_threads) std::memcpy(&out, &s->shuffle[s->current + delta], sizeof(T));
  warp_barrier();  // every lane has read before the next shuffle writes
  return out;
}

}  // namespace cuda_emu

// The CUDA vocabulary the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
#define __syncthreads() ::cuda_emu::syncthreads()
#define __syncthreads_or(predicate) ::cuda_emu::syncthreads_or(predicate)
#define __align__(n) alignas(n)
#define __shfl_down_sync(mask, v, delta) ::cuda_emu::shfl_down_sync(mask, v, delta)
using cuda_emu::dim3;
// The 16-byte vector type of the kernels' wide copies.
struct alignas(16) int4 {
  int x, y, z, w;
};
