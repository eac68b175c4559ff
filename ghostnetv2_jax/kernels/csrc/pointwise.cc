// The 1x1 convolution for XLA:CPU at inference, as an XLA FFI custom call: a matmul over the
// channels of every pixel, with the conv's bias (or a folded BatchNorm's) and the activation
// applied while the results are still in registers:
//   out[p, :] = act(x[p, :] @ k + b)        x: (N, H, W, Cin), k: (Cin, Cout), b: (Cout,)
//
// XLA hands such a matmul to YNNPACK, which runs it on one thread at the sizes of a single
// image (a 7x7 or 14x14 map: a few dozen to a few hundred rows); here the output's tiles are
// spread over both cores at every size. The tile is 7 pixels by 48 channels (21 16-lane
// accumulators), with narrower tiles for the last channels: each input value loaded feeds three
// vector multiply-adds, each kernel vector seven. Each output element is summed in the same
// order whatever the tiling or the threads, so the result is deterministic.
//
// Compiled with the other csrc/*.cc into one shared library by ghostnetv2_jax/kernels/build.py.
#include "common.h"

namespace gnv2 {
namespace {

struct PointwiseArgs {
  const float *x, *k, *b;
  float* out;
  int64_t cin, cout;
  bool relu;
};

constexpr int64_t kDepth = 64;   // input channels summed in registers before adding to the output

// Rows [r, r + MR) x channels [c0, c0 + NB * L). The sum over Cin is taken kDepth channels at a
// time in registers, each partial sum added to the output (started at the bias): a float32 sum
// over K terms in one accumulator strays ~sqrt(K) roundings from the exact sum, and 960 input
// channels put that at 3x XLA's matmul's distance from float64; in blocks it is within XLA's.
template <int MR, int NB, int L>
inline void Tile(const PointwiseArgs& a, int64_t r, int64_t c0) {
  using V = typename Lanes<L>::V;
  V sum[MR][NB];
  for (int j = 0; j < NB; ++j) {
    const V bj = Load<V>(a.b + c0 + j * L);
    for (int i = 0; i < MR; ++i) sum[i][j] = bj;
  }
  const float* xr = a.x + r * a.cin;
  const float* kp = a.k + c0;
  float* o = a.out + r * a.cout + c0;
  for (int64_t t0 = 0; t0 < a.cin; t0 += kDepth) {
    const int64_t t1 = std::min(a.cin, t0 + kDepth);
    V acc[MR][NB] = {};
    for (int64_t t = t0; t < t1; ++t) {
      V kt[NB];
      for (int j = 0; j < NB; ++j) kt[j] = Load<V>(kp + t * a.cout + j * L);
      for (int i = 0; i < MR; ++i) {
        const float xv = xr[i * a.cin + t];
        for (int j = 0; j < NB; ++j) acc[i][j] += xv * kt[j];
      }
    }
    // The running sums live in the output between blocks (the registers hold one block's).
    const bool first = t0 == 0, last = t1 == a.cin;
    const V zero = {};
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NB; ++j) {
        float* oij = o + i * a.cout + j * L;
        V v = (first ? sum[i][j] : Load<V>(oij)) + acc[i][j];
        if (last && a.relu) v = v > zero ? v : zero;
        Store(oij, v);
      }
  }
}

// Rows [r, r + MR) x channels [c0, c1), c1 - c0 <= 48: one tile per vector width that fits,
// then single channels.
template <int MR>
inline void Columns(const PointwiseArgs& a, int64_t r, int64_t c0, int64_t c1) {
  int64_t c = c0;
  if (c + 48 <= c1) Tile<MR, 3, 16>(a, r, c), c += 48;
  if (c + 32 <= c1) Tile<MR, 2, 16>(a, r, c), c += 32;
  if (c + 16 <= c1) Tile<MR, 1, 16>(a, r, c), c += 16;
  if (c + 8 <= c1) Tile<MR, 1, 8>(a, r, c), c += 8;
  if (c + 4 <= c1) Tile<MR, 1, 4>(a, r, c), c += 4;
  for (; c < c1; ++c)
    for (int i = 0; i < MR; ++i) {
      float total = a.b[c];
      for (int64_t t0 = 0; t0 < a.cin; t0 += kDepth) {
        float acc = 0.0f;
        for (int64_t t = t0; t < std::min(a.cin, t0 + kDepth); ++t)
          acc += a.x[(r + i) * a.cin + t] * a.k[t * a.cout + c];
        total += acc;
      }
      a.out[(r + i) * a.cout + c] = a.relu && total < 0.0f ? 0.0f : total;
    }
}

constexpr int64_t kRows = 14;     // rows of a work unit: two 7-row tiles
constexpr int64_t kColumns = 48;  // channels of a work unit: one full tile's width

// One work unit: rows [r0, r1) x channels [c0, c1), in 7-row tiles and then single rows.
inline void Unit(const PointwiseArgs& a, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  int64_t r = r0;
  for (; r + 7 <= r1; r += 7) Columns<7>(a, r, c0, c1);
  for (; r < r1; ++r) Columns<1>(a, r, c0, c1);
}

ffi::Error PointwiseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                         ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out, int64_t relu) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 2 || od.size() != 4 || kd[0] != xd[3] || od[3] != kd[1] ||
      od[0] != xd[0] || od[1] != xd[1] || od[2] != xd[2] || !PerChannel(b, kd[1]))
    return ffi::Error::InvalidArgument("pointwise conv: inconsistent shapes");
  const PointwiseArgs a{x.typed_data(), kernel.typed_data(), b.typed_data(), out->typed_data(),
                        kd[0], kd[1], relu != 0};
  const int64_t rows = xd[0] * xd[1] * xd[2];
  const int64_t row_units = (rows + kRows - 1) / kRows, col_units = (a.cout + kColumns - 1) / kColumns;
  const int64_t units = row_units * col_units;
  // Units in row-major order: consecutive units share their input rows (kept in L1) and walk the
  // kernel's columns (kept in L2). About 64k multiply-adds per claimed chunk.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, kRows * kColumns * a.cin));
  ParallelFor(pool, Workers(pool, units, grain), units, grain, [&](int64_t lo, int64_t hi, int) {
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t r0 = (u / col_units) * kRows, c0 = (u % col_units) * kColumns;
      Unit(a, r0, std::min(rows, r0 + kRows), c0, std::min(a.cout, c0 + kColumns));
    }
  }, xd[0] == 1);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gnv2

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2Pointwise, gnv2::PointwiseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel (Cin, Cout)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu"));

