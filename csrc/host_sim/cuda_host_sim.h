// Host simulation of the part of the CUDA execution model that the kernels of
// csrc/cuda/ms_deform_attn_kernels.cuh use, so that the tests can run those kernels on a
// CPU and check their logic without a GPU (tests/ops/test_cuda_kernels_on_host.py).
//
// A launch runs its blocks one after another. The threads of a block are fibers (ucontext)
// on the calling thread. A thread runs until it reaches a warp primitive (__shfl_*_sync,
// __syncwarp), __syncthreads, a failing DI_DEVICE_CHECK, or its end. When every lane named
// in a primitive's mask waits at that primitive, the lanes' values are exchanged as the
// hardware would and they continue: the 32 lanes of a warp progress together and shuffles
// carry real values between them, so a wrong lane index or a lane that skips a shuffle
// shows. The simulation is strict where CUDA leaves behaviour undefined or hangs: a lane of
// the mask that returns, waits at another primitive or with another mask, a mask without the
// caller, a shuffle from a lane outside the mask, and a deadlock are errors.
// atomicAdd is a plain addition (fibers never run at the same time); additions are counted.
//
// Include it after the PyTorch headers and before the kernels: it defines the CUDA keywords
// (__global__, __device__, ...) and builtins (threadIdx, ...) as macros.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

namespace di_maskdino {
namespace host_sim {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;

enum class Primitive { kShuffleXor, kShuffleDown, kShuffleUp, kShuffleIndex, kSyncWarp, kSyncThreads };
enum class State { kRunnable, kWaiting, kFinished, kTrapped };

inline const char* primitive_name(Primitive primitive) {
  switch (primitive) {
    case Primitive::kShuffleXor: return "__shfl_xor_sync";
    case Primitive::kShuffleDown: return "__shfl_down_sync";
    case Primitive::kShuffleUp: return "__shfl_up_sync";
    case Primitive::kShuffleIndex: return "__shfl_sync";
    case Primitive::kSyncWarp: return "__syncwarp";
    default: return "__syncthreads";
  }
}

struct Thread {
  ucontext_t context;
  dim3 index;
  State state = State::kRunnable;
  // the primitive it waits at
  Primitive primitive = Primitive::kSyncWarp;
  unsigned int mask = 0;
  int argument = 0;  // lane mask, delta or source lane
  int width = kWarpSize;
  size_t size = 0;  // bytes of the exchanged value
  uint64_t value = 0;
  uint64_t result = 0;
};

struct LaunchRecord {
  std::string description;
  int64_t blocks;
  int threads;
};

struct Simulator {
  int64_t grid_cap = 1 << 20;  // what the entry points take for "blocks resident on the GPU"
  int64_t atomic_adds = 0;
  std::vector<LaunchRecord> launches;
  // state of the running launch
  dim3 grid, block, block_index;
  std::vector<Thread> threads;
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string trap_message;
};

inline Simulator& simulator() {
  static thread_local Simulator instance;
  return instance;
}

inline Thread& current_thread() {
  Simulator& s = simulator();
  if (s.current < 0) {
    throw std::logic_error("host_sim: a CUDA builtin was used outside a simulated launch");
  }
  return s.threads[s.current];
}

inline void yield_to_scheduler() {
  Simulator& s = simulator();
  swapcontext(&s.threads[s.current].context, &s.scheduler);
}

inline std::string where(const Simulator& s, int thread) {
  return "block " + std::to_string(s.block_index.x) + ", thread " + std::to_string(thread) +
         " (warp " + std::to_string(thread / kWarpSize) + ", lane " +
         std::to_string(thread % kWarpSize) + ")";
}

// A failing device-side check: the thread stops here and the launch fails with `message`.
inline void trap(const char* message) {
  Simulator& s = simulator();
  s.trap_message = std::string(message) + " [device-side check failed in " + where(s, s.current) + "]";
  s.threads[s.current].state = State::kTrapped;
  yield_to_scheduler();
  std::abort();  // never resumed
}

template <typename T>
T wait_at(Primitive primitive, unsigned int mask, T value, int argument, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(uint64_t),
                "host_sim: warp primitives exchange trivially copyable values of at most 8 bytes");
  Thread& self = current_thread();
  self.primitive = primitive;
  self.mask = mask;
  self.argument = argument;
  self.width = width;
  self.size = sizeof(T);
  self.value = 0;
  std::memcpy(&self.value, &value, sizeof(T));
  self.state = State::kWaiting;
  yield_to_scheduler();
  T result;
  std::memcpy(&result, &current_thread().result, sizeof(T));
  return result;
}

inline void thread_main() {
  Simulator& s = simulator();
  (*s.body)();
  s.threads[s.current].state = State::kFinished;
  yield_to_scheduler();
  std::abort();  // never resumed
}

[[noreturn]] inline void fail(const std::string& message) {
  throw std::runtime_error("host_sim: " + message);
}

// Source lane of `lane` for a shuffle, or -1 when the lane keeps its own value.
inline int shuffle_source(const Thread& t, int lane) {
  const int width = t.width;
  const int segment = lane / width * width;
  switch (t.primitive) {
    case Primitive::kShuffleXor: {
      const int source = lane ^ t.argument;
      return (source >= kWarpSize || source / width > lane / width) ? -1 : source;
    }
    case Primitive::kShuffleDown:
      return lane % width + t.argument >= width ? -1 : lane + t.argument;
    case Primitive::kShuffleUp:
      return lane % width - t.argument < 0 ? -1 : lane - t.argument;
    case Primitive::kShuffleIndex:
      return segment + ((t.argument % width) + width) % width;
    default:
      return -1;
  }
}

// Completes the warp primitives whose lanes have all arrived; false if none could.
inline bool release_warps() {
  Simulator& s = simulator();
  const int count = static_cast<int>(s.threads.size());
  bool released = false;
  for (int first = 0; first < count; first += kWarpSize) {
    const int lanes = std::min(kWarpSize, count - first);
    for (int lane = 0; lane < lanes; ++lane) {
      const Thread& t = s.threads[first + lane];
      if (t.state != State::kWaiting || t.primitive == Primitive::kSyncThreads) {
        continue;
      }
      const auto at = [&] {
        return std::string(primitive_name(t.primitive)) + " in " + where(s, first + lane);
      };
      if (!(t.mask >> lane & 1u)) {
        fail(at() + ": the mask does not name the calling lane");
      }
      if (t.width <= 0 || t.width > kWarpSize || (t.width & (t.width - 1)) != 0) {
        fail(at() + ": width " + std::to_string(t.width) + " is not a power of two up to 32");
      }
      for (int other = 0; other < kWarpSize; ++other) {
        if (!(t.mask >> other & 1u)) {
          continue;
        }
        if (other >= lanes) {
          fail(at() + ": the mask names lane " + std::to_string(other) + ", which does not exist");
        }
        const Thread& u = s.threads[first + other];
        if (u.state == State::kFinished) {
          fail(at() + ": lane " + std::to_string(other) +
               " of the mask has returned (divergent warp primitive)");
        }
        if (u.state == State::kWaiting &&
            (u.primitive != t.primitive || u.mask != t.mask || u.size != t.size ||
             u.width != t.width)) {
          fail(at() + ": lane " + std::to_string(other) + " of the mask waits at " +
               primitive_name(u.primitive) + " with mask " + std::to_string(u.mask) +
               " instead (divergent warp primitive)");
        }
      }
    }
    // Every lane waits at a primitive whose mask has no stragglers: release them.
    for (int lane = 0; lane < lanes; ++lane) {
      Thread& t = s.threads[first + lane];
      if (t.state != State::kWaiting || t.primitive == Primitive::kSyncThreads) {
        continue;
      }
      if (t.primitive == Primitive::kSyncWarp) {
        t.result = 0;
        continue;
      }
      const int source = shuffle_source(t, lane);
      if (source < 0) {
        t.result = t.value;
        continue;
      }
      if (!(t.mask >> source & 1u)) {
        fail(std::string(primitive_name(t.primitive)) + " in " + where(s, first + lane) +
             ": reads lane " + std::to_string(source) + ", which is not in the mask");
      }
      t.result = s.threads[first + source].value;
    }
    for (int lane = 0; lane < lanes; ++lane) {
      Thread& t = s.threads[first + lane];
      if (t.state == State::kWaiting && t.primitive != Primitive::kSyncThreads) {
        t.state = State::kRunnable;
        released = true;
      }
    }
  }
  return released;
}

// Releases __syncthreads once every thread of the block waits at it.
inline bool release_block_barrier() {
  Simulator& s = simulator();
  int waiting = 0;
  for (const Thread& t : s.threads) {
    waiting += t.state == State::kWaiting && t.primitive == Primitive::kSyncThreads;
  }
  if (waiting == 0) {
    return false;
  }
  if (waiting != static_cast<int>(s.threads.size())) {
    fail("__syncthreads in block " + std::to_string(s.block_index.x) +
         " is not reached by every thread of the block");
  }
  for (Thread& t : s.threads) {
    t.state = State::kRunnable;
  }
  return true;
}

inline void run_block() {
  Simulator& s = simulator();
  for (size_t i = 0; i < s.threads.size(); ++i) {
    Thread& t = s.threads[i];
    t = Thread{};
    t.index = dim3(static_cast<unsigned int>(i));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks.get() + i * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_main, 0);
  }
  while (true) {
    for (size_t i = 0; i < s.threads.size(); ++i) {
      if (s.threads[i].state != State::kRunnable) {
        continue;
      }
      s.current = static_cast<int>(i);
      swapcontext(&s.scheduler, &s.threads[i].context);
      if (s.threads[i].state == State::kTrapped) {
        throw std::runtime_error(s.trap_message);
      }
    }
    bool finished = true;
    for (const Thread& t : s.threads) {
      finished = finished && t.state == State::kFinished;
    }
    if (finished) {
      return;
    }
    const bool released = release_warps() || release_block_barrier();
    if (!released) {
      fail("deadlock in block " + std::to_string(s.block_index.x) +
           ": threads wait at primitives that can never complete");
    }
  }
}

// Runs `body` (a call of the kernel) on a grid of `blocks` blocks of `threads` threads.
inline void launch(std::string description, int64_t blocks, int threads,
                   const std::function<void()>& body) {
  Simulator& s = simulator();
  if (s.body != nullptr) {
    fail("a launch inside a launch");
  }
  if (threads <= 0 || threads > 1024 || blocks <= 0 || blocks > INT32_MAX) {
    fail("bad launch configuration: " + std::to_string(blocks) + " blocks of " +
         std::to_string(threads) + " threads");
  }
  s.launches.push_back({std::move(description), blocks, threads});
  struct Reset {
    Simulator& s;
    ~Reset() {
      s.body = nullptr;
      s.current = -1;
      s.threads.clear();
      s.stacks.reset();
    }
  } reset{s};
  s.grid = dim3(static_cast<unsigned int>(blocks));
  s.block = dim3(static_cast<unsigned int>(threads));
  s.body = &body;
  s.threads.assign(threads, Thread{});
  s.stacks.reset(new char[kStackBytes * threads]);  // pages are touched only when used
  for (int64_t b = 0; b < blocks; ++b) {
    s.block_index = dim3(static_cast<unsigned int>(b));
    run_block();
  }
}

inline std::string describe(const char* kernel, int vector, int group, int levels, int points) {
  return std::string(kernel) + " V=" + std::to_string(vector) + " group=" +
         std::to_string(group) + " levels=" + std::to_string(levels) +
         " points=" + std::to_string(points);
}

}  // namespace host_sim
}  // namespace di_maskdino

// ---- CUDA keywords, builtins and intrinsics ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

#define threadIdx (::di_maskdino::host_sim::current_thread().index)
#define blockIdx (::di_maskdino::host_sim::simulator().block_index)
#define blockDim (::di_maskdino::host_sim::simulator().block)
#define gridDim (::di_maskdino::host_sim::simulator().grid)

#define DI_DEVICE_CHECK(cond, message)                \
  do {                                                \
    if (!(cond)) {                                    \
      ::di_maskdino::host_sim::trap(message);         \
    }                                                 \
  } while (0)

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
  return ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kShuffleXor, mask,
                                          var, lane_mask, width);
}

template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  return ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kShuffleDown, mask,
                                          var, static_cast<int>(delta), width);
}

template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  return ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kShuffleUp, mask,
                                          var, static_cast<int>(delta), width);
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int source_lane, int width = 32) {
  return ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kShuffleIndex, mask,
                                          var, source_lane, width);
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kSyncWarp, mask, 0, 0, 32);
}

inline void __syncthreads() {
  ::di_maskdino::host_sim::wait_at(::di_maskdino::host_sim::Primitive::kSyncThreads, 0u, 0, 0, 32);
}

inline float atomicAdd(float* address, float value) {
  ++::di_maskdino::host_sim::simulator().atomic_adds;
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  ++::di_maskdino::host_sim::simulator().atomic_adds;
  const double old = *address;
  *address = old + value;
  return old;
}
