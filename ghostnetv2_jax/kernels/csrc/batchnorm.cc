// Training-mode BatchNorm's per-channel reductions for XLA:CPU, as XLA FFI custom calls: each
// example's channel means and sums of squared deviations (the moments), and each example's two
// sums of BatchNorm's input gradient.
//
// Compiled with the other csrc/*.cc into one shared library by ghostnetv2_jax/kernels/build.py.
#include "common.h"

namespace gnv2 {
namespace {

// The reductions run over N, H, W, each in one pass over its inputs (XLA ran them as separate
// elementwise and reduction passes). Results are per example, (N, 2, C), summed by the caller, so
// these partition over the batch like the convs. Accumulation is in
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
// per worker when there are enough (as the depthwise kernel gradient in depthwise.cc); otherwise
// each example's pixels are split and per-worker partials are added in order.
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
}  // namespace gnv2

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2BatchNormMoments, gnv2::MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2BatchNormGradSums, gnv2::GradSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());
