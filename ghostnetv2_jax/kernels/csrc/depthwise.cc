// Depthwise convolution for XLA:CPU as XLA FFI custom calls: forward, input gradient and kernel
// gradient, each one pass over memory. NHWC activations, (kh, kw, 1, C) kernels, explicit
// top/left padding (bottom/right padding is implied by the output size), any stride.
//
// Why: XLA:CPU lowers a grouped convolution to a slow generic loop, and the portable "shifted
// multiply-add" form in depthwise.py cannot reduce the kernel gradient without re-reading its
// inputs once per tap. Here every direction streams its inputs once, with the channel loop
// (contiguous in NHWC) vectorised, and rows spread over XLA's intra-op thread pool.
//
// Compiled with the other csrc/*.cc into one shared library by ghostnetv2_jax/kernels/build.py.
#include "depthwise.h"

namespace gnv2 {

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

namespace {

// Output columns ow whose input column ow * sw + j - pl lies in [0, w): [lo, hi).
inline void ValidRange(int64_t j, int64_t stride, int64_t pad, int64_t in, int64_t out,
                       int64_t* lo, int64_t* hi) {
  int64_t first = pad - j;  // smallest ow * stride allowed
  *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
  int64_t last = in - 1 + pad - j;  // largest ow * stride allowed
  *hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  if (*hi < *lo) *hi = *lo;
}

// acc[c] += a[c] * b[c], c < C: the generic rows' innermost loop; contiguous, so it vectorises.
inline void Fma(float* __restrict acc, const float* __restrict a, const float* __restrict b,
                int64_t c) {
#pragma GCC ivdep
  for (int64_t i = 0; i < c; ++i) acc[i] += a[i] * b[i];
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
// The same three row operations for the kernel sizes GhostNet uses (GNV2_SIZES), with the kernel
// size known at compile time: eight channels at a time, the taps (forward, input grad) or the
// per-tap sums (kernel grad) held in registers across a whole row, so each multiply-add costs one
// load and nothing is stored until the row is done. Blocks are eight channels, then four
// (ForEachBlock). The generic functions above serve other sizes and, for the gradients, the last
// C % 4; the forward handles its own (DepthwiseRowFrom, in depthwise.h).

// Input rows under each kernel row for output row `oh` of example `n` (nullptr: padding).
template <int KH>
inline void TapRows(const Geometry& g, const float* x, int64_t n, int64_t oh, const float* (&rows)[KH]) {
  for (int i = 0; i < KH; ++i) {
    const int64_t ih = oh * g.sh + i - g.pt;
    rows[i] = (ih >= 0 && ih < g.h) ? x + (n * g.h + ih) * g.w * g.c : nullptr;
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

// fn over `rows` rows of one output (a: its main input, b: the kernel), spread over the pool.
void RunRows(ffi::ThreadPool& pool, const Geometry& g, RowFn fn, const float* a, const float* b,
             float* out, int64_t rows, int64_t row_floats) {
  const int64_t grain = Grain(row_floats);
  ParallelFor(pool, Workers(pool, rows, grain), rows, grain, [&](int64_t lo, int64_t hi, int) {
    for (int64_t r = lo; r < hi; ++r) fn(g, a, b, out, r);
  }, g.n == 1);
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

// Output pixels whose products a float partial sum of the kernel gradient holds before it is
// added into a double accumulator. One example's sum runs over Ho * Wo pixels (12544 at 112x112):
// one float running over all of them drifts by ~sqrt(Ho * Wo) ulps of its running value (1e-6
// relative at ImageNet sizes, ten times the portable form's reduction of the same products);
// partials of at most 128 terms (a row at 112 wide, several rows of a small map) keep the float
// error at a few ulps, and the double additions cost under 1% of the products.
constexpr int64_t kFloatPixels = 128;

// Adds the kernel gradient of output rows [r0, r1) (rows of the whole batch) into dacc (kh*kw*C
// doubles): blocks of rows of at most kFloatPixels pixels are summed in float into part (kh*kw*C
// floats, the row functions' accumulator), then added in double. The blocks start at r0, so the
// result depends only on [r0, r1), never on which thread runs it.
void KernelGradRows(RowFn fn, const Geometry& g, const float* x, const float* dy, int64_t r0,
                    int64_t r1, float* part, double* dacc) {
  const int64_t taps = g.kh * g.kw * g.c;
  const int64_t block = std::max<int64_t>(1, kFloatPixels / std::max<int64_t>(1, g.wo));
  for (int64_t r = r0; r < r1; r += block) {
    std::fill(part, part + taps, 0.0f);
    const int64_t end = std::min(r1, r + block);
    for (int64_t q = r; q < end; ++q) fn(g, x, dy, part, q);
#pragma GCC ivdep
    for (int64_t i = 0; i < taps; ++i) dacc[i] += part[i];
  }
}

// x: (N, H, W, C), dy: (N, Ho, Wo, C) -> per-example kernel gradients (N, kh, kw, 1, C), which the
// caller sums: that keeps every op here independent per example, so a batch-sharded program
// partitions it like the other two. Each example's sum is accumulated in double (KernelGradRows)
// and rounded to float once. With enough examples each worker owns whole examples; otherwise the
// rows of one example are split into fixed chunks, each summed into its own double slot, and the
// slots are added in chunk order: the same result whichever worker ran which chunk.
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
  if (g.n == 0 || g.ho == 0 || g.wo == 0 || taps == 0) return ffi::Error::Success();
  const RowFn fn = PickGradKernel(g);
  const int pool_workers = static_cast<int>(pool.num_threads()) + 1;
  if (g.n >= 2 * pool_workers) {
    ParallelFor(pool, Workers(pool, g.n, 1), g.n, 1, [&](int64_t b, int64_t e, int) {
      std::vector<float> part(taps);
      std::vector<double> acc(taps);
      for (int64_t n = b; n < e; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0);
        KernelGradRows(fn, g, xp, gp, n * g.ho, (n + 1) * g.ho, part.data(), acc.data());
        float* o = out + n * taps;
        for (int64_t i = 0; i < taps; ++i) o[i] = static_cast<float>(acc[i]);
      }
    });
    return ffi::Error::Success();
  }
  const int64_t grain = Grain(g.wo * g.c);
  const int64_t chunks = (g.ho + grain - 1) / grain;
  const int workers = Workers(pool, g.ho, grain);
  std::vector<float> parts(static_cast<size_t>(workers) * taps);
  std::vector<double> slots(static_cast<size_t>(chunks) * taps);
  for (int64_t n = 0; n < g.n; ++n) {
    ParallelFor(pool, workers, g.ho, grain, [&](int64_t b, int64_t e, int worker) {
      // [b, e) starts at a multiple of grain (one chunk, or all of them on one worker): each
      // chunk k = [k * grain, (k + 1) * grain) goes to slot k, whichever worker claims it.
      for (int64_t r = b; r < e; r += grain) {
        double* slot = slots.data() + (r / grain) * taps;
        std::fill(slot, slot + taps, 0.0);
        KernelGradRows(fn, g, xp, gp, n * g.ho + r, n * g.ho + std::min(e, r + grain),
                       parts.data() + worker * taps, slot);
      }
    });
    float* o = out + n * taps;
    for (int64_t i = 0; i < taps; ++i) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += slots[k * taps + i];
      o[i] = static_cast<float>(sum);
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gnv2

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseForward, gnv2::ForwardImpl, GNV2_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseGradInput, gnv2::GradInputImpl, GNV2_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2DepthwiseGradKernel, gnv2::GradKernelImpl, GNV2_BINDING);
