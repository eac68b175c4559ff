// Fused ghost-module ops for XLA:CPU at inference, as XLA FFI custom calls: a whole ghost module
// (x1 = act(BN(primary conv)), then the cheap operation, a stride-1 depthwise conv of x1 with its
// own BatchNorm and activation, and their concatenation) in one pass over memory. Forms: from the
// primary conv's output (AfterPrimary), or also running the primary 1x1 conv (Module); each
// optionally multiplied by GhostNetV2's DFC attention gate (Gated); and the module form followed
// by a strided depthwise conv and its BatchNorm, whose output alone is stored (Strided).
//
// Compiled with the other csrc/*.cc into one shared library by ghostnetv2_jax/kernels/build.py.
#include "depthwise.h"

namespace gnv2 {
namespace {

// A ghost module at inference, in one pass. The after-primary form starts from the primary conv's
// output p (N, H, W, C) before its BatchNorm, with both BatchNorms as per-channel affines
// (s1, b1), (s2, b2):
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
    return ffi::Error::InvalidArgument("ghost module op: inconsistent shapes");
  Geometry g{pd[0], pd[1], pd[2], pd[3], kd[0], kd[1], 1, 1, pt, pl, pd[1], pd[2]};
  if (g.h + 2 * pt - g.kh + 1 != g.h || g.w + 2 * pl - g.kw + 1 != g.w)
    return ffi::Error::InvalidArgument("ghost module op: padding must keep the spatial size");
  GhostFn fn = nullptr;
#define X(h, w) if (g.kh == h && g.kw == w) fn = GhostRows<h, w>;
  GNV2_SIZES(X)
#undef X
  if (!fn) return ffi::Error::InvalidArgument("ghost module op: unsupported kernel size");
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
      return ffi::Error::InvalidArgument("ghost module op: the gate must be (N, H / fh, W / fw, C_out)");
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
  }, g.n == 1);
  return ffi::Error::Success();
}

ffi::Error GhostModuleAfterPrimaryImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> s1,
                                       ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> kernel,
                                       ffi::Buffer<ffi::F32> s2, ffi::Buffer<ffi::F32> b2,
                                       ffi::ResultBuffer<ffi::F32> out, int64_t pt, int64_t pl, int64_t relu) {
  return GhostRun(pool, p, nullptr, s1, b1, kernel, s2, b2, nullptr, out, pt, pl, relu);
}

ffi::Error GhostModuleAfterPrimaryGatedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> s1,
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

}  // namespace
}  // namespace gnv2

// The ghost ops' operands: p (after-primary forms) or x and the primary kernel (module forms), then
// both BatchNorms' affines around the depthwise kernel.
#define GNV2_AFTER_PRIMARY_OPERANDS                        \
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleAfterPrimary, gnv2::GhostModuleAfterPrimaryImpl,
                              GNV2_AFTER_PRIMARY_OPERANDS GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleAfterPrimaryGated, gnv2::GhostModuleAfterPrimaryGatedImpl,
                              GNV2_AFTER_PRIMARY_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* gate */ GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModule, gnv2::GhostModuleImpl, GNV2_GHOST_MODULE_OPERANDS GNV2_GHOST_RESULT);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleGated, gnv2::GhostModuleGatedImpl,
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
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleStrided, gnv2::GhostStridedImpl, GNV2_GHOST_MODULE_OPERANDS GNV2_STRIDED_DW);
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gnv2GhostModuleStridedGated, gnv2::GhostStridedGatedImpl,
                              GNV2_GHOST_MODULE_OPERANDS.Arg<ffi::Buffer<ffi::F32>>() /* gate */ GNV2_STRIDED_DW);
