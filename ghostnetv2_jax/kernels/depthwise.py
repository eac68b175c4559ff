"""Depthwise convolution (forward, input and kernel gradient) as native CPU custom calls."""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from ghostnetv2_jax.kernels.ffi import call

Padding = Tuple[Tuple[int, int], Tuple[int, int]]


def depthwise_reference(x, kernel, strides: Sequence[int], padding: Padding):
    """What ``depthwise`` computes, with XLA's grouped convolution."""
    return jax.lax.conv_general_dilated(x, kernel, tuple(strides), tuple(padding),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=x.shape[-1],
                                        precision=jax.lax.Precision.HIGHEST)


def _static(strides, padding):
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return sh, sw, pt, pl


def _forward(x, kernel, strides, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel.shape[:2], strides, padding
    _, h, w, c = x.shape
    out_tail = ((h + sum(ph) - kh) // sh + 1, (w + sum(pw) - kw) // sw + 1, c)
    return call('gnv2_depthwise_forward', _static(strides, padding), out_tail, x, kernel).astype(x.dtype)


def depthwise_grads(x, kernel, g, strides, padding):
    """(dx, dkernel) of ``depthwise`` at ``x``, ``kernel`` for the output cotangent ``g``."""
    static = _static(strides, padding)
    dx = call('gnv2_depthwise_grad_input', static, x.shape[1:], g, kernel)
    dk = jnp.sum(call('gnv2_depthwise_grad_kernel', static, kernel.shape, x, g), axis=0)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    return depthwise_grads(x, kernel, g, strides, padding)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def canonical_padding(padding) -> Padding:
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if any(v < 0 for p in padding for v in p):
        raise ValueError(f'the native depthwise conv needs non-negative padding, got {padding}')
    return padding


def depthwise(x, kernel, strides: Sequence[int], padding: Sequence[Sequence[int]]):
    """Depthwise cross-correlation: NHWC ``x``, (kh, kw, 1, C) ``kernel``, explicit padding, any
    stride. Computes in float32 (other dtypes are cast in and out); differentiable."""
    return _depthwise(x, kernel, tuple(int(v) for v in strides), canonical_padding(padding))
