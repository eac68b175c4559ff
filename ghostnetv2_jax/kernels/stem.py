"""The stem: a dense conv with few input channels, its BatchNorm affine and ReLU, as one native
CPU op. XLA runs such a conv (3x3x3, stride 2) as strided slices, a concatenation into patches,
a matmul and an elementwise pass; here each output pixel keeps all its accumulators in registers."""
from __future__ import annotations

import functools
from typing import Sequence

import jax

from ghostnetv2_jax.kernels.ffi import call


def stem_conv_reference(x, kernel, scale, bias, strides, padding, relu: bool):
    """What ``stem_conv`` computes, with XLA's convolution (and its gradient, by autodiff)."""
    y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    y = y * scale + bias
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _stem(x, kernel, scale, bias, strides, padding, relu):
    (kh, kw, _, cout), (sh, sw), ((pt, pb), (pl, pr)) = kernel.shape, strides, padding
    _, h, w, _ = x.shape
    out_tail = ((h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, cout)
    return call('gnv2_stem_conv', (sh, sw, pt, pl, int(relu)), out_tail, x, kernel, scale, bias).astype(x.dtype)


def _stem_fwd(x, kernel, scale, bias, strides, padding, relu):
    return _stem(x, kernel, scale, bias, strides, padding, relu), (x, kernel, scale, bias)


def _stem_bwd(strides, padding, relu, residuals, g):
    _, vjp = jax.vjp(lambda *ops: stem_conv_reference(*ops, strides, padding, relu), *residuals)
    return vjp(g)


_stem.defvjp(_stem_fwd, _stem_bwd)


def stem_conv(x, kernel, scale, bias, strides: Sequence[int], padding: Sequence[Sequence[int]],
              relu: bool = True):
    """``act(conv(x, kernel) * scale + bias)`` in one pass: NHWC ``x``, HWIO ``kernel``, explicit
    padding, (Cout,) ``scale`` and ``bias``. Float32; differentiable (through XLA's conv)."""
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    kh, kw, cin, cout = kernel.shape
    if cin != x.shape[-1] or scale.shape != (cout,) or bias.shape != (cout,):
        raise ValueError(f'stem_conv: kernel {kernel.shape}, scale {scale.shape} and bias {bias.shape} '
                         f'do not fit input {x.shape}')
    if any(v < 0 for p in padding for v in p):
        raise ValueError(f'stem_conv needs non-negative padding, got {padding}')
    return _stem(x, kernel, scale, bias, tuple(int(v) for v in strides), padding, bool(relu))
