// The depthwise conv pieces that ghost_module.cc shares with depthwise.cc: the shape check of a
// depthwise conv and its row kernel for the compile-time kernel sizes (the strided ghost-module
// op ends in a depthwise conv, with its BatchNorm folded in as an affine).
#pragma once

#include "common.h"

#pragma GCC visibility push(hidden)

namespace gnv2 {

// x: (N, H, W, C); kernel: (kh, kw, 1, C); y: (N, Ho, Wo, C): checks the shapes and strides and
// fills *g. Defined in depthwise.cc.
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                        Geometry* g);

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

}  // namespace gnv2

#pragma GCC visibility pop
