"""Basic layers with PyTorch semantics: padding, BatchNorm, gates, resizing, channel rounding.

Everything here exists because the Flax default differs from PyTorch in a way that changes
numbers: 'SAME' padding is asymmetric for stride 2, ``flax.linen.BatchNorm`` keeps the biased
variance, ``jax.image.resize`` uses half-pixel nearest and a different bicubic kernel.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
IntOrPair = Union[int, Tuple[int, int]]


def make_divisible(v: float, divisor: int = 4, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor`` (timm/TF rule, never below 90% of v)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def pair(v: IntOrPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """PyTorch's ``Hardsigmoid``: relu6(x + 3) / 6."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def torch_padding(kernel_size: IntOrPair, padding: Optional[IntOrPair] = None):
    """Explicit symmetric padding, PyTorch style (defaults to k // 2 per spatial dim)."""
    kh, kw = pair(kernel_size)
    ph, pw = (kh // 2, kw // 2) if padding is None else pair(padding)
    return ((ph, ph), (pw, pw))


@jax.custom_vjp
def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of NHWC (or N...C) ``x``, with a backward that XLA:CPU runs
    without large transposes. Autodiff's kernel gradient is one contraction over all N*H*W pixels,
    for which layout assignment first transposes both activations (measured: ~10% of a GhostNet
    train step at 112x112); where the activations are large it is done per image instead."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _channel_matmul_fwd(x, w):
    return channel_matmul(x, w), (x, w)


def _channel_matmul_bwd(residuals, g):
    x, w = residuals
    gx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    (i, o), n, m = w.shape, x.shape[0], math.prod(x.shape[:-1])
    if n > 1 and 8 * n * i * o <= m * (i + o):
        # Many pixels, few channels (early layers): per-image products, then a small sum.
        xb, gb = x.reshape(n, -1, i), g.reshape(n, -1, o)
        gw = lax.dot_general(xb, gb, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
        return gx, jnp.sum(gw, axis=0).astype(w.dtype)
    # Few pixels, many channels (late layers): per-image products would outweigh the
    # activations, and the transposes the single contraction needs are small.
    gw = lax.dot_general(x.reshape(m, i), g.reshape(m, o), (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return gx, gw.astype(w.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _im2col(x: jax.Array, kh: int, kw: int, strides, padding) -> jax.Array:
    """(N, Ho, Wo, kh*kw*C) patches in HWIO kernel order, for convs with few input channels."""
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1)


IM2COL_MAX_DEPTH = 32   # kh*kw*C_in up to which a conv runs as patches @ kernel (the 3x3x3 stem)


def matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` (NHWC, HWIO) for the convs XLA:CPU handles poorly, as matmuls:
    1x1 unpadded unstrided convs over the channel axis, and convs with a shallow patch (the
    stem: 3x3x3) through im2col. Anything else goes to ``lax.conv_general_dilated``."""
    one = lambda v: v is None or all(int(d) == 1 for d in v)
    plain = feature_group_count == 1 and one(lhs_dilation) and one(rhs_dilation) and not kwargs
    kh, kw, cin, cout = rhs.shape if rhs.ndim == 4 else (0, 0, 0, 0)
    if plain and rhs.ndim == 4 and (kh, kw) == (1, 1) and one(window_strides) \
            and all(tuple(p) == (0, 0) for p in padding):
        return channel_matmul(lhs, rhs.reshape(cin, cout))
    if plain and rhs.ndim == 4 and kh * kw * cin <= IM2COL_MAX_DEPTH:
        patches = _im2col(lhs, kh, kw, tuple(window_strides), tuple(tuple(p) for p in padding))
        return channel_matmul(patches, rhs.reshape(kh * kw * cin, cout))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)


def conv2d(features: int, kernel_size: IntOrPair = 1, stride: IntOrPair = 1,
           padding: Optional[IntOrPair] = None, use_bias: bool = False,
           dtype: Dtype = jnp.float32, name: Optional[str] = None,
           conv_fn: Callable = matmul_conv) -> nn.Conv:
    """A dense (groups=1) conv with PyTorch's symmetric padding; kernel layout HWIO.
    Runs through ``conv_fn`` (default ``matmul_conv``); the variables are nn.Conv's either way."""
    return nn.Conv(features, pair(kernel_size), strides=pair(stride),
                   padding=torch_padding(kernel_size, padding), use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32, name=name, conv_general_dilated=conv_fn)


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics.

    - eps 1e-5 and momentum 0.1 in PyTorch terms (new = (1 - m) * old + m * batch);
    - normalises with the biased batch variance but stores the unbiased one in ``var``;
    - statistics are always float32, whatever the compute dtype;
    - the batch mean over axes (N, H, W) is a global reduction, so under ``jax.jit`` with the
      batch sharded over devices it is computed over the global batch with no extra code.

    ``folded=True`` is the inference form made by ``ghostnetv2_jax.deploy``: the normalisation is
    folded into the preceding conv's kernel and only the per-channel shift ``bias`` is left.

    ``impl`` names a depthwise implementation (``nn.depthwise.IMPLEMENTATIONS``; models pass
    theirs): where it resolves to 'native', training-mode statistics and their gradient's two
    sums run as the native kernels' one-pass reductions (float32 NHWC inputs). XLA runs them as
    separate elementwise and reduction passes: dropping them all made a GhostNetV2 train step on
    CPU 16% faster, an upper bound; these kernels gained 4-6%.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    folded: bool = False
    impl: str = 'auto'

    def _native_sums(self, x: jax.Array) -> bool:
        from ghostnetv2_jax.nn.depthwise import resolve_impl   # it imports this module
        return x.ndim == 4 and x.dtype == jnp.float32 and resolve_impl(self.impl) == 'native'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, affine_only: bool = False):
        """Normalise ``x``; with ``affine_only`` (inference) return the per-channel (mul, add)
        that inference applies as ``x * mul + add`` instead, for ops that fuse it."""
        c = x.shape[-1]
        if affine_only and train:
            raise ValueError('BatchNorm(affine_only=True) is the inference form; train uses batch statistics')
        if self.folded:
            if train:
                raise ValueError('a model with folded BatchNorm (ghostnetv2_jax.deploy) is inference-only')
            bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
            if affine_only:
                return jnp.ones((c,), self.dtype), bias.astype(self.dtype)
            return x + bias.astype(self.dtype)
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        if train:
            x = x.astype(self.dtype)
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self._native_sums(x))
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                m = self.momentum
                mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
            return y
        # Fold into one per-channel affine: a single multiply-add over the activation.
        mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
        add = bias - ra_mean.value * mul
        if affine_only:
            return mul.astype(self.dtype), add.astype(self.dtype)
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, native: bool = False):
    """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch variance).

    The variance is two-pass (mean of squared deviations), as torch computes it. The backward is
    the closed form, dx = k * (g - mean(g) - xhat * mean(g * xhat)) with k = scale / std, from two
    reductions, sum(g) and sum(g * x), that read only same-shape operands: autodiff of the
    two-pass forward takes three and materialises an activation-sized intermediate (measured:
    BatchNorm was ~20% of a GhostNet train step on CPU). With ``native`` (float32 NHWC on CPU)
    the statistics and both sums are the native kernels' one-pass reductions
    (``nn.depthwise_native.batch_norm_moments`` / ``batch_norm_grad_sums``).
    """
    return _bn_train_fwd(x, scale, bias, epsilon, native)[0]


def _bn_train_fwd(x, scale, bias, epsilon, native):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    if native:
        from ghostnetv2_jax.nn import depthwise_native   # it imports this module
        mean, var = depthwise_native.batch_norm_moments(x32)
    else:
        mean = jnp.mean(x32, axes)
        var = jnp.mean(jnp.square(x32 - mean), axes)
    rstd = lax.rsqrt(var + epsilon)
    mul = scale * rstd
    add = bias - mean * mul
    y = x * mul.astype(x.dtype) + add.astype(x.dtype)
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, native, residuals, cotangents):
    del epsilon
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    if native:
        from ghostnetv2_jax.nn import depthwise_native
        sum_g, sum_gc = depthwise_native.batch_norm_grad_sums(g32, x32, mean)
    else:
        sum_g = jnp.sum(g32, axes)
        sum_gc = jnp.sum(g32 * x32, axes) - mean * sum_g        # sum(g * (x - mean))
    k = scale * rstd
    # dx = k*g + x * cx + c0; the mean/var outputs' own cotangents (zero when they only feed
    # the running statistics) enter the same per-channel coefficients.
    cx = -k * rstd * rstd * sum_gc / n + 2.0 * g_var / n
    c0 = -k * sum_g / n - cx * mean + g_mean / n
    dx = g * k.astype(g.dtype) + x * cx.astype(x.dtype) + c0.astype(x.dtype)
    return dx.astype(x.dtype), sum_gc * rstd, sum_g


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


# ----------------------------------------------------------------------------- resizing
def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    # PyTorch: src = min(floor(dst * (float)(in / out)), in - 1), computed in float32.
    scale = np.float32(in_size / out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _cubic_weights(t: np.ndarray, a: np.float32 = np.float32(-0.75)) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (Keys, a=-0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + np.float32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interp_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """(out, in) matrix that reproduces ``F.interpolate(..., align_corners=False)`` on one axis."""
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if method == 'nearest':
        m[rows, _nearest_index(in_size, out_size)] = 1.0
        return m
    # float32 like PyTorch's kernels, so the interpolation weights round the same way.
    f32 = np.float32
    src = f32(in_size / out_size) * (rows.astype(f32) + f32(0.5)) - f32(0.5)
    if method == 'bilinear':
        src = np.maximum(src, f32(0))
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, in_size - 1)
        lam = src - i0
        np.add.at(m, (rows, i0), 1.0 - lam)
        np.add.at(m, (rows, i1), lam)
        return m
    if method == 'bicubic':
        i0 = np.floor(src).astype(np.int64)
        w = _cubic_weights(src - i0)
        for k in range(4):
            np.add.at(m, (rows, np.clip(i0 - 1 + k, 0, in_size - 1)), w[:, k])
        return m
    raise ValueError(f"unknown resize method {method!r}; expected nearest, bilinear or bicubic")


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, no padding (odd sizes floor), as a sum of the four strided
    views: its gradient is elementwise, where reduce_window's is a padded window reduction."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    s = lambda i, j: x[:, i:h:2, j:w:2]
    return (s(0, 0) + s(0, 1) + s(1, 0) + s(1, 1)) * 0.25


def _repeat_axis(x: jax.Array, axis: int, times: int) -> jax.Array:
    """Nearest upsampling by an integer factor along one axis, as a stack + reshape: its gradient
    is a sum of strided slices that XLA fuses, where a broadcast's is a separate reduction."""
    if times == 1:
        return x
    y = jnp.stack([x] * times, axis=axis + 1)
    return y.reshape(x.shape[:axis] + (x.shape[axis] * times,) + x.shape[axis + 1:])


def resize(x: jax.Array, size: Sequence[int], method: str = 'nearest') -> jax.Array:
    """Resize NHWC ``x`` to ``size`` (H, W) exactly as PyTorch's ``F.interpolate`` does."""
    (h, w), (oh, ow) = x.shape[1:3], tuple(size)
    if (h, w) == (oh, ow):
        return x
    if method == 'nearest':
        if oh % h == 0 and ow % w == 0:  # integer factor: copies, no gather
            return _repeat_axis(_repeat_axis(x, 1, oh // h), 2, ow // w)
        x = jnp.take(x, jnp.asarray(_nearest_index(h, oh)), axis=1)
        return jnp.take(x, jnp.asarray(_nearest_index(w, ow)), axis=2)
    mh = jnp.asarray(interp_matrix(h, oh, method), x.dtype)
    mw = jnp.asarray(interp_matrix(w, ow, method), x.dtype)
    return jnp.einsum('oh,nhwc,pw->nopc', mh, x, mw)
