"""The 1x1 convolution at inference, with its bias and activation, as one native CPU op that
spreads the output's tiles over both cores at every size (XLA's matmul runs the few hundred rows
of one image's maps on one thread)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ghostnetv2_jax.kernels.ffi import call


def pointwise_reference(x, kernel, bias, relu: bool):
    """What ``pointwise`` computes, with XLA's matmul (and its gradient, by autodiff)."""
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST) + bias
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pointwise(x, kernel, bias, relu):
    return call('gnv2_pointwise', (int(relu),), (*x.shape[1:3], kernel.shape[1]), x, kernel, bias).astype(x.dtype)


def _pointwise_fwd(x, kernel, bias, relu):
    return _pointwise(x, kernel, bias, relu), (x, kernel, bias)


def _pointwise_bwd(relu, residuals, g):
    _, vjp = jax.vjp(lambda *ops: pointwise_reference(*ops, relu), *residuals)
    return vjp(g)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise(x, kernel, bias=None, relu: bool = False):
    """``act(x @ kernel + bias)`` over the channels of NHWC ``x``: a 1x1 conv with a (Cin, Cout)
    ``kernel`` and a (Cout,) ``bias`` (zeros if None), ReLU if ``relu``. Float32; differentiable
    (through XLA's matmul). Each output is one sum over Cin in channel order."""
    if x.ndim != 4 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(f'pointwise: kernel {kernel.shape} does not fit NHWC input {x.shape}')
    cout = kernel.shape[1]
    bias = jnp.zeros((cout,), jnp.float32) if bias is None else bias
    if bias.shape != (cout,):
        raise ValueError(f'pointwise: bias {bias.shape} does not fit {cout} output channels')
    return _pointwise(x, kernel, bias, bool(relu))
