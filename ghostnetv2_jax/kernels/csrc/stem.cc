// The stem conv for XLA:CPU at inference, as an XLA FFI custom call: a dense conv with few input
// channels (GhostNet's 3x3x3 stride-2 stem), its BatchNorm as a per-channel affine and the
// activation, in one pass:
//   out = act(conv(x, k) * s + b)          x: (N, H, W, Cin), k: (kh, kw, Cin, Cout)
//
// Compiled with the other csrc/*.cc into one shared library by ghostnetv2_jax/kernels/build.py.
#include "common.h"

namespace gnv2 {
namespace {

// XLA would run this conv as nine strided slices, a concatenation into patches (Cin = 3 in the minor
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
  }, g.n == 1);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gnv2

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2StemConv, gnv2::StemImpl,
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
