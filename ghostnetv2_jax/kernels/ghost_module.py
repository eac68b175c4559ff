"""A ghost module at inference as one native CPU op (GhostNet's Ghost module, GhostNetV2's gate).

``ghost_module`` computes, for the module's primary-conv output ``p`` (or its input ``x`` and
the primary 1x1 kernel), both BatchNorms as per-channel affines and the cheap depthwise kernel::

    x1  = act(p * s1 + b1)                       p = x @ primary  (module form)
    out = concat([x1, act(dw(x1) * s2 + b2)])[..., :features]
    out = out * nearest_upsample(gate)           (gated: GhostNetV2's DFC attention)
    out = dw2(out) * s3 + b3                     (strided: a stride-2 block's conv_dw and bn_dw)

in one pass over memory: XLA would run three to five. The activation is ReLU or none, the
cheap operation a stride-1 'same' depthwise conv of a size in ``KERNEL_SIZES`` with one output
per channel (ratio 2). Gradients go through ``ghost_module_reference`` (separate ops).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from ghostnetv2_jax.kernels.depthwise import depthwise
from ghostnetv2_jax.kernels.ffi import call

KERNEL_SIZES = ((3, 3), (5, 5), (1, 5), (5, 1))   # the sizes compiled in csrc/


class StridedDepthwise(NamedTuple):
    """A depthwise conv and its BatchNorm's inference affine after a ghost module, ``dw(out, kernel)
    * scale + bias``: a stride-2 bottleneck's conv_dw and bn_dw."""
    kernel: jax.Array                          # (kh, kw, 1, C)
    scale: jax.Array                           # (C,)
    bias: jax.Array                            # (C,)
    strides: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]   # symmetric


def apply_strided(x, strided: StridedDepthwise):
    """``strided``'s depthwise conv and affine on ``x``, as separate ops."""
    return depthwise(x, strided.kernel, strided.strides, strided.padding) * strided.scale + strided.bias


def _nearest_upsample(gate, size):
    """Nearest up-sampling by whole factors (PyTorch's rule for them: each value repeated)."""
    (h, w), (oh, ow) = gate.shape[1:3], size
    return jnp.repeat(jnp.repeat(gate, oh // h, axis=1), ow // w, axis=2)


def ghost_module_reference(p, s1, b1, kernel, s2, b2, features: int, relu: bool, gate=None, primary=None,
                           strided: Optional[StridedDepthwise] = None):
    """What ``ghost_module`` computes, as separate ops (and its gradient, by autodiff)."""
    act = jax.nn.relu if relu else (lambda v: v)
    kh, kw = kernel.shape[:2]
    if primary is not None:
        p = jnp.einsum('nhwe,ec->nhwc', p, primary[0, 0], precision=jax.lax.Precision.HIGHEST)
    x1 = act(p * s1 + b1)
    x2 = act(depthwise(x1, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2))) * s2 + b2)
    out = jnp.concatenate([x1, x2], axis=-1)[..., :features]
    out = out if gate is None else out * _nearest_upsample(gate, out.shape[1:3])
    return out if strided is None else apply_strided(out, strided)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry):
    kh, kw = kernel.shape[:2]
    static = (kh // 2, kw // 2, int(relu))
    operands = (p,) if primary is None else (p, primary)
    operands += (s1, b1, kernel, s2, b2) + (() if gate is None else (gate,))
    target = 'gnv2_ghost_module_after_primary' if primary is None else 'gnv2_ghost_module'
    out_hw = p.shape[1:3]
    if dw is not None:   # (kernel, scale, bias); dw_geometry (sh, sw, pt, pl)
        target += '_strided'
        static += dw_geometry
        operands += tuple(dw)
        (dkh, dkw), (sh, sw, pt, pl) = dw[0].shape[:2], dw_geometry
        out_hw = ((out_hw[0] + 2 * pt - dkh) // sh + 1, (out_hw[1] + 2 * pl - dkw) // sw + 1)
    target += '_gated' if gate is not None else ''
    return call(target, static, (*out_hw, features), *operands).astype(p.dtype)


def _ghost_fwd(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry):
    out = _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry)
    return out, (p, s1, b1, kernel, s2, b2, gate, primary, dw)


def _ghost_bwd(features, relu, dw_geometry, residuals, g):
    *ops, gate, primary, dw = residuals    # any of these may be None: no cotangent, no vjp input

    def reference(ops, gate, primary, dw):
        strided = None
        if dw is not None:
            sh, sw, pt, pl = dw_geometry
            strided = StridedDepthwise(*dw, (sh, sw), ((pt, pt), (pl, pl)))
        return ghost_module_reference(*ops, features, relu, gate, primary, strided)
    _, vjp = jax.vjp(reference, tuple(ops), gate, primary, dw)
    d_ops, d_gate, d_primary, d_dw = vjp(g)
    return (*d_ops, d_gate, d_primary, d_dw)


_ghost.defvjp(_ghost_fwd, _ghost_bwd)


def _check_strided(strided: StridedDepthwise, features: int):
    (sh, sw), ((pt, pb), (pl, pr)) = strided.strides, strided.padding
    if tuple(strided.kernel.shape) not in {(*k, 1, features) for k in KERNEL_SIZES}:
        raise ValueError(f'ghost_module: strided kernel {strided.kernel.shape} is not one of '
                         f'{KERNEL_SIZES} x (1, {features})')
    if (strided.scale.shape, strided.bias.shape) != ((features,), (features,)):
        raise ValueError(f'ghost_module: strided scale and bias must be ({features},)')
    kh3, kw3 = strided.kernel.shape[:2]
    if pt != pb or pl != pr or min(sh, sw) < 1 or not (0 <= pt < kh3 and 0 <= pl < kw3):
        raise ValueError(f'ghost_module: strided needs positive strides and symmetric padding '
                         f'smaller than the kernel, got {strided.strides}, {strided.padding}')
    return (strided.kernel, strided.scale, strided.bias), tuple(int(v) for v in (sh, sw, pt, pl))


def ghost_module(p, s1, b1, kernel, s2, b2, features: int, relu: bool, gate=None, primary=None,
                 strided: Optional[StridedDepthwise] = None):
    """The ghost module of the module docstring in one op. ``p``: the primary conv's output
    (N, H, W, C) before its BatchNorm; with ``primary`` ((1, 1, Cin, C), the 1x1 kernel), the
    module's input (N, H, W, Cin) instead, and the primary conv runs in the same pass. ``gate``
    (N, H / fh, W / fw, features) for whole factors fh, fw. ``strided`` needs ``primary``; only
    the depthwise conv's output is then stored. Float32; differentiable."""
    n, h, w, c = p.shape
    if primary is not None:
        if primary.ndim != 4 or tuple(primary.shape[:3]) != (1, 1, c):
            raise ValueError(f'ghost_module: primary kernel {primary.shape} must be (1, 1, {c}, C)')
        c = primary.shape[-1]
    if tuple(kernel.shape) not in {(*k, 1, c) for k in KERNEL_SIZES}:
        raise ValueError(f'ghost_module: kernel {kernel.shape} is not one of {KERNEL_SIZES} x (1, {c})')
    if not c <= features <= 2 * c:
        raise ValueError(f'ghost_module: features must be in [{c}, {2 * c}], got {features}')
    if gate is not None:
        gn, gh, gw, gc = gate.shape
        if (gn, gc) != (n, features) or not (0 < gh and 0 < gw and h % gh == 0 and w % gw == 0):
            raise ValueError(f'ghost_module: gate {gate.shape} must be ({n}, {h}/fh, {w}/fw, {features}) '
                             'for whole factors fh, fw')
    dw = dw_geometry = None
    if strided is not None:
        if primary is None:
            raise ValueError('ghost_module: strided needs the module form (primary)')
        dw, dw_geometry = _check_strided(strided, features)
    return _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, int(features), bool(relu), dw_geometry)
