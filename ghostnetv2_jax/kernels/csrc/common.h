// Shared by the XLA:CPU FFI kernels in this directory: the NHWC conv geometry, a parallel-for
// over XLA's intra-op thread pool, GCC vector-lane loads and stores, and small per-channel
// helpers. Everything here is internal to the shared library (hidden visibility); only the
// Gnv2* handler symbols defined in the .cc files are exported.
//
// Every csrc/*.cc is compiled into one shared library by ghostnetv2_jax/kernels/build.py.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include <sched.h>

namespace ffi = xla::ffi;

#pragma GCC visibility push(hidden)

namespace gnv2 {

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw;         // kernel
  int64_t sh, sw;         // strides
  int64_t pt, pl;         // top / left padding
  int64_t ho, wo;         // output
};

// Output columns [lo, hi) for which every tap of a KW-wide kernel reads inside the input row.
inline void InteriorColumns(const Geometry& g, int64_t kw, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.wo, (g.pl + g.sw - 1) / g.sw);
  const int64_t last = g.w - kw + g.pl;  // largest ow * sw allowed
  *hi = last < 0 ? *lo : std::max(*lo, std::min(g.wo, last / g.sw + 1));
}

// Runs body(begin, end, worker) over [0, total) in chunks of `grain`, on the calling thread plus
// the XLA intra-op pool. Chunks are claimed from a shared counter, so a pool task that starts
// late (every thread busy elsewhere) finds nothing left and returns at once; the caller waits
// only for chunks already claimed, which are running, so this cannot deadlock. `worker` is in
// [0, workers) and no two concurrent calls share one, for per-worker accumulators.
struct ParallelState {
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> ids{1};
  int64_t total = 0, grain = 1;
  std::function<void(int64_t, int64_t, int)> body;
  std::mutex mu;
  std::condition_variable cv;

  void Work(int worker) {
    for (;;) {
      int64_t begin = next.fetch_add(grain);
      if (begin >= total) return;
      int64_t end = std::min(total, begin + grain);
      body(begin, end, worker);
      if (done.fetch_add(end - begin) + (end - begin) == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

inline int Workers(ffi::ThreadPool& pool, int64_t total, int64_t grain) {
  int64_t chunks = (total + grain - 1) / grain;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, chunks)));
}

// Threads of this library for the ops on one image, which take a few to a few hundred
// microseconds: XLA's pool parks an idle thread, and waking one costs about as much as such an
// op, so a parked pool gives these ops nothing. A helper spins (with `pause`, yielding the core
// every kYieldMicros) for kSpinMicros after its last task, so the next op starts on it at once,
// then sleeps until posted to. Used
// only for one image: with a batch, XLA runs two chunks of it at once on its own threads, and a
// spinning third thread would take their cores (a chunk claimed by a preempted helper holds up
// its op for a time slice).
// A spin-wait's pause: lets the core's other hardware thread run and saves power.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The cores this process may run on.
inline int UsableCores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

class Helpers {
 public:
  static constexpr int kSpinMicros = 200;
  static constexpr int kYieldMicros = 25;

  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads outlive main's return
    return *helpers;
  }
  // Hands `state` to an idle helper; false if none is idle (the caller then uses XLA's pool).
  // After a fork the helpers are gone: a post to one is never taken, the caller claims every
  // chunk itself, and that slot stays taken, so later posts fall back to the pool.
  bool Post(const std::shared_ptr<ParallelState>& state) {
    for (auto& slot : slots_) {
      std::unique_lock<std::mutex> lock(slot->mu, std::try_to_lock);
      if (!lock.owns_lock() || slot->job || slot->busy) continue;
      slot->job = state;
      slot->pending.store(true, std::memory_order_release);
      if (slot->sleeping) slot->cv.notify_one();
      return true;
    }
    return false;
  }
  int size() const { return static_cast<int>(slots_.size()); }

 private:
  struct Slot {
    std::mutex mu;
    std::condition_variable cv;
    std::shared_ptr<ParallelState> job;
    std::atomic<bool> pending{false};
    bool busy = false, sleeping = false;
  };

  Helpers() {   // one per usable core but the caller's
    for (int i = 1; i < UsableCores(); ++i) slots_.push_back(std::make_unique<Slot>());
    for (auto& slot : slots_) std::thread([s = slot.get()] { Loop(s); }).detach();
  }

  static void Loop(Slot* s) {
    using Clock = std::chrono::steady_clock;
    auto last = Clock::now();
    Clock::duration yielded{};
    for (;;) {
      if (!s->pending.load(std::memory_order_acquire)) {
        const auto idle = Clock::now() - last;
        if (idle < std::chrono::microseconds(kSpinMicros)) {
          for (int i = 0; i < 16; ++i) CpuRelax();
          // Every kYieldMicros, the core goes to any other thread waiting for it (another
          // process's, or XLA's): a spinning helper then costs others a syscall, not a time slice.
          if (idle - yielded >= std::chrono::microseconds(kYieldMicros)) {
            sched_yield();
            yielded = idle;
          }
          continue;
        }
        std::unique_lock<std::mutex> lock(s->mu);
        s->sleeping = true;
        s->cv.wait(lock, [&] { return s->job != nullptr; });
        s->sleeping = false;
      }
      std::shared_ptr<ParallelState> job;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        job = std::move(s->job);
        s->pending.store(false, std::memory_order_relaxed);
        s->busy = job != nullptr;
      }
      if (job) job->Work(job->ids.fetch_add(1));
      {
        std::lock_guard<std::mutex> lock(s->mu);
        s->busy = false;
      }
      last = Clock::now();
      yielded = Clock::duration{};
    }
  }

  std::vector<std::unique_ptr<Slot>> slots_;
};

// `one_image`: the op is on a single image (latency-bound); its other workers are the spinning
// helpers where idle ones are left, and XLA's pool otherwise.
inline void ParallelFor(ffi::ThreadPool& pool, int workers, int64_t total, int64_t grain,
                        std::function<void(int64_t, int64_t, int)> body, bool one_image = false) {
  if (workers <= 1) {
    body(0, total, 0);
    return;
  }
  auto state = std::make_shared<ParallelState>();
  state->total = total;
  state->grain = grain;
  state->body = std::move(body);
  int posted = 1;
  if (one_image) {
    Helpers& helpers = Helpers::Get();
    while (posted < workers && posted <= helpers.size() && helpers.Post(state)) ++posted;
  }
  for (int t = posted; t < workers; ++t) {
    pool.Schedule([state] { state->Work(state->ids.fetch_add(1)); });
  }
  state->Work(0);
  if (posted > 1) {   // the chunks still running are on awake helpers: wait for them spinning
    for (int i = 0; i < (1 << 16) && state->done.load(std::memory_order_acquire) != total; ++i)
      CpuRelax();
  }
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == total; });
}

// Rows per chunk: about 64 KiB of output each, so chunks are few but still balance two cores.
inline int64_t Grain(int64_t row_floats) {
  return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, row_floats));
}

// A GCC vector of L floats (8 or 4 here).
template <int L>
struct Lanes {
  typedef float V __attribute__((vector_size(L * sizeof(float))));
};

// Unaligned by construction (memcpy compiles to one unaligned vector move): rows start at any
// multiple of C floats.
template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }

template <int KH, typename V>
inline V RowSum(const V (&acc)[KH]) {
  V sum = acc[0];
  for (int i = 1; i < KH; ++i) sum += acc[i];
  return sum;
}

// Calls block(lanes, c0) for 8-channel blocks, then one 4-channel block if 4 or more are left;
// returns the first channel not covered. `lanes` is std::integral_constant<int, 8 or 4>.
// Blocks are eight channels, then four: GhostNet's widths are multiples of 4 (36, 12, 20, 60, ...),
// and a scalar remainder would cost those layers as much as their vector part.
template <typename F>
inline int64_t ForEachBlock(int64_t c, F&& block) {
  int64_t c0 = 0;
  for (; c0 + 8 <= c; c0 += 8) block(std::integral_constant<int, 8>{}, c0);
  if (c0 + 4 <= c) {
    block(std::integral_constant<int, 4>{}, c0);
    c0 += 4;
  }
  return c0;
}
// The vector type for a ForEachBlock block's `lanes`.
#define GNV2_VEC(lanes) typename Lanes<decltype(lanes)::value>::V

// The kernel sizes GhostNet uses, which have row functions with the size known at compile time:
// X(kh, kw) for each.
#define GNV2_SIZES(X) X(3, 3) X(5, 5) X(1, 5) X(5, 1)

// The activation after a BatchNorm: ReLU or none.
inline float Act(float v, bool relu) { return relu ? std::max(v, 0.0f) : v; }

// Whether b holds one value per channel of c.
inline bool PerChannel(const ffi::Buffer<ffi::F32>& b, int64_t c) {
  return b.element_count() == static_cast<size_t>(c);
}

}  // namespace gnv2

#pragma GCC visibility pop
