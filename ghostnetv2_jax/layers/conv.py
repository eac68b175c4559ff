"""Dense (groups=1) convolutions with PyTorch's symmetric padding, and their CPU matmul form.

XLA:CPU runs a 1x1 convolution and a convolution with a shallow patch (the 3x3x3 stem) faster as
matmuls (through im2col for the stem), and the kernel gradient of a 1x1 conv faster per image
where the activations are large. On CPU ``conv2d`` uses that form; on other platforms XLA's
convolution, chosen per lowering platform (``nn.platform``). Either way the variables are
``flax.linen.Conv``'s (HWIO kernel).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghostnetv2_jax.layers.helpers import IntOrPair, pair, torch_padding
from ghostnetv2_jax.layers.platform import differentiable_on_platform

Dtype = Any
IM2COL_MAX_DEPTH = 32   # kh*kw*C_in up to which a CPU conv runs as patches @ kernel (the 3x3x3 stem)


@jax.custom_vjp
def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of NHWC (or N...C) ``x``, with a backward that XLA:CPU runs
    without large transposes. Autodiff's kernel gradient is one contraction over all N*H*W pixels,
    for which layout assignment first transposes both activations; where the activations are
    large it is done per image instead."""
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


def _xla_conv(lhs, rhs, strides, padding):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pointwise_matmul(lhs, rhs):
    return channel_matmul(lhs, rhs.reshape(rhs.shape[2], rhs.shape[3]))


def _patch_matmul(lhs, rhs, strides, padding):
    kh, kw, cin, cout = rhs.shape
    return channel_matmul(_im2col(lhs, kh, kw, strides, padding), rhs.reshape(kh * kw * cin, cout))


def _nhwc(lhs, rhs, dimension_numbers) -> bool:
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    return dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for ``flax.linen.Conv`` (NHWC, HWIO). Plain convs that are
    1x1 unpadded unstrided, or have a patch of at most IM2COL_MAX_DEPTH values, run as matmuls
    where lowered for CPU; everything else, and every conv elsewhere, is XLA's convolution."""
    one = lambda v: v is None or all(int(d) == 1 for d in v)
    plain = (feature_group_count == 1 and one(lhs_dilation) and one(rhs_dilation) and not kwargs
             and precision is None and rhs.ndim == 4 and _nhwc(lhs, rhs, dimension_numbers))
    strides = tuple(int(s) for s in window_strides)
    padding = tuple(tuple(int(v) for v in p) for p in padding) if not isinstance(padding, str) else padding
    if plain and not isinstance(padding, str):
        xla = functools.partial(_xla_conv, strides=strides, padding=padding)
        kh, kw, cin, _ = rhs.shape
        if (kh, kw) == (1, 1) and one(strides) and all(p == (0, 0) for p in padding):
            return differentiable_on_platform(cpu=_pointwise_matmul, default=xla)(lhs, rhs)
        if kh * kw * cin <= IM2COL_MAX_DEPTH:
            cpu = functools.partial(_patch_matmul, strides=strides, padding=padding)
            return differentiable_on_platform(cpu=cpu, default=xla)(lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)


def conv2d(features: int, kernel_size: IntOrPair = 1, stride: IntOrPair = 1,
           padding: Optional[IntOrPair] = None, use_bias: bool = False,
           dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Conv:
    """A dense (groups=1) conv with PyTorch's symmetric padding; kernel layout HWIO, float32."""
    return nn.Conv(features, pair(kernel_size), strides=pair(stride),
                   padding=torch_padding(kernel_size, padding), use_bias=use_bias,
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=conv_general_dilated)
