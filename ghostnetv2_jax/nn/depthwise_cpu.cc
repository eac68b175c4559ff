// Depthwise convolution for XLA:CPU as XLA FFI custom calls: forward, input gradient and kernel
// gradient, each one pass over memory. NHWC activations, (kh, kw, 1, C) kernels, explicit
// top/left padding (bottom/right padding is implied by the output size), any stride.
//
// Why: XLA:CPU lowers a grouped convolution to a slow generic loop, and the portable "shifted
// multiply-add" form in depthwise.py cannot reduce the kernel gradient without re-reading its
// inputs once per tap. Here every direction streams its inputs once, with the channel loop
// (contiguous in NHWC) vectorised, and rows spread over XLA's intra-op thread pool.
//
// Built and loaded by ghostnetv2_jax/nn/depthwise_native.py; see that file for the contract.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c;     // input
  int64_t kh, kw;         // kernel
  int64_t sh, sw;         // strides
  int64_t pt, pl;         // top / left padding
  int64_t ho, wo;         // output
};

// Output columns ow whose input column ow * sw + j - pl lies in [0, w): [lo, hi).
inline void ValidRange(int64_t j, int64_t stride, int64_t pad, int64_t in, int64_t out,
                       int64_t* lo, int64_t* hi) {
  int64_t first = pad - j;  // smallest ow * stride allowed
  *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
  int64_t last = in - 1 + pad - j;  // largest ow * stride allowed
  *hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// acc[c] += a[c] * b[c], c < C: the innermost loop everywhere; contiguous, so it vectorises.
inline void Fma(float* __restrict acc, const float* __restrict a, const float* __restrict b,
                int64_t c) {
#pragma GCC ivdep
  for (int64_t i = 0; i < c; ++i) acc[i] += a[i] * b[i];
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

int Workers(ffi::ThreadPool& pool, int64_t total, int64_t grain) {
  int64_t chunks = (total + grain - 1) / grain;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, chunks)));
}

void ParallelFor(ffi::ThreadPool& pool, int workers, int64_t total, int64_t grain,
                 std::function<void(int64_t, int64_t, int)> body) {
  if (workers <= 1) {
    body(0, total, 0);
    return;
  }
  auto state = std::make_shared<ParallelState>();
  state->total = total;
  state->grain = grain;
  state->body = std::move(body);
  for (int t = 1; t < workers; ++t) {
    pool.Schedule([state] { state->Work(state->ids.fetch_add(1)); });
  }
  state->Work(0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == total; });
}

// Rows per chunk: about 64 KiB of output each, so chunks are few but still balance two cores.
int64_t Grain(int64_t row_floats) {
  return std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, row_floats));
}

// The generic row functions: the forward for kernel sizes without a blocked version below; the
// gradients also for the last C % 4 channels of those with one (from c0).

// Zeroes channels [c0, C) of `pixels` consecutive pixels.
inline void ZeroChannels(float* row, int64_t pixels, int64_t c, int64_t c0) {
  if (c0 == 0) {
    std::memset(row, 0, sizeof(float) * pixels * c);
    return;
  }
  for (int64_t p = 0; p < pixels; ++p) std::memset(row + p * c + c0, 0, sizeof(float) * (c - c0));
}

// out[n, oh, :, :] for one output row.
void ForwardRow(const Geometry& g, const float* x, const float* k, float* out, int64_t row) {
  const int64_t n = row / g.ho, oh = row % g.ho, c = g.c;
  float* o = out + row * g.wo * c;
  ZeroChannels(o, g.wo, c, 0);
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh + i - g.pt;
    if (ih < 0 || ih >= g.h) continue;
    const float* xr = x + (n * g.h + ih) * g.w * c;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* kk = k + (i * g.kw + j) * c;
      int64_t lo, hi;
      ValidRange(j, g.sw, g.pl, g.w, g.wo, &lo, &hi);
      for (int64_t ow = lo; ow < hi; ++ow)
        Fma(o + ow * c, xr + (ow * g.sw + j - g.pl) * c, kk, c);
    }
  }
}

// dx[n, ih, :, c0:] for one input row: gathers from the output rows it fed, so rows never collide.
void GradInputRow(const Geometry& g, const float* dy, const float* k, float* dx, int64_t row,
                  int64_t c0 = 0) {
  const int64_t n = row / g.h, ih = row % g.h, c = g.c;
  float* d = dx + row * g.w * c;
  ZeroChannels(d, g.w, c, c0);
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t t = ih + g.pt - i;  // = oh * sh
    if (t < 0 || t % g.sh != 0 || t / g.sh >= g.ho) continue;
    const float* gr = dy + (n * g.ho + t / g.sh) * g.wo * c;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* kk = k + (i * g.kw + j) * c;
      int64_t lo, hi;
      ValidRange(j, g.sw, g.pl, g.w, g.wo, &lo, &hi);
      for (int64_t ow = lo; ow < hi; ++ow)
        Fma(d + (ow * g.sw + j - g.pl) * c + c0, gr + ow * c + c0, kk + c0, c - c0);
    }
  }
}

// acc[i, j, c0:] += sum over one output row of tap_ij(x) * dy.
void GradKernelRow(const Geometry& g, const float* x, const float* dy, float* acc, int64_t row,
                   int64_t c0 = 0) {
  const int64_t n = row / g.ho, oh = row % g.ho, c = g.c;
  const float* gr = dy + row * g.wo * c;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh + i - g.pt;
    if (ih < 0 || ih >= g.h) continue;
    const float* xr = x + (n * g.h + ih) * g.w * c;
    for (int64_t j = 0; j < g.kw; ++j) {
      float* a = acc + (i * g.kw + j) * c;
      int64_t lo, hi;
      ValidRange(j, g.sw, g.pl, g.w, g.wo, &lo, &hi);
      for (int64_t ow = lo; ow < hi; ++ow)
        Fma(a + c0, xr + (ow * g.sw + j - g.pl) * c + c0, gr + ow * c + c0, c - c0);
    }
  }
}

// ----------------------------------------------------------------------------- blocked rows
// The same three row operations for the kernel sizes GhostNet uses, with the kernel size known at
// compile time: eight channels at a time, the taps (forward, input grad) or the per-tap sums
// (kernel grad) held in registers across a whole row, so each multiply-add costs one load and
// nothing is stored until the row is done. Blocks are eight channels, then four: GhostNet's
// widths are multiples of 4 (36, 12, 20, 60, ...), and a scalar remainder cost those layers as
// much as their vector part. The generic functions above serve other sizes and, for the
// gradients, the last C % 4; the forward handles its own (DepthwiseRowFrom).
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
#define GNV2_VEC(lanes) typename Lanes<decltype(lanes)::value>::V

// Output columns [lo, hi) for which every tap of a KW-wide kernel reads inside the input row.
inline void InteriorColumns(const Geometry& g, int64_t kw, int64_t* lo, int64_t* hi) {
  *lo = std::min(g.wo, (g.pl + g.sw - 1) / g.sw);
  const int64_t last = g.w - kw + g.pl;  // largest ow * sw allowed
  *hi = last < 0 ? *lo : std::max(*lo, std::min(g.wo, last / g.sw + 1));
}

// Input rows under each kernel row for output row `oh` of example `n` (nullptr: padding).
template <int KH>
inline void TapRows(const Geometry& g, const float* x, int64_t n, int64_t oh, const float* (&rows)[KH]) {
  for (int i = 0; i < KH; ++i) {
    const int64_t ih = oh * g.sh + i - g.pt;
    rows[i] = (ih >= 0 && ih < g.h) ? x + (n * g.h + ih) * g.w * g.c : nullptr;
  }
}

// One output row of the depthwise conv from the input rows under its kernel rows (xr, nullptr
// for padding), into o; with s and b (a BatchNorm's affine), stores conv * s + b.
template <int KH, int KW>
void DepthwiseRowFrom(const Geometry& g, const float* const (&xr)[KH], const float* k, float* o,
                      const float* s = nullptr, const float* b = nullptr) {
  const int64_t c = g.c;
  int64_t lo, hi;
  InteriorColumns(g, KW, &lo, &hi);
  const int64_t rest = ForEachBlock(c, [&](auto lanes, int64_t c0) {
    using V = GNV2_VEC(lanes);
    V kv[KH][KW];
    for (int i = 0; i < KH; ++i)
      for (int j = 0; j < KW; ++j) kv[i][j] = Load<V>(k + (i * KW + j) * c + c0);
    V sv = {}, bv = {};
    if (s) sv = Load<V>(s + c0), bv = Load<V>(b + c0);
    auto pixel = [&](int64_t ow, bool edge) __attribute__((always_inline)) {
      V acc[KH] = {};  // one chain per kernel row: independent multiply-adds overlap
      for (int i = 0; i < KH; ++i) {
        if (!xr[i]) continue;
        for (int j = 0; j < KW; ++j) {
          const int64_t iw = ow * g.sw + j - g.pl;
          if (edge && (iw < 0 || iw >= g.w)) continue;
          acc[i] += Load<V>(xr[i] + iw * c + c0) * kv[i][j];
        }
      }
      const V v = RowSum<KH>(acc);
      Store(o + ow * c + c0, s ? v * sv + bv : v);
    };
    for (int64_t ow = 0; ow < lo; ++ow) pixel(ow, true);
    for (int64_t ow = lo; ow < hi; ++ow) pixel(ow, false);
    for (int64_t ow = hi; ow < g.wo; ++ow) pixel(ow, true);
  });
  for (int64_t c0 = rest; c0 < c; ++c0)
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      float acc = 0.0f;
      for (int i = 0; i < KH; ++i) {
        if (!xr[i]) continue;
        for (int j = 0; j < KW; ++j) {
          const int64_t iw = ow * g.sw + j - g.pl;
          if (iw >= 0 && iw < g.w) acc += xr[i][iw * c + c0] * k[(i * KW + j) * c + c0];
        }
      }
      o[ow * c + c0] = s ? acc * s[c0] + b[c0] : acc;
    }
}

template <int KH, int KW>
void ForwardRowBlocked(const Geometry& g, const float* x, const float* k, float* out, int64_t row) {
  const float* xr[KH];
  TapRows<KH>(g, x, row / g.ho, row % g.ho, xr);
  DepthwiseRowFrom<KH, KW>(g, xr, k, out + row * g.wo * g.c);
}

// Gather form: dx[ih, iw] sums dy[oh, ow] * k[i, j] over the taps with ih = oh * sh + i - pt and
// iw = ow * sw + j - pl; SW is the column stride (1 or 2), known so the divisibility test is cheap.
template <int KH, int KW, int SW>
void GradInputRowBlocked(const Geometry& g, const float* dy, const float* k, float* dx, int64_t row) {
  const int64_t n = row / g.h, ih = row % g.h, c = g.c;
  const float* gr[KH];
  for (int i = 0; i < KH; ++i) {
    const int64_t t = ih + g.pt - i;
    gr[i] = (t >= 0 && t % g.sh == 0 && t / g.sh < g.ho) ? dy + (n * g.ho + t / g.sh) * g.wo * c : nullptr;
  }
  float* d = dx + row * g.w * c;
  const int64_t rest = ForEachBlock(c, [&](auto lanes, int64_t c0) {
    using V = GNV2_VEC(lanes);
    V kv[KH][KW];
    for (int i = 0; i < KH; ++i)
      for (int j = 0; j < KW; ++j) kv[i][j] = Load<V>(k + (i * KW + j) * c + c0);
    for (int64_t iw = 0; iw < g.w; ++iw) {
      V acc[KH] = {};
      for (int i = 0; i < KH; ++i) {
        if (!gr[i]) continue;
        for (int j = 0; j < KW; ++j) {
          const int64_t t = iw + g.pl - j;
          if (t < 0 || t % SW != 0 || t / SW >= g.wo) continue;
          acc[i] += Load<V>(gr[i] + (t / SW) * c + c0) * kv[i][j];
        }
      }
      Store(d + iw * c + c0, RowSum<KH>(acc));
    }
  });
  if (rest < c) GradInputRow(g, dy, k, dx, row, rest);
}

template <int KH, int KW>
void GradKernelRowBlocked(const Geometry& g, const float* x, const float* dy, float* acc, int64_t row) {
  const int64_t n = row / g.ho, oh = row % g.ho, c = g.c;
  const float* xr[KH];
  TapRows<KH>(g, x, n, oh, xr);
  const float* gr = dy + row * g.wo * c;
  int64_t lo, hi;
  InteriorColumns(g, KW, &lo, &hi);
  const int64_t rest = ForEachBlock(c, [&](auto lanes, int64_t c0) {
    using V = GNV2_VEC(lanes);
    V a[KH][KW];
    for (int i = 0; i < KH; ++i)
      for (int j = 0; j < KW; ++j) a[i][j] = Load<V>(acc + (i * KW + j) * c + c0);
    auto pixel = [&](int64_t ow, bool edge) __attribute__((always_inline)) {
      const V gv = Load<V>(gr + ow * c + c0);
      for (int i = 0; i < KH; ++i) {
        if (!xr[i]) continue;
        for (int j = 0; j < KW; ++j) {
          const int64_t iw = ow * g.sw + j - g.pl;
          if (edge && (iw < 0 || iw >= g.w)) continue;
          a[i][j] += Load<V>(xr[i] + iw * c + c0) * gv;
        }
      }
    };
    for (int64_t ow = 0; ow < lo; ++ow) pixel(ow, true);
    for (int64_t ow = lo; ow < hi; ++ow) pixel(ow, false);
    for (int64_t ow = hi; ow < g.wo; ++ow) pixel(ow, true);
    for (int i = 0; i < KH; ++i)
      for (int j = 0; j < KW; ++j) Store(acc + (i * KW + j) * c + c0, a[i][j]);
  });
  if (rest < c) GradKernelRow(g, x, dy, acc, row, rest);
}

using RowFn = void (*)(const Geometry&, const float*, const float*, float*, int64_t);

// The blocked row function for this kernel size (and column stride), else the generic one.
#define GNV2_SIZES(X) X(3, 3) X(5, 5) X(1, 5) X(5, 1)
RowFn PickForward(const Geometry& g) {
#define X(h, w) if (g.kh == h && g.kw == w) return ForwardRowBlocked<h, w>;
  GNV2_SIZES(X)
#undef X
  return [](const Geometry& g, const float* x, const float* k, float* o, int64_t r) { ForwardRow(g, x, k, o, r); };
}
RowFn PickGradInput(const Geometry& g) {
#define X(h, w)                                                            \
  if (g.kh == h && g.kw == w && g.sw == 1) return GradInputRowBlocked<h, w, 1>; \
  if (g.kh == h && g.kw == w && g.sw == 2) return GradInputRowBlocked<h, w, 2>;
  GNV2_SIZES(X)
#undef X
  return [](const Geometry& g, const float* dy, const float* k, float* d, int64_t r) { GradInputRow(g, dy, k, d, r); };
}
RowFn PickGradKernel(const Geometry& g) {
#define X(h, w) if (g.kh == h && g.kw == w) return GradKernelRowBlocked<h, w>;
  GNV2_SIZES(X)
#undef X
  return [](const Geometry& g, const float* x, const float* dy, float* a, int64_t r) { GradKernelRow(g, x, dy, a, r); };
}

// x: (N, H, W, C); kernel: (kh, kw, 1, C); y: (N, Ho, Wo, C).
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                        Geometry* g) {
  if (x.size() != 4 || kernel.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("depthwise: expected NHWC input/output and (kh, kw, 1, C) kernel");
  *g = Geometry{x[0], x[1], x[2], x[3], kernel[0], kernel[1], sh, sw, pt, pl, y[1], y[2]};
  if (kernel[2] != 1 || kernel[3] != g->c || y[0] != g->n || y[3] != g->c || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("depthwise: inconsistent shapes or strides");
  return ffi::Error::Success();
}

// fn over `rows` rows of one output (a: its main input, b: the kernel), spread over the pool.
void RunRows(ffi::ThreadPool& pool, const Geometry& g, RowFn fn, const float* a, const float* b,
             float* out, int64_t rows, int64_t row_floats) {
  const int64_t grain = Grain(row_floats);
  ParallelFor(pool, Workers(pool, rows, grain), rows, grain, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) fn(g, a, b, out, r);
  });
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pl) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  RunRows(pool, g, PickForward(g), x.typed_data(), kernel.typed_data(), y->typed_data(), g.n * g.ho,
          g.wo * g.c);
  return ffi::Error::Success();
}

// dy: (N, Ho, Wo, C), kernel: (kh, kw, 1, C) -> dx: (N, H, W, C).
ffi::Error GradInputImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                         ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx, int64_t sh,
                         int64_t sw, int64_t pt, int64_t pl) {
  Geometry g;
  if (auto e = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw, pt, pl, &g);
      e.failure())
    return e;
  RunRows(pool, g, PickGradInput(g), dy.typed_data(), kernel.typed_data(), dx->typed_data(),
          g.n * g.h, g.w * g.c);
  return ffi::Error::Success();
}

// x: (N, H, W, C), dy: (N, Ho, Wo, C) -> per-example kernel gradients (N, kh, kw, 1, C), which the
// caller sums: that keeps every op here independent per example, so a batch-sharded program
// partitions it like the other two. With enough examples each worker owns whole examples;
// otherwise the rows of one example are split and per-worker partial sums are added in order.
ffi::Error GradKernelImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt,
                          int64_t pl) {
  auto d = dk->dimensions();
  if (d.size() != 5) return ffi::Error::InvalidArgument("depthwise: per-example kernel grad must be 5-D");
  const int64_t kdims[4] = {d[1], d[2], d[3], d[4]};
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), ffi::Span<const int64_t>(kdims, 4), dy.dimensions(), sh,
                            sw, pt, pl, &g);
      e.failure())
    return e;
  if (d[0] != g.n) return ffi::Error::InvalidArgument("depthwise: kernel grad batch mismatch");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* out = dk->typed_data();
  const int64_t taps = g.kh * g.kw * g.c;
  std::memset(out, 0, sizeof(float) * g.n * taps);
  const RowFn fn = PickGradKernel(g);
  const int pool_workers = static_cast<int>(pool.num_threads()) + 1;
  if (g.n >= 2 * pool_workers) {
    ParallelFor(pool, Workers(pool, g.n, 1), g.n, 1, [&](int64_t b, int64_t e, int) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t r = n * g.ho; r < (n + 1) * g.ho; ++r) fn(g, xp, gp, out + n * taps, r);
    });
    return ffi::Error::Success();
  }
  const int64_t grain = Grain(g.wo * g.c);
  const int workers = Workers(pool, g.ho, grain);
  std::vector<float> acc(static_cast<size_t>(workers) * taps);
  for (int64_t n = 0; n < g.n; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    ParallelFor(pool, workers, g.ho, grain, [&](int64_t b, int64_t e, int worker) {
      for (int64_t r = b; r < e; ++r) fn(g, xp, gp, acc.data() + worker * taps, n * g.ho + r);
    });
    float* o = out + n * taps;
    for (int t = 0; t < workers; ++t)
      for (int64_t i = 0; i < taps; ++i) o[i] += acc[t * taps + i];
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- ghost module
// The cheap half of a ghost module at inference, in one pass. From the primary conv's output p
// (N, H, W, C) before its BatchNorm, and both BatchNorms as per-channel affines (s1, b1), (s2, b2):
//   out[..., :C]        = x1 = act(p * s1 + b1)
//   out[..., C:C+keep]  = act(dwconv(x1) * s2 + b2)[..., :keep]        (stride 1)
// which XLA would otherwise run as three passes over memory (x1, the conv, the concatenation).
// Each chunk of rows rebuilds the x1 rows it reads (its own plus kh - 1 halo rows) in scratch.
// The gated form also multiplies the result by an attention gate (N, H / fh, W / fw, C + keep)
// up-sampled by nearest neighbour (GhostNetV2's DFC), a fourth pass otherwise.
// The module form also runs the primary 1x1 conv: from the module's input x (N, H, W, Cin) and
// its kernel (Cin, C), p = x @ kernel is made row by row in scratch and never stored. For the
// narrow early layers that matmul is bound by memory, not arithmetic.
struct GhostArgs {
  const float *p, *s1, *b1, *k, *s2, *b2;
  float* out;
  int64_t cout;  // C + keep: the output's channel stride
  bool relu;
  const float* gate = nullptr;  // gated form only
  int64_t hg = 0, wg = 0, fh = 1, fw = 1;
  const float* primary = nullptr;  // module form only: p is then x, and cin its channels
  int64_t cin = 0;
  // strided form only: the depthwise conv after the module (kernel k, geometry g over the
  // module's output) and its BatchNorm's affine (s, b); its output is stored, the module's is not
  struct {
    const float *k = nullptr, *s = nullptr, *b = nullptr;
    Geometry g;
    float* out = nullptr;
  } dw;
};

inline float Act(float v, bool relu) { return relu ? std::max(v, 0.0f) : v; }

// Channels [c0, c0 + NB * L) of one x1 row of the module form, act((x_row @ primary) * s1 + b1):
// four pixels by NB vectors of results in registers, so each x value loaded is used NB times
// and each kernel vector four times.
template <int NB, int L>
void PrimaryBlocks(const GhostArgs& a, int64_t c, int64_t w, const float* xr, float* dst, int64_t c0) {
  using V = typename Lanes<L>::V;
  const int64_t cin = a.cin;
  const float* wp = a.primary + c0;
  V s1[NB], b1[NB];
  for (int j = 0; j < NB; ++j) s1[j] = Load<V>(a.s1 + c0 + j * L), b1[j] = Load<V>(a.b1 + c0 + j * L);
  const V zero = {};
  auto store = [&](float* o, const V (&acc)[NB]) __attribute__((always_inline)) {
    for (int j = 0; j < NB; ++j) {
      V v = acc[j] * s1[j] + b1[j];
      Store(o + j * L, a.relu ? (v > zero ? v : zero) : v);
    }
  };
  int64_t iw = 0;
  for (; iw + 4 <= w; iw += 4) {
    const float* xp = xr + iw * cin;
    V acc[4][NB] = {};
    for (int64_t k = 0; k < cin; ++k) {
      V wk[NB];
      for (int j = 0; j < NB; ++j) wk[j] = Load<V>(wp + k * c + j * L);
      for (int q = 0; q < 4; ++q) {
        const float xv = xp[q * cin + k];
        for (int j = 0; j < NB; ++j) acc[q][j] += xv * wk[j];
      }
    }
    for (int q = 0; q < 4; ++q) store(dst + (iw + q) * c + c0, acc[q]);
  }
  for (; iw < w; ++iw) {
    V acc[NB] = {};
    for (int64_t k = 0; k < cin; ++k)
      for (int j = 0; j < NB; ++j) acc[j] += xr[iw * cin + k] * Load<V>(wp + k * c + j * L);
    store(dst + iw * c + c0, acc);
  }
}

// One x1 row of the module form: 32 channels at a time, then the 8-channel blocks left, then 4,
// then single channels.
void PrimaryRow(const GhostArgs& a, int64_t c, int64_t w, const float* xr, float* dst) {
  int64_t c0 = 0;
  for (; c0 + 32 <= c; c0 += 32) PrimaryBlocks<4, 8>(a, c, w, xr, dst, c0);
  switch ((c - c0) / 8) {
    case 3: PrimaryBlocks<3, 8>(a, c, w, xr, dst, c0); c0 += 24; break;
    case 2: PrimaryBlocks<2, 8>(a, c, w, xr, dst, c0); c0 += 16; break;
    case 1: PrimaryBlocks<1, 8>(a, c, w, xr, dst, c0); c0 += 8; break;
    default: break;
  }
  if (c0 + 4 <= c) {
    PrimaryBlocks<1, 4>(a, c, w, xr, dst, c0);
    c0 += 4;
  }
  for (; c0 < c; ++c0)
    for (int64_t iw = 0; iw < w; ++iw) {
      float acc = 0.0f;
      for (int64_t k = 0; k < a.cin; ++k) acc += xr[iw * a.cin + k] * a.primary[k * c + c0];
      dst[iw * c + c0] = Act(acc * a.s1[c0] + a.b1[c0], a.relu);
    }
}

template <int KH, int KW>
void GhostRows(const Geometry& g, const GhostArgs& a, int64_t n, int64_t r0, int64_t r1,
               std::vector<float>& scratch, float* dst) {  // dst: output row r0
  const int64_t c = g.c, w = g.w, keep = a.cout - c;
  const int64_t first = std::max<int64_t>(0, r0 - g.pt), last = std::min(g.h, r1 - g.pt + KH - 1);
  scratch.resize(std::max<int64_t>(0, last - first) * w * c);
  for (int64_t ih = first; ih < last; ++ih) {  // x1 rows
    float* x1_row = scratch.data() + (ih - first) * w * c;
    if (a.primary) {
      PrimaryRow(a, c, w, a.p + (n * g.h + ih) * w * a.cin, x1_row);
      continue;
    }
    const float* src = a.p + (n * g.h + ih) * w * c;
    for (int64_t iw = 0; iw < w; ++iw)
#pragma GCC ivdep
      for (int64_t ch = 0; ch < c; ++ch)
        x1_row[iw * c + ch] = Act(src[iw * c + ch] * a.s1[ch] + a.b1[ch], a.relu);
  }
  int64_t lo, hi;
  InteriorColumns(g, KW, &lo, &hi);
  for (int64_t oh = r0; oh < r1; ++oh) {
    float* o = dst + (oh - r0) * w * a.cout;
    const float* own = scratch.data() + (oh - first) * w * c;
    // the gate's row for this output row; pixel ow reads its column ow / fw
    const float* gr = a.gate ? a.gate + (n * a.hg + oh / a.fh) * a.wg * a.cout : nullptr;
    auto gate_at = [&](int64_t ow) { return gr + (ow / a.fw) * a.cout; };
    if (gr) {
      for (int64_t iw = 0; iw < w; ++iw) {
        const float* gp = gate_at(iw);
#pragma GCC ivdep
        for (int64_t ch = 0; ch < c; ++ch) o[iw * a.cout + ch] = own[iw * c + ch] * gp[ch];
      }
    } else {
      for (int64_t iw = 0; iw < w; ++iw) std::memcpy(o + iw * a.cout, own + iw * c, sizeof(float) * c);
    }
    const float* xr[KH];
    for (int i = 0; i < KH; ++i) {
      const int64_t ih = oh + i - g.pt;
      xr[i] = (ih >= 0 && ih < g.h) ? scratch.data() + (ih - first) * w * c : nullptr;
    }
    int64_t c0 = ForEachBlock(keep, [&](auto lanes, int64_t c0) {
      using V = GNV2_VEC(lanes);
      V kv[KH][KW];
      for (int i = 0; i < KH; ++i)
        for (int j = 0; j < KW; ++j) kv[i][j] = Load<V>(a.k + (i * KW + j) * c + c0);
      const V s2 = Load<V>(a.s2 + c0), b2 = Load<V>(a.b2 + c0), zero = {};
      auto pixel = [&](int64_t ow, bool edge) __attribute__((always_inline)) {
        V acc[KH] = {};
        for (int i = 0; i < KH; ++i) {
          if (!xr[i]) continue;
          for (int j = 0; j < KW; ++j) {
            const int64_t iw = ow + j - g.pl;
            if (edge && (iw < 0 || iw >= w)) continue;
            acc[i] += Load<V>(xr[i] + iw * c + c0) * kv[i][j];
          }
        }
        V v = RowSum<KH>(acc) * s2 + b2;
        if (a.relu) v = v > zero ? v : zero;
        if (gr) v *= Load<V>(gate_at(ow) + c + c0);
        Store(o + ow * a.cout + c + c0, v);
      };
      for (int64_t ow = 0; ow < lo; ++ow) pixel(ow, true);
      for (int64_t ow = lo; ow < hi; ++ow) pixel(ow, false);
      for (int64_t ow = hi; ow < w; ++ow) pixel(ow, true);
    });
    for (; c0 < keep; ++c0)
      for (int64_t ow = 0; ow < w; ++ow) {
        float acc = 0.0f;
        for (int i = 0; i < KH; ++i) {
          if (!xr[i]) continue;
          for (int j = 0; j < KW; ++j) {
            const int64_t iw = ow + j - g.pl;
            if (iw >= 0 && iw < w) acc += xr[i][iw * c + c0] * a.k[(i * KW + j) * c + c0];
          }
        }
        const float v = Act(acc * a.s2[c0] + a.b2[c0], a.relu);
        o[ow * a.cout + c + c0] = gr ? v * gate_at(ow)[c + c0] : v;
      }
  }
}

using GhostFn = void (*)(const Geometry&, const GhostArgs&, int64_t, int64_t, int64_t, std::vector<float>&,
                         float*);
// Output rows [o0, o1) of image n in the strided form, depthwise kernel KH x KW: the module's
// rows under them go to `rows` (scratch), then the depthwise conv reads them there.
template <int KH, int KW>
void StridedRows(GhostFn fn, const Geometry& g, const GhostArgs& a, int64_t n, int64_t o0, int64_t o1,
                 std::vector<float>& scratch, std::vector<float>& rows) {
  const Geometry& d = a.dw.g;
  const int64_t r0 = std::max<int64_t>(0, o0 * d.sh - d.pt);
  const int64_t r1 = std::max(r0, std::min(g.h, (o1 - 1) * d.sh - d.pt + KH));  // rows of padding only
  rows.resize((r1 - r0) * g.w * a.cout);
  fn(g, a, n, r0, r1, scratch, rows.data());
  for (int64_t oh = o0; oh < o1; ++oh) {
    const float* xr[KH];
    for (int i = 0; i < KH; ++i) {
      const int64_t ih = oh * d.sh + i - d.pt;
      xr[i] = (ih >= 0 && ih < g.h) ? rows.data() + (ih - r0) * g.w * a.cout : nullptr;
    }
    DepthwiseRowFrom<KH, KW>(d, xr, a.dw.k, a.dw.out + (n * d.ho + oh) * d.wo * d.c, a.dw.s, a.dw.b);
  }
}
using StridedFn = void (*)(GhostFn, const Geometry&, const GhostArgs&, int64_t, int64_t, int64_t,
                           std::vector<float>&, std::vector<float>&);

inline bool PerChannel(const ffi::Buffer<ffi::F32>& b, int64_t c) {
  return b.element_count() == static_cast<size_t>(c);
}

// The strided form's depthwise conv: kernel (kh, kw, 1, C_out), its BatchNorm's affine, geometry.
struct StridedDw {
  ffi::Buffer<ffi::F32> k, s, b;
  int64_t sh, sw, pt, pl;
};

// `primary` (the module form): p is the module's input x and primary its 1x1 kernel (1, 1, Cin, C).
// `strided`: out is the output of this depthwise conv over the module's output.
ffi::Error GhostRun(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, const ffi::Buffer<ffi::F32>* primary,
                    ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                    ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2, const ffi::Buffer<ffi::F32>* gate,
                    ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu,
                    const StridedDw* strided = nullptr) {
  auto pd = p.dimensions();
  const auto kd = kernel.dimensions();
  auto od = out->dimensions();
  std::vector<int64_t> module_dims(od.begin(), od.end());
  if (strided && pd.size() == 4 && od.size() == 4) {  // the module's output: (N, H, W, C_out)
    module_dims[1] = pd[1], module_dims[2] = pd[2];
    od = ffi::Span<const int64_t>(module_dims.data(), module_dims.size());
  }
  std::vector<int64_t> x1_dims(pd.begin(), pd.end());
  int64_t cin = 0;
  if (primary) {
    const auto wd = primary->dimensions();
    if (pd.size() != 4 || wd.size() != 4 || wd[0] != 1 || wd[1] != 1 || wd[2] != pd[3])
      return ffi::Error::InvalidArgument("ghost module op: the primary kernel must be (1, 1, C_in, C)");
    cin = pd[3];
    x1_dims[3] = wd[3];
    pd = ffi::Span<const int64_t>(x1_dims.data(), x1_dims.size());
  }
  if (pd.size() != 4 || kd.size() != 4 || od.size() != 4 || kd[2] != 1 || kd[3] != pd[3] ||
      od[0] != pd[0] || od[1] != pd[1] || od[2] != pd[2] || od[3] < pd[3] || od[3] > 2 * pd[3] ||
      !PerChannel(s1, pd[3]) || !PerChannel(b1, pd[3]) || !PerChannel(s2, pd[3]) || !PerChannel(b2, pd[3]))
    return ffi::Error::InvalidArgument("ghost cheap op: inconsistent shapes");
  Geometry g{pd[0], pd[1], pd[2], pd[3], kd[0], kd[1], 1, 1, pt, pl, pd[1], pd[2]};
  if (g.h + 2 * pt - g.kh + 1 != g.h || g.w + 2 * pl - g.kw + 1 != g.w)
    return ffi::Error::InvalidArgument("ghost cheap op: padding must keep the spatial size");
  GhostFn fn = nullptr;
#define X(h, w) if (g.kh == h && g.kw == w) fn = GhostRows<h, w>;
  GNV2_SIZES(X)
#undef X
  if (!fn) return ffi::Error::InvalidArgument("ghost cheap op: unsupported kernel size");
  GhostArgs a{p.typed_data(), s1.typed_data(), b1.typed_data(), kernel.typed_data(),
              s2.typed_data(), b2.typed_data(), strided ? nullptr : out->typed_data(), od[3], relu != 0};
  StridedFn strided_rows = nullptr;
  if (strided) {
    Geometry& d = a.dw.g;
    if (auto e = MakeGeometry(od, strided->k.dimensions(), out->dimensions(), strided->sh, strided->sw,
                              strided->pt, strided->pl, &d);
        e.failure())
      return e;
    if (d.ho != (g.h + 2 * d.pt - d.kh) / d.sh + 1 || d.wo != (g.w + 2 * d.pl - d.kw) / d.sw + 1 ||
        !PerChannel(strided->s, d.c) || !PerChannel(strided->b, d.c))
      return ffi::Error::InvalidArgument("ghost strided op: inconsistent depthwise conv");
#define X(h, w) if (d.kh == h && d.kw == w) strided_rows = StridedRows<h, w>;
    GNV2_SIZES(X)
#undef X
    if (!strided_rows) return ffi::Error::InvalidArgument("ghost strided op: unsupported depthwise kernel size");
    a.dw.k = strided->k.typed_data(), a.dw.s = strided->s.typed_data(), a.dw.b = strided->b.typed_data();
    a.dw.out = out->typed_data();
  }
  if (gate) {  // (N, H / fh, W / fw, C + keep) with integer factors fh, fw
    const auto gd = gate->dimensions();
    if (gd.size() != 4 || gd[0] != g.n || gd[3] != od[3] || gd[1] < 1 || gd[2] < 1 ||
        g.h % gd[1] != 0 || g.w % gd[2] != 0)
      return ffi::Error::InvalidArgument("ghost cheap op: the gate must be (N, H / fh, W / fw, C_out)");
    a.gate = gate->typed_data();
    a.hg = gd[1], a.wg = gd[2], a.fh = g.h / gd[1], a.fw = g.w / gd[2];
  }
  if (primary) a.primary = primary->typed_data(), a.cin = cin;
  // Chunks of rows: the strided form's are its own output rows, about 16 of the module's rows
  // each; the module form recomputes kh - 1 halo rows of the matmul per chunk, so its are taller.
  const int64_t rows = strided ? a.dw.g.ho : g.h;
  const int64_t grain = strided ? std::max<int64_t>(1, 16 / a.dw.g.sh)
                        : primary ? std::max<int64_t>(Grain(g.w * od[3]), 8 * (g.kh - 1))
                                  : Grain(g.w * od[3]);
  const int64_t per_image = (rows + grain - 1) / grain;
  const int64_t chunks = g.n * per_image;
  ParallelFor(pool, Workers(pool, chunks, 1), chunks, 1, [&](int64_t b, int64_t e, int) {
    // Kept per thread: a malloc per chunk contends on one lock when glibc runs a single arena
    // (the bench's --malloc retain), measured -17% for the whole network at batch 32.
    thread_local std::vector<float> scratch, module_rows;
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = q / per_image, r0 = (q % per_image) * grain, r1 = std::min(rows, r0 + grain);
      if (strided)
        strided_rows(fn, g, a, n, r0, r1, scratch, module_rows);
      else
        fn(g, a, n, r0, r1, scratch, a.out + (n * g.h + r0) * g.w * a.cout);
    }
  });
  return ffi::Error::Success();
}

ffi::Error GhostImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> s1,
                     ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                     ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                     ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu) {
  return GhostRun(pool, p, nullptr, s1, b1, kernel, s2, b2, nullptr, out, pt, pl, relu);
}

ffi::Error GhostGatedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> s1,
                          ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                          ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                          ffi::Buffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> out,
                          int64_t pt, int64_t pl, int64_t relu) {
  return GhostRun(pool, p, nullptr, s1, b1, kernel, s2, b2, &gate, out, pt, pl, relu);
}

ffi::Error GhostModuleImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> primary,
                           ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                           ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                           ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu) {
  return GhostRun(pool, x, &primary, s1, b1, kernel, s2, b2, nullptr, out, pt, pl, relu);
}

ffi::Error GhostStridedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> primary,
                            ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                            ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> k3,
                            ffi::Buffer<ffi::F32> s3, ffi::Buffer<ffi::F32> b3, ffi::ResultBuffer<ffi::F32> out,
                            int64_t pt, int64_t pl, int64_t relu, int64_t sh, int64_t sw, int64_t dpt, int64_t dpl) {
  const StridedDw dw{k3, s3, b3, sh, sw, dpt, dpl};
  return GhostRun(pool, x, &primary, s1, b1, kernel, s2, b2, nullptr, out, pt, pl, relu, &dw);
}

ffi::Error GhostStridedGatedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> primary,
                                 ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                                 ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> gate,
                                 ffi::Buffer<ffi::F32> k3, ffi::Buffer<ffi::F32> s3, ffi::Buffer<ffi::F32> b3,
                                 ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu, int64_t sh,
                                 int64_t sw, int64_t dpt, int64_t dpl) {
  const StridedDw dw{k3, s3, b3, sh, sw, dpt, dpl};
  return GhostRun(pool, x, &primary, s1, b1, kernel, s2, b2, &gate, out, pt, pl, relu, &dw);
}

ffi::Error GhostModuleGatedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> primary,
                                ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                                ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> gate,
                                ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu) {
  return GhostRun(pool, x, &primary, s1, b1, kernel, s2, b2, &gate, out, pt, pl, relu);
}

// ----------------------------------------------------------------------------- stem
// A dense conv with few input channels (the 3x3x3 stride-2 stem) at inference, with its
// BatchNorm as a per-channel affine and the activation, in one pass:
//   out = act(conv(x, k) * s + b)          x: (N, H, W, Cin), k: (kh, kw, Cin, Cout)
// XLA would run it as nine strided slices, a concatenation into patches (Cin = 3 in the minor
// dimension), a matmul and a fused affine: five passes. Each output pixel here keeps all Cout
// accumulators in registers (NB blocks of 8) and broadcasts one input value per tap and channel.
struct StemArgs {
  const float *x, *k, *s, *b;
  float* out;
  bool relu;
};

// P output pixels of one row from column ow: the weights of each tap and input channel are
// loaded once for all P (EDGE: some taps fall in the padding and are skipped).
template <int NB, int P, bool EDGE>
inline void StemPixels(const Geometry& g, int64_t cout, const StemArgs& a, int64_t n, int64_t oh,
                       int64_t ow, float* o) {
  using V = Lanes<8>::V;
  const int64_t cin = g.c;
  V acc[P][NB] = {};
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh + i - g.pt;
    if (ih < 0 || ih >= g.h) continue;
    const float* xr = a.x + (n * g.h + ih) * g.w * cin;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* kp = a.k + (i * g.kw + j) * cin * cout;
      for (int64_t ci = 0; ci < cin; ++ci) {
        V wv[NB];
        for (int q = 0; q < NB; ++q) wv[q] = Load<V>(kp + ci * cout + 8 * q);
        for (int p = 0; p < P; ++p) {
          const int64_t iw = (ow + p) * g.sw + j - g.pl;
          if (EDGE && (iw < 0 || iw >= g.w)) continue;
          const float v = xr[iw * cin + ci];
          for (int q = 0; q < NB; ++q) acc[p][q] += v * wv[q];
        }
      }
    }
  }
  const V zero = {};
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < NB; ++q) {
      V r = acc[p][q] * Load<V>(a.s + 8 * q) + Load<V>(a.b + 8 * q);
      if (a.relu) r = r > zero ? r : zero;
      Store(o + (ow + p) * cout + 8 * q, r);
    }
}

// Cout = 8 * NB: every accumulator in registers, four pixels at a time inside the row.
template <int NB>
void StemRow(const Geometry& g, int64_t cout, const StemArgs& a, int64_t row) {
  const int64_t n = row / g.ho, oh = row % g.ho;
  float* o = a.out + row * g.wo * cout;
  int64_t lo, hi;
  InteriorColumns(g, g.kw, &lo, &hi);
  int64_t ow = 0;
  for (; ow < lo; ++ow) StemPixels<NB, 1, true>(g, cout, a, n, oh, ow, o);
  for (; ow + 4 <= hi; ow += 4) StemPixels<NB, 4, false>(g, cout, a, n, oh, ow, o);
  for (; ow < hi; ++ow) StemPixels<NB, 1, false>(g, cout, a, n, oh, ow, o);
  for (; ow < g.wo; ++ow) StemPixels<NB, 1, true>(g, cout, a, n, oh, ow, o);
}

// Any Cout: one channel at a time.
void StemRowGeneric(const Geometry& g, int64_t cout, const StemArgs& a, int64_t row) {
  const int64_t n = row / g.ho, oh = row % g.ho, cin = g.c;
  float* o = a.out + row * g.wo * cout;
  for (int64_t ow = 0; ow < g.wo; ++ow)
    for (int64_t co = 0; co < cout; ++co) {
      float acc = 0.0f;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh + i - g.pt;
        if (ih < 0 || ih >= g.h) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = ow * g.sw + j - g.pl;
          if (iw < 0 || iw >= g.w) continue;
          for (int64_t ci = 0; ci < cin; ++ci)
            acc += a.x[((n * g.h + ih) * g.w + iw) * cin + ci] * a.k[((i * g.kw + j) * cin + ci) * cout + co];
        }
      }
      o[ow * cout + co] = Act(acc * a.s[co] + a.b[co], a.relu);
    }
}

using StemFn = void (*)(const Geometry&, int64_t, const StemArgs&, int64_t);

ffi::Error StemImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                    ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t relu) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4 || kd[2] != xd[3] || od[0] != xd[0] ||
      od[3] != kd[3] || !PerChannel(s, kd[3]) || !PerChannel(b, kd[3]) || sh < 1 || sw < 1 ||
      pt < 0 || pl < 0)
    return ffi::Error::InvalidArgument("stem conv: inconsistent shapes or strides");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], sh, sw, pt, pl, od[1], od[2]};
  const int64_t cout = kd[3];
  StemFn fn = StemRowGeneric;
  if (cout == 8) fn = StemRow<1>;
  if (cout == 16) fn = StemRow<2>;
  if (cout == 24) fn = StemRow<3>;
  if (cout == 32) fn = StemRow<4>;
  const StemArgs a{x.typed_data(), kernel.typed_data(), s.typed_data(), b.typed_data(),
                   out->typed_data(), relu != 0};
  const int64_t rows = g.n * g.ho, grain = Grain(g.wo * cout);
  ParallelFor(pool, Workers(pool, rows, grain), rows, grain, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) fn(g, cout, a, r);
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- BatchNorm sums
// Training-mode BatchNorm's per-channel reductions over N, H, W, each one pass over its inputs
// (XLA ran them as separate elementwise and reduction passes). Results are per example, (N, 2, C),
// summed by the caller, so these partition over the batch like the convs. Accumulation is in
// double; the moments are shifted by the example's first pixel, so that the variance of a
// channel whose mean is large against its spread loses nothing to cancellation.

// Adds pixels [p0, p1) of one example (pixels of C channels at x) into s1, s2 (C each):
// s1 += x - shift, s2 += (x - shift)^2.
void MomentSums(const float* x, const float* shift, int64_t c, int64_t p0, int64_t p1, double* s1,
                double* s2) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* xp = x + p * c;
#pragma GCC ivdep
    for (int64_t i = 0; i < c; ++i) {
      const double d = static_cast<double>(xp[i]) - shift[i];
      s1[i] += d;
      s2[i] += d * d;
    }
  }
}

// Adds pixels [p0, p1) into sg += g, sgc += g * (x - mean).
void GradSums(const float* g, const float* x, const float* mean, int64_t c, int64_t p0, int64_t p1,
              double* sg, double* sgc) {
  for (int64_t p = p0; p < p1; ++p) {
    const float *gp = g + p * c, *xp = x + p * c;
#pragma GCC ivdep
    for (int64_t i = 0; i < c; ++i) {
      const double gv = gp[i];
      sg[i] += gv;
      sgc[i] += gv * (static_cast<double>(xp[i]) - mean[i]);
    }
  }
}

// For every example i: sums(i, p0, p1, a, b) adds its pixels [p0, p1) into double accumulators
// a, b (C each, zeroed first), then finish(i, a, b) writes the example's results. Whole examples
// per worker when there are enough (as GradKernelImpl); otherwise each example's pixels are
// split and per-worker partials are added in order.
template <typename Sums, typename Finish>
void PerExample(ffi::ThreadPool& pool, int64_t n, int64_t pixels, int64_t c, Sums sums, Finish finish) {
  const int pool_workers = static_cast<int>(pool.num_threads()) + 1;
  if (n >= 2 * pool_workers) {
    ParallelFor(pool, Workers(pool, n, 1), n, 1, [&](int64_t b, int64_t e, int) {
      std::vector<double> acc(2 * c);
      for (int64_t i = b; i < e; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0);
        sums(i, 0, pixels, acc.data(), acc.data() + c);
        finish(i, acc.data(), acc.data() + c);
      }
    });
    return;
  }
  const int64_t grain = Grain(c);
  const int workers = Workers(pool, pixels, grain);
  std::vector<double> acc(static_cast<size_t>(workers) * 2 * c);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    ParallelFor(pool, workers, pixels, grain, [&](int64_t b, int64_t e, int worker) {
      sums(i, b, e, acc.data() + worker * 2 * c, acc.data() + worker * 2 * c + c);
    });
    for (int t = 1; t < workers; ++t)
      for (int64_t j = 0; j < 2 * c; ++j) acc[j] += acc[t * 2 * c + j];
    finish(i, acc.data(), acc.data() + c);
  }
}

ffi::Error CheckSums(ffi::Span<const int64_t> x, ffi::Span<const int64_t> out) {
  if (x.size() != 4) return ffi::Error::InvalidArgument("batchnorm sums: input must be NHWC");
  if (out.size() != 3 || out[0] != x[0] || out[1] != 2 || out[2] != x[3])
    return ffi::Error::InvalidArgument("batchnorm sums: result must be (N, 2, C)");
  return ffi::Error::Success();
}

// x: (N, H, W, C) -> (N, 2, C): each example's channel mean and sum of squared deviations from
// it (the caller combines examples: Chan et al.'s pairwise update).
ffi::Error MomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  auto d = x.dimensions();
  if (auto e = CheckSums(d, out->dimensions()); e.failure()) return e;
  const int64_t n = d[0], pixels = d[1] * d[2], c = d[3];
  const float* xp = x.typed_data();
  float* o = out->typed_data();
  if (pixels == 0) {
    std::memset(o, 0, sizeof(float) * n * 2 * c);
    return ffi::Error::Success();
  }
  PerExample(
      pool, n, pixels, c,
      [&](int64_t i, int64_t p0, int64_t p1, double* s1, double* s2) {
        MomentSums(xp + i * pixels * c, xp + i * pixels * c, c, p0, p1, s1, s2);
      },
      [&](int64_t i, const double* s1, const double* s2) {
        const float* shift = xp + i * pixels * c;
        for (int64_t j = 0; j < c; ++j) {
          const double m1 = s1[j] / pixels;
          o[i * 2 * c + j] = static_cast<float>(shift[j] + m1);
          o[i * 2 * c + c + j] = static_cast<float>(std::max(0.0, s2[j] - s1[j] * m1));
        }
      });
  return ffi::Error::Success();
}

// g, x: (N, H, W, C), mean: (C) -> (N, 2, C): each example's sum(g) and sum(g * (x - mean)),
// the two reductions of BatchNorm's input gradient.
ffi::Error GradSumsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> out) {
  auto d = x.dimensions();
  if (auto e = CheckSums(d, out->dimensions()); e.failure()) return e;
  auto dg = g.dimensions();
  if (dg.size() != 4 || !std::equal(dg.begin(), dg.end(), d.begin()))
    return ffi::Error::InvalidArgument("batchnorm grad sums: g and x must have one shape");
  if (mean.dimensions().size() != 1 || mean.dimensions()[0] != d[3])
    return ffi::Error::InvalidArgument("batchnorm grad sums: mean must be (C)");
  const int64_t n = d[0], pixels = d[1] * d[2], c = d[3];
  const float *gp = g.typed_data(), *xp = x.typed_data(), *mp = mean.typed_data();
  float* o = out->typed_data();
  PerExample(
      pool, n, pixels, c,
      [&](int64_t i, int64_t p0, int64_t p1, double* sg, double* sgc) {
        GradSums(gp + i * pixels * c, xp + i * pixels * c, mp, c, p0, p1, sg, sgc);
      },
      [&](int64_t i, const double* sg, const double* sgc) {
        for (int64_t j = 0; j < c; ++j) {
          o[i * 2 * c + j] = static_cast<float>(sg[j]);
          o[i * 2 * c + c + j] = static_cast<float>(sgc[j]);
        }
      });
  return ffi::Error::Success();
}

}  // namespace

// Two f32 operands, one f32 result, the geometry as attributes.
#define GNV2_BINDING                                       \
  ffi::Ffi::Bind()                                         \
      .Ctx<ffi::ThreadPool>()                              \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Attr<int64_t>("stride_h")                           \
      .Attr<int64_t>("stride_w")                           \
      .Attr<int64_t>("pad_top")                            \
      .Attr<int64_t>("pad_left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseForward, ForwardImpl, GNV2_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseGradInput, GradInputImpl, GNV2_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseGradKernel, GradKernelImpl, GNV2_BINDING);

// The ghost op's operands: p (or x and the primary kernel), then both BatchNorms' affines
// around the depthwise kernel.
#define GNV2_GHOST_OPERANDS                                \
  GNV2_GHOST_AFFINES(ffi::Ffi::Bind()                      \
                         .Ctx<ffi::ThreadPool>()           \
                         .Arg<ffi::Buffer<ffi::F32>>())    /* p */
#define GNV2_GHOST_MODULE_OPERANDS                         \
  GNV2_GHOST_AFFINES(ffi::Ffi::Bind()                      \
                         .Ctx<ffi::ThreadPool>()           \
                         .Arg<ffi::Buffer<ffi::F32>>()     /* x */ \
                         .Arg<ffi::Buffer<ffi::F32>>())    /* primary kernel */
#define GNV2_GHOST_AFFINES(head)                           \
  head.Arg<ffi::Buffer<ffi::F32>>() /* s1 */               \
      .Arg<ffi::Buffer<ffi::F32>>() /* b1 */               \
      .Arg<ffi::Buffer<ffi::F32>>() /* kernel */           \
      .Arg<ffi::Buffer<ffi::F32>>() /* s2 */               \
      .Arg<ffi::Buffer<ffi::F32>>() /* b2 */
#define GNV2_GHOST_RESULT                                  \
  .Ret<ffi::Buffer<ffi::F32>>()                            \
      .Attr<int64_t>("pad_top")                            \
      .Attr<int64_t>("pad_left")                           \
      .Attr<int64_t>("relu")

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostCheap, GhostImpl, GNV2_GHOST_OPERANDS GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostCheapGated, GhostGatedImpl,
                              GNV2_GHOST_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* gate */ GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModule, GhostModuleImpl, GNV2_GHOST_MODULE_OPERANDS GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleGated, GhostModuleGatedImpl,
                              GNV2_GHOST_MODULE_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* gate */ GNV2_GHOST_RESULT);

// The strided form: the module form's operands [and gate], then the depthwise conv's kernel and
// affine; its stride and padding follow the module's attributes.
#define GNV2_STRIDED_DW                                      \
  .Arg<ffi::Buffer<ffi::F32>>()   /* depthwise kernel */   \
      .Arg<ffi::Buffer<ffi::F32>>() /* s3 */                 \
      .Arg<ffi::Buffer<ffi::F32>>() /* b3 */ GNV2_GHOST_RESULT \
      .Attr<int64_t>("dw_stride_h")                          \
      .Attr<int64_t>("dw_stride_w")                          \
      .Attr<int64_t>("dw_pad_top")                           \
      .Attr<int64_t>("dw_pad_left")
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleStrided, GhostStridedImpl, GNV2_GHOST_MODULE_OPERANDS GNV2_STRIDED_DW);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleStridedGated, GhostStridedGatedImpl,
                              GNV2_GHOST_MODULE_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* gate */ GNV2_STRIDED_DW);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2StemConv, StemImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2BatchNormMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2BatchNormGradSums, GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());
