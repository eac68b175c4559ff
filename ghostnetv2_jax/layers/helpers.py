"""Small pieces with PyTorch semantics: padding, gates, resizing, pooling, channel rounding.

They exist because the Flax/JAX default differs from PyTorch in a way that changes numbers:
'SAME' padding is asymmetric for stride 2, ``jax.image.resize`` uses half-pixel nearest and a
different bicubic kernel. The convolutions are in ``nn.conv`` and ``nn.depthwise``, BatchNorm in
``nn.batchnorm``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

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
