"""Depthwise convolution with a selectable implementation.

``'xla'``    ``lax.conv_general_dilated(feature_group_count=C)``: XLA's grouped convolution.
             Fast on GPU/TPU. On CPU it is lowered to a slow generic loop (jax-ml/jax#23713), and
             its kernel gradient even more so.
``'shift'``  a sum of kh*kw shifted slices, each multiplied by one kernel tap: elementwise work
             that XLA fuses into one loop. Its backward is written by hand (``jax.custom_vjp``),
             because autodiff of the slices is slow on CPU: the kernel gradient becomes one full
             reduction per tap over a materialised slice.
``'native'`` the C++ custom calls of ``ghostnetv2_jax.kernels.depthwise``: forward, input
             gradient and kernel gradient each stream their inputs once. CPU only; float32.
``'auto'``   per lowering platform (``nn.platform``): on CPU 'native' where the kernels build
             and load, else 'shift'; 'xla' on every other platform.

The kernel is stored as (kh, kw, 1, C*multiplier), the layout of a Flax grouped conv and the
transpose of PyTorch's (C*multiplier, 1, kh, kw), so checkpoints do not depend on the choice.

How 'shift' handles strides: the padded input (N, Hp, Wp, C) is viewed, for free, as
(N, Hp/sh, sh, Wp/sw, sw, C); tap (i, j) of a strided kernel is then a unit-stride slice of that
view at phase (i % sh, j % sw), so stride-2 layers are as regular as stride-1 ones.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghostnetv2_jax import kernels
from ghostnetv2_jax.kernels.depthwise import depthwise as depthwise_native
from ghostnetv2_jax.layers.helpers import IntOrPair, pair, torch_padding
from ghostnetv2_jax.layers.platform import differentiable_on_platform

IMPLEMENTATIONS = ('auto', 'xla', 'shift', 'native')
Padding = Tuple[Tuple[int, int], Tuple[int, int]]

# Rows of the output summed inside one loop fusion before the kernel-gradient reduction
# (see _grad_kernel). 8 keeps each fusion small while cutting the reduced data 8x.
KERNEL_GRAD_ROWS = 8


def check_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return impl


def cpu_impl() -> str:
    """What 'auto' runs where lowered for CPU: 'native' if the kernels build and load, else 'shift'."""
    return 'native' if kernels.available() else 'shift'


def depthwise_xla(x, kernel, strides, padding):
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


# ----------------------------------------------------------------------------- shift form
def _acc_dtype(dtype):
    """Sums of products are formed in at least float32 (bf16 inputs stay bf16 in memory)."""
    return jnp.promote_types(dtype, jnp.float32)


def _out_size(size: int, k: int, s: int, pad: Tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


def _phase_view(x, kernel_hw, strides, padding):
    """Pad NHWC ``x`` (PyTorch-style, explicit) and view it as (N, Hs, sh, Ws, sw, C).

    The bottom/right edges get extra zeros so the padded size is a multiple of the stride; no
    tap reads them. Returns the view and the output size (Ho, Wo).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_hw, strides, padding
    n, h, w, c = x.shape
    ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    hs, ws = -(-(h + sum(ph)) // sh), -(-(w + sum(pw)) // sw)
    xp = jnp.pad(x, ((0, 0), (ph[0], hs * sh - h - ph[0]), (pw[0], ws * sw - w - pw[0]), (0, 0)))
    return xp.reshape(n, hs, sh, ws, sw, c), (ho, wo)


def _tap(view, i: int, j: int, rows: int, cols: int, strides, row0: int = 0, row_step: int = 1):
    """Input under kernel tap (i, j) for output rows row0, row0 + row_step, ... (``rows`` of
    them) and output columns 0..cols-1, as an (N, rows, cols, C) array."""
    sh, sw = strides
    n, c = view.shape[0], view.shape[-1]
    a, b = i // sh + row0, j // sw
    t = lax.slice(view, (0, a, i % sh, b, j % sw, 0),
                  (n, a + row_step * (rows - 1) + 1, i % sh + 1, b + cols, j % sw + 1, c),
                  (1, row_step, 1, 1, 1, 1))
    return t.reshape(n, rows, cols, c)


def _shift_forward(x, kernel, strides, padding):
    view, (ho, wo) = _phase_view(x, kernel.shape[:2], strides, padding)
    acc = _acc_dtype(x.dtype)
    k = kernel.astype(acc)
    out = None
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            term = _tap(view, i, j, ho, wo, strides).astype(acc) * k[i, j, 0]
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _grad_input(g, kernel, x_shape, strides, padding):
    """Transposed depthwise conv, computed one stride phase at a time.

    Padded-input position s*u + a receives g[u - i // s] * k[i] from the taps i with i % s == a,
    so each phase is a stride-1 correlation with a sub-kernel and no product touches the zeros
    a dilated cotangent would hold. Phases are interleaved by a free reshape, then cropped.
    """
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    n, h, w, c = x_shape
    (pt, _), (pl, _) = padding
    hs, ws = -(-(h + sum(padding[0])) // sh), -(-(w + sum(padding[1])) // sw)
    ho, wo = g.shape[1:3]
    lo_h, lo_w = (kh - 1) // sh, (kw - 1) // sw
    acc = _acc_dtype(g.dtype)
    k = kernel.astype(acc)
    gp = jnp.pad(g, ((0, 0), (lo_h, hs - ho), (lo_w, ws - wo), (0, 0)))
    phase_rows = []
    for a in range(sh):
        phase_cols = []
        for b in range(sw):
            out = jnp.zeros((n, hs, ws, c), acc)
            for i in range(a, kh, sh):
                for j in range(b, kw, sw):
                    oi, oj = lo_h - i // sh, lo_w - j // sw
                    out = out + lax.slice(gp, (0, oi, oj, 0), (n, oi + hs, oj + ws, c)).astype(acc) * k[i, j, 0]
            phase_cols.append(out)
        phase_rows.append(jnp.stack(phase_cols, axis=3))          # N, Hs, Ws, sw, C
    full = jnp.stack(phase_rows, axis=2).reshape(n, hs * sh, ws * sw, c)
    return full[:, pt:pt + h, pl:pl + w].astype(g.dtype)


def _grad_kernel(x, g, kernel_hw, strides, padding, kernel_dtype):
    """dK[i, j, c] = sum over n, h, w of tap_ij(x) * g.

    A reduce per tap would materialise every shifted slice (XLA:CPU hands the reduction to a
    library call that cannot read through a slice) and read g once per tap. Instead one loop
    fusion per tap sums ``r`` output rows elementwise (strided slices, fused), so the data left
    to reduce is ``r`` times smaller; the taps are stacked and reduced once.
    """
    kh, kw = kernel_hw
    view, (ho, wo) = _phase_view(x, kernel_hw, strides, padding)
    r = max(d for d in range(1, KERNEL_GRAD_ROWS + 1) if ho % d == 0)
    rows = ho // r
    n, c = g.shape[0], g.shape[-1]
    acc = _acc_dtype(g.dtype)
    g_rows = [lax.slice(g, (0, q, 0, 0), (n, q + r * (rows - 1) + 1, wo, c), (1, r, 1, 1)).astype(acc)
              for q in range(r)]
    partial = []
    for i in range(kh):
        for j in range(kw):
            s = None
            for q in range(r):
                term = _tap(view, i, j, rows, wo, strides, row0=q, row_step=r).astype(acc) * g_rows[q]
                s = term if s is None else s + term
            partial.append(s)
    dk = jnp.sum(jnp.stack(partial, axis=3), axis=(0, 1, 2))      # (kh * kw, C)
    return dk.reshape(kh, kw, 1, c).astype(kernel_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, strides, padding):
    return _shift_forward(x, kernel, strides, padding)


def _depthwise_shift_fwd(x, kernel, strides, padding):
    return _shift_forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_shift_bwd(strides, padding, residuals, g):
    # Materialise the cotangent and the input once: otherwise XLA re-fuses their producers (the
    # BatchNorm backward, the forward activation) into each of the many tap fusions below,
    # which multiplies both the work and the compile time.
    (x, kernel), g = lax.optimization_barrier((residuals, g))
    return (_grad_input(g, kernel, x.shape, strides, padding),
            _grad_kernel(x, g, kernel.shape[:2], strides, padding, kernel.dtype))


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_shift(x, kernel, strides: Sequence[int], padding: Sequence[Sequence[int]]):
    """sum_{i,j} pad(x)[:, i::sh, j::sw, :] * kernel[i, j] (a cross-correlation, like conv),
    with a hand-written backward."""
    return _depthwise_shift(x, kernel, tuple(strides), tuple(tuple(p) for p in padding))


def _native(x, kernel, strides, padding):
    if not kernels.available():
        raise RuntimeError(f"depthwise impl 'native' is unavailable: {kernels.load_error()}")
    return depthwise_native(x, kernel, strides, padding)


_IMPLS = {'xla': depthwise_xla, 'shift': depthwise_shift, 'native': _native}


def depthwise_conv(x, kernel, strides=(1, 1), padding=((0, 0), (0, 0)), impl: str = 'auto'):
    """Functional depthwise conv: NHWC ``x``, ``kernel`` (kh, kw, 1, C), explicit padding."""
    strides, padding = tuple(int(s) for s in strides), tuple(tuple(int(v) for v in p) for p in padding)
    if check_impl(impl) != 'auto':
        return _IMPLS[impl](x, kernel, strides, padding)
    form = lambda name: functools.partial(_IMPLS[name], strides=strides, padding=padding)
    return differentiable_on_platform(cpu=form(cpu_impl()), default=form('xla'))(x, kernel)


class DepthwiseConv(nn.Module):
    """Depthwise conv (groups = input channels) with PyTorch's symmetric padding, no bias.

    ``multiplier`` > 1 gives each input channel that many outputs (PyTorch: out = in * m,
    groups = in), as GhostNet's cheap operation does for ratio > 2.
    """
    kernel_size: IntOrPair = 3
    stride: IntOrPair = 1
    padding: Optional[IntOrPair] = None
    multiplier: int = 1
    impl: str = 'auto'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = pair(self.kernel_size)
        c = x.shape[-1] * self.multiplier
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, 1, c), jnp.float32)
        if self.multiplier > 1:  # output channel o reads input channel o // multiplier
            x = jnp.repeat(x, self.multiplier, axis=-1)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), pair(self.stride),
                              torch_padding((kh, kw), self.padding), self.impl)
