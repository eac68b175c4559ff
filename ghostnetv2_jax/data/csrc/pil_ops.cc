// Pillow's resampling of uint8 images, as TensorFlow CPU ops for the input pipeline.
//
// Gnv2PilResize is Image.resize (Resample.c: per-axis coefficients in double, normalised, then
// fixed point with 22 fraction bits; two passes, each clipped to uint8, in Pillow 13's order). Gnv2PilAffine is Image.transform(AFFINE) (Geometry.c:
// output pixel centres mapped in double; nearest in Pillow's 16.16 fixed point or its separable
// scale path, bilinear and bicubic (a = -1) in double, neighbours clamped to the border, points
// outside the input take the fill). Both are bit-exact to Pillow, which timm's transforms run.
// Gnv2ApplyLut is Image.point with a table per channel; Gnv2Normalize is torchvision's
// ToTensor + Normalize, bit-exact;
// floating-point contraction is off in the build so no FMA changes a rounding.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// ---------------------------------------------------------------------------- Image.resize
constexpr int kPrecisionBits = 32 - 8 - 2;

double BoxFilter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
double BilinearFilter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}
double HammingFilter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}
double BicubicFilter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
double Sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}
double LanczosFilter(double x) {
  if (-3.0 <= x && x < 3.0) return Sinc(x) * Sinc(x / 3);
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};
// By the ids the Python side passes (ghostnetv2_jax/data/native.py: RESIZE_FILTERS).
const Filter kFilters[] = {{BoxFilter, 0.5}, {BilinearFilter, 1.0}, {HammingFilter, 1.0},
                           {BicubicFilter, 2.0}, {LanczosFilter, 3.0}};
constexpr int kNumFilters = sizeof(kFilters) / sizeof(kFilters[0]);

struct Coeffs {
  int ksize;
  std::vector<int> bounds;     // per output index: first input index, number of taps
  std::vector<int32_t> kk;     // per output index: ksize fixed-point weights
};

// Resample.c: precompute_coeffs + normalize_coeffs_8bpc for the box [0, in_size).
Coeffs Precompute(int in_size, int out_size, const Filter& filter) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.assign(2 * out_size, 0);
  c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = filter.fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    for (int x = 0; x < c.ksize; ++x) {
      const double v = x < xmax ? k[x] : 0.0;
      c.kk[static_cast<size_t>(xx) * c.ksize + x] =
          v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t Clip8(int32_t v) {
  const int32_t s = v >> kPrecisionBits;
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// Resample.c's passes over an 8-bit image of `ch` interleaved channels: `rows` rows of `src`
// (starting at row `first`) resampled along x to `ow` columns, or along y to `oh` rows.
template <int kCh>   // > 0: that many channels, unrolled; 0: `ch_arg`
void HorizontalPassT(const uint8_t* src, int w, int ch_arg, int first, int rows, const Coeffs& c,
                     int ow, uint8_t* dst) {
  const int ch = kCh > 0 ? kCh : ch_arg;
  for (int y = 0; y < rows; ++y) {
    const uint8_t* row = src + static_cast<size_t>(y + first) * w * ch;
    uint8_t* orow = dst + static_cast<size_t>(y) * ow * ch;
    for (int xx = 0; xx < ow; ++xx) {
      const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
      const int32_t* k = &c.kk[static_cast<size_t>(xx) * c.ksize];
      const uint8_t* p = row + xmin * ch;
      int32_t ss[kCh > 0 ? kCh : 4];
      for (int b = 0; b < ch; ++b) ss[b] = 1 << (kPrecisionBits - 1);
      for (int x = 0; x < xmax; ++x) {
        for (int b = 0; b < ch; ++b) ss[b] += p[x * ch + b] * k[x];
      }
      for (int b = 0; b < ch; ++b) orow[xx * ch + b] = Clip8(ss[b]);
    }
  }
}

void HorizontalPass(const uint8_t* src, int w, int ch, int first, int rows, const Coeffs& c,
                    int ow, uint8_t* dst) {
  (ch == 3 ? HorizontalPassT<3> : HorizontalPassT<0>)(src, w, ch, first, rows, c, ow, dst);
}

void VerticalPass(const uint8_t* src, int w, int ch, int offset, const Coeffs& c, int oh,
                  uint8_t* dst) {
  const int n = w * ch;
  std::vector<int32_t> acc(n);
  for (int yy = 0; yy < oh; ++yy) {
    const int ymin = c.bounds[2 * yy] - offset, ymax = c.bounds[2 * yy + 1];
    const int32_t* k = &c.kk[static_cast<size_t>(yy) * c.ksize];
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int y = 0; y < ymax; ++y) {
      const uint8_t* row = src + static_cast<size_t>(y + ymin) * n;
      const int32_t ky = k[y];
      for (int i = 0; i < n; ++i) acc[i] += row[i] * ky;
    }
    uint8_t* orow = dst + static_cast<size_t>(yy) * n;
    for (int i = 0; i < n; ++i) orow[i] = Clip8(acc[i]);
  }
}

// Resample.c: ImagingResampleInner (Pillow 13: the vertical pass runs first when the height
// shrinks by more than twice as many pixels as the width; until Pillow 12, always second).
void Resize(const uint8_t* in, int h, int w, int ch, uint8_t* out, int oh, int ow, const Filter& f) {
  const bool need_h = ow != w, need_v = oh != h;
  if (!need_h && !need_v) {
    std::copy(in, in + static_cast<size_t>(h) * w * ch, out);
    return;
  }
  const bool horizontal_first = !((h - oh) > 0 && (h - oh) > (w - ow) * 2);
  if (!need_h) {
    VerticalPass(in, w, ch, 0, Precompute(h, oh, f), oh, out);
    return;
  }
  const Coeffs chz = Precompute(w, ow, f);
  if (!need_v) {
    HorizontalPass(in, w, ch, 0, h, chz, ow, out);
    return;
  }
  const Coeffs cv = Precompute(h, oh, f);
  if (horizontal_first) {   // only the rows the vertical pass reads
    const int first = cv.bounds[0], last = cv.bounds[2 * oh - 2] + cv.bounds[2 * oh - 1];
    std::vector<uint8_t> temp(static_cast<size_t>(last - first) * ow * ch);
    HorizontalPass(in, w, ch, first, last - first, chz, ow, temp.data());
    VerticalPass(temp.data(), ow, ch, first, cv, oh, out);
  } else {
    std::vector<uint8_t> temp(static_cast<size_t>(oh) * w * ch);
    VerticalPass(in, w, ch, 0, cv, oh, temp.data());
    HorizontalPass(temp.data(), w, ch, 0, oh, chz, ow, out);
  }
}

class PilResizeOp : public OpKernel {
 public:
  explicit PilResizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& size = ctx->input(1);
    const Tensor& filter = ctx->input(2);
    OP_REQUIRES(ctx, image.dims() == 3,
                tensorflow::errors::InvalidArgument("image must be [height, width, channels]"));
    OP_REQUIRES(ctx, size.NumElements() == 2,
                tensorflow::errors::InvalidArgument("size must be [height, width]"));
    const int id = filter.scalar<int32_t>()();
    OP_REQUIRES(ctx, id >= 0 && id < kNumFilters,
                tensorflow::errors::InvalidArgument("unknown resize filter id ", id));
    const int oh = size.flat<int32_t>()(0), ow = size.flat<int32_t>()(1);
    OP_REQUIRES(ctx, oh > 0 && ow > 0,
                tensorflow::errors::InvalidArgument("output size must be positive"));
    const int h = image.dim_size(0), w = image.dim_size(1), ch = image.dim_size(2);
    OP_REQUIRES(ctx, h > 0 && w > 0,
                tensorflow::errors::InvalidArgument("cannot resize an empty image"));
    OP_REQUIRES(ctx, ch >= 1 && ch <= 4,
                tensorflow::errors::InvalidArgument("images have 1 to 4 channels, got ", ch));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({oh, ow, ch}), &out));
    Resize(image.flat<uint8_t>().data(), h, w, ch, out->flat<uint8_t>().data(), oh, ow, kFilters[id]);
  }
};

// ---------------------------------------------------------------------------- Image.transform(AFFINE)
inline int Clamp(int v, int hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// Geometry.c's BICUBIC with a = -1 in Horner form.
inline double Cubic(double v1, double v2, double v3, double v4, double d) {
  const double p2 = v3 - v1, p3 = 2.0 * (v1 - v2) + v3 - v4, p4 = v2 - v1 - v3 + v4;
  return v2 + d * (p2 + d * (p3 + d * p4));
}

// Bilinear (2 taps) or bicubic (4 taps) sampling of every output pixel, as Geometry.c's
// bilinear_filter32RGB / bicubic_filter32RGB.
// kCh > 0: that many channels, known at compile time (unrolled); 0: `ch` channels.
template <int kTaps, int kCh>
void Sample(const uint8_t* in, int h, int w, int ch_arg, const double* m, const uint8_t* fill,
            uint8_t* out) {
  const int ch = kCh > 0 ? kCh : ch_arg;
  const double a = m[0], b = m[1], c = m[2], d = m[3], e = m[4], f = m[5];
  const double fh = h, fw = w;
  constexpr int lo = kTaps == 2 ? 0 : -1;
  for (int y = 0; y < h; ++y) {
    const double yc = static_cast<double>(y) + 0.5;
    for (int x = 0; x < w; ++x) {
      const double xc = static_cast<double>(x) + 0.5;
      const double xin = a * xc + b * yc + c, yin = d * xc + e * yc + f;
      uint8_t* o = out + (static_cast<size_t>(y) * w + x) * ch;
      if (!(xin >= 0.0 && xin < fw && yin >= 0.0 && yin < fh)) {
        for (int k = 0; k < ch; ++k) o[k] = fill[k];
        continue;
      }
      const double xf = xin - 0.5, yf = yin - 0.5;
      const double xfl = std::floor(xf), yfl = std::floor(yf);
      const double dx = xf - xfl, dy = yf - yfl;
      const int xb = static_cast<int>(xfl), yb = static_cast<int>(yfl);
      int xs[kTaps];
      const uint8_t* rows[kTaps];
      for (int t = 0; t < kTaps; ++t) {
        xs[t] = Clamp(xb + lo + t, w - 1) * ch;
        rows[t] = in + static_cast<size_t>(Clamp(yb + lo + t, h - 1)) * w * ch;
      }
      for (int k = 0; k < ch; ++k) {
        double v[kTaps];
        for (int r = 0; r < kTaps; ++r) {
          const uint8_t* row = rows[r] + k;
          if constexpr (kTaps == 2) {
            const double p0 = row[xs[0]], p1 = row[xs[1]];
            v[r] = p0 + (p1 - p0) * dx;
          } else {
            v[r] = Cubic(row[xs[0]], row[xs[1]], row[xs[2]], row[xs[3]], dx);
          }
        }
        double value;
        if constexpr (kTaps == 2) {
          value = v[0] + (v[1] - v[0]) * dy;
        } else {
          value = Cubic(v[0], v[1], v[2], v[3], dy);
        }
        o[k] = static_cast<uint8_t>(value <= 0.0 ? 0.0 : (value >= 255.0 ? 255.0 : value));
      }
    }
  }
}

void Affine(const uint8_t* in, int h, int w, int ch, const double* m, const uint8_t* fill,
            int method, uint8_t* out) {
  const double a = m[0], b = m[1], c = m[2], d = m[3], e = m[4], f = m[5];
  if (method == 0) {   // nearest: Pillow's separable scale path, else 16.16 fixed point
    const bool scale = b == 0.0 && d == 0.0;
    auto fix = [](double v) { return static_cast<int64_t>(std::floor(v * 65536.0 + 0.5)); };
    const int64_t x0 = fix(c + a * 0.5 + b * 0.5), y0 = fix(f + d * 0.5 + e * 0.5);
    const int64_t fa = fix(a), fb = fix(b), fd = fix(d), fe = fix(e);
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x) {
        int64_t xi, yi;
        if (scale) {
          xi = static_cast<int64_t>(std::floor(c + a * 0.5 + static_cast<double>(x) * a));
          yi = static_cast<int64_t>(std::floor(f + e * 0.5 + static_cast<double>(y) * e));
        } else {
          xi = (x0 + y * fb + x * fa) >> 16;
          yi = (y0 + y * fe + x * fd) >> 16;
        }
        uint8_t* o = out + (static_cast<size_t>(y) * w + x) * ch;
        if (xi >= 0 && xi < w && yi >= 0 && yi < h) {
          const uint8_t* p = in + (static_cast<size_t>(yi) * w + xi) * ch;
          for (int k = 0; k < ch; ++k) o[k] = p[k];
        } else {
          for (int k = 0; k < ch; ++k) o[k] = fill[k];
        }
      }
    }
    return;
  }
  if (ch == 3) {
    (method == 1 ? Sample<2, 3> : Sample<4, 3>)(in, h, w, ch, m, fill, out);
  } else {
    (method == 1 ? Sample<2, 0> : Sample<4, 0>)(in, h, w, ch, m, fill, out);
  }
}

class PilAffineOp : public OpKernel {
 public:
  explicit PilAffineOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& matrix = ctx->input(1);
    const Tensor& fill = ctx->input(2);
    const int method = ctx->input(3).scalar<int32_t>()();
    OP_REQUIRES(ctx, image.dims() == 3,
                tensorflow::errors::InvalidArgument("image must be [height, width, channels]"));
    OP_REQUIRES(ctx, matrix.NumElements() == 6,
                tensorflow::errors::InvalidArgument("matrix must hold 6 values"));
    OP_REQUIRES(ctx, fill.NumElements() == image.dim_size(2),
                tensorflow::errors::InvalidArgument("fill must hold one value per channel"));
    OP_REQUIRES(ctx, method >= 0 && method <= 2,
                tensorflow::errors::InvalidArgument("method must be 0 (nearest), 1 (bilinear) or 2 (bicubic)"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, image.shape(), &out));
    Affine(image.flat<uint8_t>().data(), image.dim_size(0), image.dim_size(1), image.dim_size(2),
           matrix.flat<double>().data(), fill.flat<uint8_t>().data(), method,
           out->flat<uint8_t>().data());
  }
};

// ---------------------------------------------------------------------------- ToTensor + Normalize
// torchvision's (x / 255 - mean) / std in float32, through a table of the 256 values per channel.
class NormalizeOp : public OpKernel {
 public:
  explicit NormalizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& mean = ctx->input(1);
    const Tensor& std = ctx->input(2);
    OP_REQUIRES(ctx, image.dims() >= 1,
                tensorflow::errors::InvalidArgument("image must have a channel axis"));
    const int64_t ch = image.dim_size(image.dims() - 1);
    OP_REQUIRES(ctx, mean.NumElements() == ch && std.NumElements() == ch,
                tensorflow::errors::InvalidArgument("mean and std need one value per channel"));
    std::vector<float> table(static_cast<size_t>(ch) * 256);
    for (int64_t c = 0; c < ch; ++c) {
      const float m = mean.flat<float>()(c), s = std.flat<float>()(c);
      for (int v = 0; v < 256; ++v) table[c * 256 + v] = (static_cast<float>(v) / 255.0f - m) / s;
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, image.shape(), &out));
    const uint8_t* in = image.flat<uint8_t>().data();
    float* o = out->flat<float>().data();
    const int64_t n = image.NumElements();
    for (int64_t i = 0; i < n; i += ch) {
      for (int64_t c = 0; c < ch; ++c) o[i + c] = table[c * 256 + in[i + c]];
    }
  }
};

// ---------------------------------------------------------------------------- Image.point
// A per-channel look-up table (int32 [channels, 256], values 0..255) applied to a uint8 image.
class ApplyLutOp : public OpKernel {
 public:
  explicit ApplyLutOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    const Tensor& luts = ctx->input(1);
    OP_REQUIRES(ctx, image.dims() >= 1,
                tensorflow::errors::InvalidArgument("image must have a channel axis"));
    const int64_t ch = image.dim_size(image.dims() - 1);
    OP_REQUIRES(ctx, luts.dims() == 2 && luts.dim_size(0) == ch && luts.dim_size(1) == 256,
                tensorflow::errors::InvalidArgument("luts must be [channels, 256]"));
    std::vector<uint8_t> table(static_cast<size_t>(ch) * 256);
    const int32_t* l = luts.flat<int32_t>().data();
    for (size_t i = 0; i < table.size(); ++i) {
      table[i] = static_cast<uint8_t>(l[i] < 0 ? 0 : (l[i] > 255 ? 255 : l[i]));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, image.shape(), &out));
    const uint8_t* in = image.flat<uint8_t>().data();
    uint8_t* o = out->flat<uint8_t>().data();
    const int64_t n = image.NumElements();
    for (int64_t i = 0; i < n; i += ch) {
      for (int64_t c = 0; c < ch; ++c) o[i + c] = table[c * 256 + in[i + c]];
    }
  }
};

}  // namespace

REGISTER_OP("Gnv2ApplyLut")
    .Input("image: uint8")
    .Input("luts: int32")
    .Output("mapped: uint8")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("Gnv2ApplyLut").Device(tensorflow::DEVICE_CPU), ApplyLutOp);

REGISTER_OP("Gnv2Normalize")
    .Input("image: uint8")
    .Input("mean: float32")
    .Input("std: float32")
    .Output("normalized: float32")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("Gnv2Normalize").Device(tensorflow::DEVICE_CPU), NormalizeOp);

REGISTER_OP("Gnv2PilResize")
    .Input("image: uint8")
    .Input("size: int32")
    .Input("filter: int32")
    .Output("resized: uint8")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle image, hw, out;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(1, &hw));
      TF_RETURN_IF_ERROR(c->WithRank(hw, 2, &hw));
      TF_RETURN_IF_ERROR(c->Concatenate(hw, c->Vector(c->Dim(image, 2)), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("Gnv2PilResize").Device(tensorflow::DEVICE_CPU), PilResizeOp);

REGISTER_OP("Gnv2PilAffine")
    .Input("image: uint8")
    .Input("matrix: float64")
    .Input("fill: uint8")
    .Input("method: int32")
    .Output("transformed: uint8")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle image;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      c->set_output(0, image);
      return absl::OkStatus();
    });
REGISTER_KERNEL_BUILDER(Name("Gnv2PilAffine").Device(tensorflow::DEVICE_CPU), PilAffineOp);
