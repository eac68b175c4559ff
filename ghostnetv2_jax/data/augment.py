"""Image transforms in TensorFlow with timm's semantics, for use inside ``tf.data``.

Train chain (timm ``transforms_imagenet_train``): RandomResizedCrop with random bilinear/bicubic
resize -> horizontal flip -> RandAugment or colour jitter (jitter only when RandAugment is off)
-> normalize -> random erasing (after normalization). Eval chain (``transforms_imagenet_eval``):
resize the short side to ``floor(size / crop_pct)`` -> centre crop -> normalize.

Randomness is stateless: every random op takes a ``key`` (an int tensor of shape [2], as used by
``tf.random.stateless_*``) so that the same key gives the same output eagerly, in a tf.data map,
and after a resume. Callers derive one key per example and the chain splits it per stage.

The pixel ops (autocontrast, equalize, enhance blends, sharpness, posterize, solarize), the
affine ops (rotate, shear, translate, with nearest/bilinear/bicubic sampling and a per-channel
fill), the RandomResizedCrop and eval resizes (Pillow's fixed-point resample) and the
normalization reproduce Pillow's and torchvision's arithmetic exactly, because timm runs them on
PIL images; the tests compare them with Pillow pixel for pixel. The resize, the affine ops, the
table ops and the normalization run as native TensorFlow ops (``data.native``) where a C++
compiler is available; without one, their TensorFlow forms compute the same (the resize within
one grey level: TF's antialiased kernels, not PIL's fixed-point weights).

Known departure from timm: none in the ops; the per-example random streams are of course not
Python's ``random``, so the same seed does not give timm's exact draws.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Sequence, Tuple, Union

from ghostnetv2_jax.data import native
from ghostnetv2_jax.data._tf import tf

Key = tf.Tensor            # int tensor of shape [2]
Window = Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]   # top, left, height, width (int32)

# Resize kernels by timm's names; TF's antialiased 'bilinear'/'bicubic' are PIL's triangle and
# Keys (a=-0.5) cubic filters.
RESIZE_METHODS = {'nearest': 'nearest', 'bilinear': 'bilinear', 'bicubic': 'bicubic',
                  'lanczos': 'lanczos3', 'area': 'area'}
RANDOM_INTERPOLATIONS = ('bilinear', 'bicubic')     # timm's _RANDOM_INTERPOLATION
_LEVEL_DENOM = 10.0                                 # timm: magnitude M maps to level M / 10


# ----------------------------------------------------------------------------- random helpers

def split_key(key: Key, num: int = 2) -> list:
    """``num`` independent keys from one."""
    return tf.unstack(tf.random.experimental.stateless_split(key, num))


def fold_in(key: Key, data) -> Key:
    """A new key that depends on ``key`` and the integer ``data`` (epoch, index, stage id)."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int32))


def _uniform(key: Key, shape=(), minval=0.0, maxval=1.0, dtype=tf.float64) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=key, minval=minval, maxval=maxval, dtype=dtype)


def _f64(value) -> tf.Tensor:
    """float64 without a float32 detour (tf.cast(0.31, tf.float64) would go through float32)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, tf.float64)
    return tf.constant(value, tf.float64)


def _randint(key: Key, upper_inclusive: tf.Tensor) -> tf.Tensor:
    """Python's ``random.randint(0, upper)``: uniform on {0, ..., upper}."""
    n = tf.cast(upper_inclusive + 1, tf.float64)
    return tf.cast(tf.minimum(tf.floor(_uniform(key) * n), n - 1), tf.int32)


# ----------------------------------------------------------------------------- geometry

def random_resized_crop_window(shape: tf.Tensor, key: Key, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> Window:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` on an image of ``shape`` [h, w].

    Draws all ``attempts`` (area, aspect) pairs at once and keeps the first that fits; if none
    fits, falls back to the central crop clamped to the ratio range, exactly as timm does.
    """
    img_h, img_w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    k_area, k_ratio, k_top, k_left = split_key(key, 4)
    target_area = _uniform(k_area, [attempts], scale[0], scale[1]) * img_h * img_w
    aspect = tf.exp(_uniform(k_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1])))
    # tf.round and Python's round() both round half to even
    cand_w = tf.round(tf.sqrt(target_area * aspect))
    cand_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (cand_w <= img_w) & (cand_h <= img_h)
    first = tf.argmax(tf.cast(fits, tf.int32))
    h, w = tf.cast(cand_h[first], tf.int32), tf.cast(cand_w[first], tf.int32)
    ih, iw = tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)

    def found():
        return _randint(k_top, ih - h), _randint(k_left, iw - w), h, w

    def fallback():
        in_ratio = img_w / img_h
        fw = tf.where(in_ratio > max(ratio), tf.round(img_h * max(ratio)), img_w)
        fh = tf.where(in_ratio < min(ratio), tf.round(img_w / min(ratio)), img_h)
        fh, fw = tf.cast(fh, tf.int32), tf.cast(fw, tf.int32)
        return (ih - fh) // 2, (iw - fw) // 2, fh, fw

    return tf.cond(tf.reduce_any(fits), found, fallback)


def crop(image: tf.Tensor, window: Window) -> tf.Tensor:
    top, left, h, w = window
    return image[top:top + h, left:left + w]


def _resize_pass(image: tf.Tensor, size, method: str) -> tf.Tensor:
    out = tf.image.resize(image, size, method=RESIZE_METHODS[method], antialias=True)
    return tf.cast(tf.clip_by_value(tf.floor(out + 0.5), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, size: Sequence, method: str) -> tf.Tensor:
    """uint8 -> uint8 antialiased resize to ``size`` (h, w), as PIL's resample (which
    torchvision and timm use): the native op (``data.native``, bit-exact) where available;
    otherwise TF's kernels in Pillow's pass order (a horizontal pass, rounded and clipped to
    uint8, then a vertical one, so cubic overshoot is clipped between the passes), within one
    grey level of Pillow where it runs the passes in that order."""
    size = tf.cast(size, tf.int32)
    if method in native.RESIZE_FILTERS and native.available():
        return native.resize(image, size, method)
    if method == 'nearest':
        return _resize_pass(image, size, method)
    wide = _resize_pass(image, tf.stack([tf.shape(image)[0], size[1]]), method)
    return _resize_pass(wide, size, method)


def random_interpolation_resize(image: tf.Tensor, size: Sequence, key: Key,
                                methods: Sequence[str] = RANDOM_INTERPOLATIONS) -> tf.Tensor:
    """Resize with a method chosen uniformly per image (timm's ``interpolation='random'``)."""
    if len(methods) == 1:
        return resize(image, size, methods[0])
    index = tf.cast(tf.floor(_uniform(key) * len(methods)), tf.int32)
    branches = [lambda m=m: resize(image, size, m) for m in methods]
    return tf.switch_case(tf.minimum(index, len(methods) - 1), branches)


def resize_short_side(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """torchvision ``Resize(size)``: short side -> size, long side -> int(size * long / short)."""
    h, w = tf.cast(tf.shape(image)[0], tf.float64), tf.cast(tf.shape(image)[1], tf.float64)
    long_new = lambda long, short: tf.cast(tf.floor(size * long / short), tf.int32)
    new_h = tf.where(w <= h, long_new(h, w), size)
    new_w = tf.where(w <= h, size, long_new(w, h))
    return resize(image, tf.stack([new_h, new_w]), method)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision ``CenterCrop``: zero-pads a too-small image, offsets round half to even."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ph, pw = tf.maximum(size - h, 0), tf.maximum(size - w, 0)
    image = tf.pad(image, [[ph // 2, (ph + 1) // 2], [pw // 2, (pw + 1) // 2], [0, 0]])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top = tf.cast(tf.round(tf.cast(h - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size, tf.float64) / 2.0), tf.int32)
    return image[top:top + size, left:left + size]


def random_hflip(image: tf.Tensor, key: Key, prob: float = 0.5) -> tf.Tensor:
    return tf.cond(_uniform(key) < prob, lambda: tf.reverse(image, [1]), lambda: image)


# ----------------------------------------------------------------------------- Pillow pixel ops

def _trunc_u8(x: tf.Tensor) -> tf.Tensor:
    """Pillow's float -> uint8: clip to [0, 255], then truncate."""
    return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
    """``Image.blend(degenerate, image, factor)``, the core of every ImageEnhance op (float32)."""
    d = tf.cast(degenerate, tf.float32)
    return _trunc_u8(d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d))


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), int32 [h, w]."""
    rgb = tf.cast(image, tf.int32)
    luma = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.bitwise.right_shift(luma, 16)


def color(image: tf.Tensor, factor) -> tf.Tensor:
    """``ImageEnhance.Color``: blend with the greyscale image."""
    grey = tf.cast(tf.tile(grayscale(image)[..., None], [1, 1, 3]), tf.uint8)
    return blend(grey, image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
    """``ImageEnhance.Contrast``: blend with a flat image at the rounded mean luma."""
    mean = tf.reduce_mean(tf.cast(grayscale(image), tf.float64))
    flat = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.uint8))
    return blend(flat, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return blend(tf.zeros_like(image), image, factor)


def _smooth(image: tf.Tensor) -> tf.Tensor:
    """``ImageFilter.SMOOTH`` ([[1,1,1],[1,5,1],[1,1,1]] / 13), summed in Pillow's float32
    order and rounded; the one-pixel border is copied unchanged, as Pillow does."""
    x = tf.cast(image, tf.float32)
    k = [tf.constant(v, tf.float32) / tf.constant(13.0, tf.float32) for v in (1.0, 5.0)]
    row = lambda r, mid: r[:, :-2] * k[0] + r[:, 1:-1] * mid + r[:, 2:] * k[0]
    acc = (0.0 + row(x[2:], k[0])) + row(x[1:-1], k[1])
    acc = acc + row(x[:-2], k[0])
    inner = tf.cast(tf.clip_by_value(tf.floor(acc + 0.5), 0.0, 255.0), tf.uint8)
    middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], middle, image[-1:]], axis=0)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
    """``ImageEnhance.Sharpness``: blend with the smoothed image (factor > 1 sharpens)."""
    return blend(_smooth(image), image, factor)


def _apply_lut(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
    """Per-channel look-up: ``luts`` is int32 [3, 256] (the native op where available)."""
    if native.available():
        return native.apply_lut(image, luts)
    x = tf.cast(image, tf.int32)
    flat = x + tf.constant([0, 256, 512], tf.int32)
    return tf.cast(tf.gather(tf.reshape(luts, [-1]), flat), tf.uint8)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """``ImageOps.autocontrast`` (cutoff 0): stretch each channel's [min, max] to [0, 255],
    through Pillow's per-channel look-up table (float64, truncated like its ``int()``)."""
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, None]
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, None]
    levels = tf.range(256, dtype=tf.float64)[None, :]
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.clip_by_value(tf.cast(tf.cast(levels * scale + (-lo * scale), tf.int32), tf.float64),
                                 0.0, 255.0)
    luts = tf.cast(tf.where(hi > lo, stretched, levels), tf.int32)
    return _apply_lut(image, luts)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """``ImageOps.equalize``: per-channel histogram equalization, Pillow's look-up tables (int64
    arithmetic like Python's), from one histogram of the three channels."""
    channels = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    hist = tf.reshape(tf.math.bincount(tf.reshape(channels, [-1]), minlength=768, maxlength=768,
                                       dtype=tf.int64), [3, 256])
    present = hist > 0
    last = 255 - tf.argmax(tf.cast(tf.reverse(present, [1]), tf.int32), axis=1, output_type=tf.int32)
    step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, last, batch_dims=1)) // 255
    n = (step // 2)[:, None] + tf.cumsum(hist, axis=1, exclusive=True)
    lut = tf.clip_by_value(n // tf.maximum(step, 1)[:, None], 0, 255)
    keep = (tf.reduce_sum(tf.cast(present, tf.int32), axis=1) <= 1) | (step == 0)
    identity = tf.range(256, dtype=tf.int64)[None, :]
    return _apply_lut(image, tf.cast(tf.where(keep[:, None], identity, lut), tf.int32))


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
    """Keep the ``bits`` most significant bits (8 or more: unchanged; 0: black)."""
    bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
    low = tf.bitwise.left_shift(1, 8 - bits) - 1
    mask = tf.cast(tf.bitwise.bitwise_and(tf.bitwise.invert(low), 255), tf.uint8)
    return tf.bitwise.bitwise_and(image, mask)


_LEVELS = lambda: tf.range(256, dtype=tf.int32)[None, :]   # noqa: E731  (one table row)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
    """``ImageOps.solarize``: invert values >= threshold (threshold 256: unchanged)."""
    x = _LEVELS()
    lut = tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x)
    return _apply_lut(image, tf.tile(lut, [3, 1]))


def solarize_add(image: tf.Tensor, add, threshold=128) -> tf.Tensor:
    """timm's ``solarize_add``: add to values below the threshold, saturating at 255."""
    x = _LEVELS()
    lut = tf.where(x < threshold, tf.minimum(x + tf.cast(add, tf.int32), 255), x)
    return _apply_lut(image, tf.tile(lut, [3, 1]))


# ----------------------------------------------------------------------------- Pillow affine ops

AFFINE_METHODS = ('nearest', 'bilinear', 'bicubic')


def _cubic(v1, v2, v3, v4, d):
    """Pillow's transform bicubic (a = -1), Horner form as in Geometry.c."""
    p2, p3, p4 = v3 - v1, 2.0 * (v1 - v2) + v3 - v4, v2 - v1 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine(image: tf.Tensor, matrix: Sequence, fill: Sequence[int], method) -> tf.Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor)``, reproducing Pillow.

    ``matrix`` = (a, b, c, d, e, f) maps output pixel centres (x + .5, y + .5) to input points
    (a x + b y + c, d x + e y + f). Points outside the input take ``fill``. Bilinear and bicubic
    sample in float64 with neighbours clamped to the border and truncate to uint8; nearest
    uses Pillow's own paths (16.16 fixed point, or float for pure scale/translate matrices).
    ``method`` is a name from AFFINE_METHODS or an int32 tensor indexing it. Runs the native
    op where available (``data.native``), else the same arithmetic in TF ops.
    """
    if isinstance(method, str):
        method = AFFINE_METHODS.index(method)
    matrix = tf.stack([_f64(m) for m in matrix])
    args = (tf.convert_to_tensor(image, tf.uint8), matrix, tf.cast(fill, tf.uint8), tf.cast(method, tf.int32))
    if native.available():     # the same arithmetic in C++ (data.native)
        return tf.ensure_shape(native.affine(*args), args[0].shape)
    return _affine_traced(*args)


# Traced once per process and then only called: inlining the three samplers into every
# geometric RandAugment branch made tf.data spend ~15 s building the graph.
@tf.function(autograph=False, experimental_attributes={"_noinline": True}, input_signature=[
    tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([6], tf.float64),
    tf.TensorSpec([3], tf.uint8), tf.TensorSpec([], tf.int32)])
def _affine_traced(image, matrix, fill, method):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    fh, fw = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    a, b, c, d, e, f = tf.unstack(matrix)
    ys, xs = tf.meshgrid(tf.range(fh), tf.range(fw), indexing='ij')
    xin, yin = a * (xs + 0.5) + b * (ys + 0.5) + c, d * (xs + 0.5) + e * (ys + 0.5) + f
    flat = tf.reshape(image, [-1, 3])
    fill = tf.cast(fill, tf.float64)

    def at(yi, xi):              # uint8 gather (cheap), then float64 like Pillow's doubles
        yi = tf.clip_by_value(yi, 0, h - 1)
        xi = tf.clip_by_value(xi, 0, w - 1)
        return tf.cast(tf.gather(flat, yi * w + xi), tf.float64)

    def filtered(values):        # Pillow's filters fill points outside [0, size)
        inside = (xin >= 0.0) & (xin < fw) & (yin >= 0.0) & (yin < fh)
        return tf.where(inside[..., None], values, fill)

    def nearest():
        def fixed():             # affine_fixed: FIX(v) = floor(v * 65536 + .5), index = v >> 16
            fix = lambda v: tf.cast(tf.floor(v * 65536.0 + 0.5), tf.int64)
            x0, y0 = fix(c + a * 0.5 + b * 0.5), fix(f + d * 0.5 + e * 0.5)
            xi, yi = [tf.cast(v, tf.int64) for v in (xs, ys)]
            return ((x0 + yi * fix(b) + xi * fix(a)) // 65536,
                    (y0 + yi * fix(e) + xi * fix(d)) // 65536)

        def scale():             # ImagingScaleAffine: separable, no half-pixel term across axes
            return (tf.cast(tf.floor(c + a * 0.5 + xs * a), tf.int64),
                    tf.cast(tf.floor(f + e * 0.5 + ys * e), tf.int64))

        xi, yi = tf.cond((b == 0.0) & (d == 0.0), scale, fixed)
        inside = (xi >= 0) & (xi < tf.cast(w, tf.int64)) & (yi >= 0) & (yi < tf.cast(h, tf.int64))
        values = at(tf.cast(yi, tf.int32), tf.cast(xi, tf.int32))
        return tf.where(inside[..., None], values, fill)

    def neighbours(offsets):
        """The taps around each point, [rows, cols, h, w, 3] (tap axes first, so the slices
        below are contiguous), from one gather; and the fractions dx, dy."""
        xf, yf = xin - 0.5, yin - 0.5
        x0, y0 = tf.floor(xf), tf.floor(yf)
        taps = tf.constant(offsets, tf.int32)[:, None, None]
        yi = (tf.cast(y0, tf.int32) + taps)[:, None]
        xi = (tf.cast(x0, tf.int32) + taps)[None, :]
        return at(yi, xi), (xf - x0)[..., None], (yf - y0)[..., None]

    def bilinear():              # Pillow's BILINEAR(a, b, d) = a + (b - a) * d, rows then columns
        p, dx, dy = neighbours([0, 1])
        rows = p[:, 0] + (p[:, 1] - p[:, 0]) * dx
        return filtered(rows[0] + (rows[1] - rows[0]) * dy)

    def bicubic():
        p, dx, dy = neighbours([-1, 0, 1, 2])
        rows = _cubic(p[:, 0], p[:, 1], p[:, 2], p[:, 3], dx)
        return filtered(_cubic(rows[0], rows[1], rows[2], rows[3], dy))

    sampled = tf.switch_case(method, [nearest, bilinear, bicubic])
    return tf.cast(tf.clip_by_value(sampled, 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees, fill, method) -> tf.Tensor:
    """``Image.rotate(degrees)`` about the centre, counter-clockwise, same size."""
    angle = -(tf.math.floormod(_f64(degrees), 360.0) * (math.pi / 180.0))
    r15 = lambda v: tf.round(v * 1e15) / 1e15            # Pillow rounds the matrix to 15 digits
    cos, sin = r15(tf.cos(angle)), r15(tf.sin(angle))
    cx = tf.cast(tf.shape(image)[1], tf.float64) / 2.0
    cy = tf.cast(tf.shape(image)[0], tf.float64) / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine(image, (cos, sin, c, -sin, cos, f), fill, method)


def shear_x(image, factor, fill, method):
    return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill, method)


def shear_y(image, factor, fill, method):
    return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill, method)


def translate_x_rel(image, pct, fill, method):
    pixels = _f64(pct) * tf.cast(tf.shape(image)[1], tf.float64)
    return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill, method)


def translate_y_rel(image, pct, fill, method):
    pixels = _f64(pct) * tf.cast(tf.shape(image)[0], tf.float64)
    return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill, method)


# ----------------------------------------------------------------------------- RandAugment

@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string such as ``rand-m9-mstd0.5`` (see ``parse``)."""
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0          # inf: uniform in [0, magnitude]
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False

    @classmethod
    def parse(cls, config_str: str) -> 'RandAugmentSpec':
        """timm's grammar: 'rand' then dash-separated m<int>, n<int>, p<float>, mstd<float>,
        mmax<int>, inc<0|1>. Weighted/named op sets ('t...') are not supported."""
        sections = config_str.split('-')
        if sections[0] != 'rand':
            raise ValueError(f"RandAugment config {config_str!r} must start with 'rand-'")
        kw = {}
        parsers = {'m': ('magnitude', float), 'n': ('num_layers', int), 'p': ('prob', float),
                   'mstd': ('magnitude_std', float), 'mmax': ('magnitude_max', float),
                   'inc': ('increasing', lambda v: bool(int(v)))}
        for section in sections[1:]:
            parts = re.split(r'(\d.*)', section)
            if len(parts) < 2 or parts[0] not in parsers:
                raise ValueError(f"RandAugment config {config_str!r}: unknown section {section!r}; "
                                 f"expected one of {sorted(parsers)} followed by a number")
            name, conv = parsers[parts[0]]
            kw[name] = conv(parts[1])
        if kw.get('magnitude_std', 0.0) > 100:
            kw['magnitude_std'] = float('inf')
        return cls(**kw)


def _negate(v, key):
    """timm's ``_randomly_negate``: -v if random() > 0.5."""
    return tf.where(_uniform(key) > 0.5, -v, v)


def _enhance_arg(level, key):
    return level / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_arg(level, key):
    return tf.maximum(_f64(0.1), 1.0 + _negate(level / _LEVEL_DENOM * 0.9, key))


def _posterize_bits(level):
    return tf.cast(tf.floor(level / _LEVEL_DENOM * 4), tf.int32)


def _solarize_thresh(level):
    return tf.minimum(256, tf.cast(tf.floor(level / _LEVEL_DENOM * 256), tf.int32))


def _geometric(op, scale):
    return lambda img, level, key, fill, method: op(
        img, _negate(level / _LEVEL_DENOM * scale, key), fill, method)


def _enhancer(op, arg_fn):
    return lambda img, level, key, fill, method: op(img, arg_fn(level, key))


def _pixel(op):
    return lambda img, level, key, fill, method: op(img)


# name -> fn(image, level, key, fill, method); the names, argument ranges and op lists are
# timm's (auto_augment.py: LEVEL_TO_ARG, NAME_TO_OP, _RAND_TRANSFORMS)
RAND_OPS: Dict[str, Callable] = {
    'AutoContrast': _pixel(autocontrast),
    'Equalize': _pixel(equalize),
    'Invert': _pixel(invert),
    'Rotate': _geometric(rotate, 30.0),
    'Posterize': lambda img, level, *_: posterize(img, _posterize_bits(level)),
    'PosterizeIncreasing': lambda img, level, *_: posterize(img, 4 - _posterize_bits(level)),
    'Solarize': lambda img, level, *_: solarize(img, _solarize_thresh(level)),
    'SolarizeIncreasing': lambda img, level, *_: solarize(img, 256 - _solarize_thresh(level)),
    'SolarizeAdd': lambda img, level, *_: solarize_add(
        img, tf.minimum(128, tf.cast(tf.floor(level / _LEVEL_DENOM * 110), tf.int32))),
    'Color': _enhancer(color, _enhance_arg),
    'ColorIncreasing': _enhancer(color, _enhance_increasing_arg),
    'Contrast': _enhancer(contrast, _enhance_arg),
    'ContrastIncreasing': _enhancer(contrast, _enhance_increasing_arg),
    'Brightness': _enhancer(brightness, _enhance_arg),
    'BrightnessIncreasing': _enhancer(brightness, _enhance_increasing_arg),
    'Sharpness': _enhancer(sharpness, _enhance_arg),
    'SharpnessIncreasing': _enhancer(sharpness, _enhance_increasing_arg),
    'ShearX': _geometric(shear_x, 0.3),
    'ShearY': _geometric(shear_y, 0.3),
    'TranslateXRel': _geometric(translate_x_rel, 0.45),
    'TranslateYRel': _geometric(translate_y_rel, 0.45),
}
_RAND_OP_NAMES = tuple(RAND_OPS)
_RAND_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
                    'ShearY', 'TranslateXRel', 'TranslateYRel')
_RAND_INCREASING_TRANSFORMS = tuple(
    n + 'Increasing' if n + 'Increasing' in RAND_OPS else n for n in _RAND_TRANSFORMS)


@tf.function(autograph=False, experimental_attributes={"_noinline": True}, input_signature=[
    tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32),
    tf.TensorSpec([], tf.float64), tf.TensorSpec([2], tf.int64), tf.TensorSpec([3], tf.uint8),
    tf.TensorSpec([], tf.int32)])
def apply_rand_op(image, op_index, level, key, fill, method):
    """RAND_OPS[_RAND_OP_NAMES[op_index]] at ``level``; traced once, shared by every layer."""
    branches = [lambda op=RAND_OPS[n]: op(image, level, key, fill, method) for n in _RAND_OP_NAMES]
    return tf.ensure_shape(tf.switch_case(op_index, branches), [None, None, 3])


def fill_from_mean(mean: Sequence[float]) -> Tuple[int, ...]:
    """timm's ``img_mean`` fill for RandAugment: the normalization mean as grey levels."""
    return tuple(min(255, round(255 * m)) for m in mean)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's ``RandAugment``: ``num_layers`` ops drawn with replacement, each applied with
    ``prob`` at a magnitude drawn per op from N(m, mstd) clipped to [0, mmax]."""
    spec: RandAugmentSpec
    fill: Tuple[int, int, int] = (128, 128, 128)
    interpolation: str = 'random'      # geometric ops: 'random' (bilinear|bicubic) or fixed

    @property
    def op_names(self) -> Tuple[str, ...]:
        return _RAND_INCREASING_TRANSFORMS if self.spec.increasing else _RAND_TRANSFORMS

    def magnitude(self, key: Key) -> tf.Tensor:
        m, std = float(self.spec.magnitude), self.spec.magnitude_std
        if std == float('inf'):
            level = _uniform(key, (), 0.0, m)
        elif std > 0:
            level = m + std * tf.random.stateless_normal((), seed=key, dtype=tf.float64)
        else:
            level = tf.constant(m, tf.float64)
        return tf.clip_by_value(level, 0.0, float(self.spec.magnitude_max))

    def method(self, key: Key) -> tf.Tensor:
        """The geometric ops' resampling: timm draws bilinear or bicubic per op call."""
        if self.interpolation != 'random':
            return tf.constant(AFFINE_METHODS.index(self.interpolation), tf.int32)
        return tf.where(_uniform(key) < 0.5, 1, 2)

    def __call__(self, image: tf.Tensor, key: Key) -> tf.Tensor:
        op_ids = tf.constant([_RAND_OP_NAMES.index(n) for n in self.op_names], tf.int32)
        fill = tf.constant(self.fill, tf.uint8)
        for layer in range(self.spec.num_layers):
            k_choice, k_apply, k_level, k_arg, k_method = split_key(fold_in(key, layer), 5)
            choice = tf.cast(tf.floor(_uniform(k_choice) * len(self.op_names)), tf.int32)
            op_index = op_ids[tf.minimum(choice, len(self.op_names) - 1)]
            args = (op_index, self.magnitude(k_level), tf.cast(k_arg, tf.int64), fill,
                    self.method(k_method))
            # timm skips the op when random() > prob
            image = tf.cond(_uniform(k_apply) <= self.spec.prob,
                            lambda img=image, args=args: apply_rand_op(img, *args),
                            lambda img=image: img)
        return image


# ----------------------------------------------------------------------------- colour jitter

@dataclasses.dataclass(frozen=True)
class ColorJitter:
    """torchvision ``ColorJitter(brightness, contrast, saturation)`` on PIL images: factors
    uniform in [max(0, 1 - s), 1 + s], applied in a random order (hue is not supported)."""
    strength: Tuple[float, float, float] = (0.4, 0.4, 0.4)

    def __call__(self, image: tf.Tensor, key: Key) -> tf.Tensor:
        k_order, *k_factors = split_key(key, 4)
        ops = []
        for op, s, k in zip((brightness, contrast, color), self.strength, k_factors):
            if s > 0:
                factor = _uniform(k, (), max(0.0, 1.0 - s), 1.0 + s, tf.float32)
                ops.append(lambda img, op=op, factor=factor: op(img, factor))
        if not ops:
            return image
        order = tf.argsort(_uniform(k_order, [len(ops)]))
        for position in range(len(ops)):
            branches = [lambda op=op, img=image: op(img) for op in ops]
            image = tf.ensure_shape(tf.switch_case(order[position], branches), image.shape)
        return image


# ----------------------------------------------------------------------------- normalize, erase

def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """torchvision ToTensor + Normalize: (x / 255 - mean) / std in float32 (the native op where
    available, the same float32 operations in TF ops otherwise)."""
    if image.dtype == tf.uint8 and native.available():
        return native.normalize(image, mean, std)
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# remode -> fill of the erased box, given (key, the box's shape [h, w, c]); timm draws the
# per-pixel noise for the box only
ERASE_FILLS: Dict[str, Callable] = {
    'pixel': lambda key, shape: tf.random.stateless_normal(shape, seed=key),
    'rand': lambda key, shape: tf.random.stateless_normal([1, 1, shape[2]], seed=key),
    'const': lambda key, shape: tf.zeros([1, 1, shape[2]]),
}


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """timm's ``RandomErasing`` (one box per image) on a normalized float32 image."""
    prob: float = 0.25
    mode: str = 'pixel'
    area: Tuple[float, float] = (0.02, 1 / 3)
    aspect: Tuple[float, float] = (0.3, 1 / 0.3)
    attempts: int = 10

    def __post_init__(self):
        if self.mode not in ERASE_FILLS:
            raise ValueError(f'random erasing mode {self.mode!r}; expected one of '
                             f'{sorted(ERASE_FILLS)}')

    def __call__(self, image: tf.Tensor, key: Key) -> tf.Tensor:
        k_apply, k_area, k_aspect, k_top, k_left, k_fill = split_key(key, 6)
        shape = tf.shape(image)
        img_h, img_w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        target = _uniform(k_area, [self.attempts], *self.area) * img_h * img_w
        aspect = tf.exp(_uniform(k_aspect, [self.attempts], math.log(self.aspect[0]),
                                 math.log(self.aspect[1])))
        cand_h = tf.round(tf.sqrt(target * aspect))
        cand_w = tf.round(tf.sqrt(target / aspect))
        fits = (cand_w < img_w) & (cand_h < img_h)
        first = tf.argmax(tf.cast(fits, tf.int32))
        h, w = tf.cast(cand_h[first], tf.int32), tf.cast(cand_w[first], tf.int32)
        top, left = _randint(k_top, shape[0] - h), _randint(k_left, shape[1] - w)
        erase = (_uniform(k_apply) <= self.prob) & tf.reduce_any(fits)

        def erased():   # the box's rows: left of it, the fill, right of it
            size = tf.stack([h, w, shape[2]])
            fill = tf.broadcast_to(ERASE_FILLS[self.mode](k_fill, size), size)
            band = image[top:top + h]
            band = tf.concat([band[:, :left], fill, band[:, left + w:]], axis=1)
            return tf.concat([image[:top], band, image[top + h:]], axis=0)
        return tf.ensure_shape(tf.cond(erase, erased, lambda: image), image.shape)


# ----------------------------------------------------------------------------- composed chains

def _build_hflip(t: 'TrainTransform'):
    return (lambda img, key: random_hflip(img, key, t.hflip)) if t.hflip > 0 else None


def _build_randaugment(t: 'TrainTransform'):
    if not t.randaugment:
        return None
    # timm passes a fixed train interpolation on to the geometric ops; PIL's affine transform
    # only knows nearest, bilinear and bicubic
    if t.interpolation not in ('random',) + AFFINE_METHODS:
        raise ValueError(f"RandAugment needs train interpolation 'random' or one of "
                         f"{AFFINE_METHODS}, got {t.interpolation!r}")
    spec = RandAugmentSpec.parse(t.randaugment)
    return RandAugment(spec, fill_from_mean(t.mean), t.interpolation)


def _build_color_jitter(t: 'TrainTransform'):
    if t.randaugment or not t.color_jitter:
        return None                         # timm disables colour jitter when RandAugment is on
    strength = t.color_jitter
    if isinstance(strength, (int, float)):
        strength = (float(strength),) * 3
    if len(strength) == 4 and strength[3]:
        raise ValueError('colour jitter on hue is not supported; give 3 values or hue 0')
    return ColorJitter(tuple(strength[:3]))


def _build_erasing(t: 'TrainTransform'):
    return RandomErasing(t.reprob, t.remode) if t.reprob > 0 else None


# Stage name -> (stable key id, builder). Ids never change, so switching a stage on or off does
# not change the random draws of the others. uint8 stages run before normalization, float after.
UINT8_STAGES: Dict[str, Tuple[int, Callable]] = {
    'hflip': (2, _build_hflip),
    'randaugment': (3, _build_randaugment),
    'color_jitter': (4, _build_color_jitter),
}
FLOAT_STAGES: Dict[str, Tuple[int, Callable]] = {
    'random_erasing': (5, _build_erasing),
}
_CROP_KEY, _INTERP_KEY = 0, 1


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """The full train chain for one example; ``__call__(image_uint8, key)`` -> float32.

    Split in two so a JPEG can be decoded only inside its crop window: ``crop_window(shape,
    key)`` then ``after_crop(cropped, key)`` with the same ``key``.
    """
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = 'random'
    hflip: float = 0.5
    color_jitter: Union[float, Tuple[float, ...]] = 0.4
    randaugment: str = ''
    reprob: float = 0.0
    remode: str = 'pixel'

    def __post_init__(self):
        if self.interpolation != 'random' and self.interpolation not in RESIZE_METHODS:
            raise ValueError(f"train interpolation {self.interpolation!r}; expected 'random' or "
                             f"one of {sorted(RESIZE_METHODS)}")
        stages = {**UINT8_STAGES, **FLOAT_STAGES}
        built = {name: build(self) for name, (_, build) in stages.items()}   # validates options
        object.__setattr__(self, '_stages', built)

    def crop_window(self, shape: tf.Tensor, key: Key) -> Window:
        return random_resized_crop_window(shape, fold_in(key, _CROP_KEY), self.scale, self.ratio)

    def after_crop(self, image: tf.Tensor, key: Key) -> tf.Tensor:
        size = (self.image_size, self.image_size)
        methods = RANDOM_INTERPOLATIONS if self.interpolation == 'random' else (self.interpolation,)
        image = random_interpolation_resize(image, size, fold_in(key, _INTERP_KEY), methods)
        image = self._run(UINT8_STAGES, image, key)
        return self._run(FLOAT_STAGES, normalize(image, self.mean, self.std), key)

    def _run(self, stages, image, key):
        for name, (key_id, _) in stages.items():
            stage = self._stages[name]
            if stage is not None:
                image = stage(image, fold_in(key, key_id))
        return image

    def __call__(self, image: tf.Tensor, key: Key) -> tf.Tensor:
        return self.after_crop(crop(image, self.crop_window(tf.shape(image), key)), key)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """timm's eval chain: short side -> floor(size / crop_pct), centre crop, normalize."""
    image_size: int
    crop_pct: float
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def __post_init__(self):
        if self.interpolation not in RESIZE_METHODS:
            raise ValueError(f"eval interpolation {self.interpolation!r}; expected one of "
                             f"{sorted(RESIZE_METHODS)}")
        if not self.crop_pct > 0:
            raise ValueError(f'crop_pct must be positive, got {self.crop_pct}')

    @property
    def resize_size(self) -> int:
        return math.floor(self.image_size / self.crop_pct)

    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        image = resize_short_side(image, self.resize_size, self.interpolation)
        return normalize(center_crop(image, self.image_size), self.mean, self.std)
