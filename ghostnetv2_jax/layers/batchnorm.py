"""BatchNorm2d with PyTorch semantics, and its training-mode op with a closed-form backward."""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghostnetv2_jax import kernels
from ghostnetv2_jax.kernels import batchnorm as native_sums
from ghostnetv2_jax.layers.platform import on_platform

Dtype = Any
EPSILON = 1e-5


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch semantics.

    - eps 1e-5 and momentum 0.1 in PyTorch terms (new = (1 - m) * old + m * batch);
    - normalises with the biased batch variance but stores the unbiased one in ``var``;
    - statistics are always float32, whatever the compute dtype;
    - the batch mean over axes (N, H, W) is a global reduction, so under ``jax.jit`` with the
      batch sharded over devices it is computed over the global batch with no extra code.

    ``folded=True`` is the inference form made by ``runtime.fold_batchnorm``: the normalisation
    is folded into the preceding conv's kernel and only the per-channel shift ``bias`` is left.
    """
    momentum: float = 0.1
    epsilon: float = EPSILON
    dtype: Dtype = jnp.float32
    folded: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        if self.folded:
            if train:
                raise ValueError('a model with folded BatchNorm (runtime.fold_batchnorm) is inference-only')
            bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
            return x + bias.astype(self.dtype)
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        if train:
            x = x.astype(self.dtype)
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                m = self.momentum
                mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
            return y
        mul, add = inference_affine({'scale': scale, 'bias': bias}, {'mean': ra_mean.value, 'var': ra_var.value},
                                    self.epsilon)
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


def inference_affine(params: Dict[str, jax.Array], stats: Optional[Dict[str, jax.Array]],
                     epsilon: float = EPSILON) -> Tuple[jax.Array, jax.Array]:
    """Eval-mode BatchNorm as one per-channel affine ``x * mul + add``, from its variables
    (``stats`` None or empty for the folded form, where ``mul`` is 1)."""
    if not stats:
        return jnp.ones_like(params['bias']), params['bias']
    mul = params['scale'] * lax.rsqrt(stats['var'] + epsilon)
    return mul, params['bias'] - stats['mean'] * mul


# ----------------------------------------------------------------------------- training op
def _cpu_moments(x):
    if x.ndim == 4 and kernels.available():
        return native_sums.batch_norm_moments(x)
    return native_sums.batch_norm_moments_reference(x)


def _cpu_grad_sums(g, x, mean):
    if x.ndim == 4 and kernels.available():
        return native_sums.batch_norm_grad_sums(g, x, mean)
    return native_sums.batch_norm_grad_sums_reference(g, x, mean)


# Per lowering platform: on CPU one pass over memory each (native kernels, where they build);
# elsewhere XLA's reductions, which it fuses on GPU/TPU.
_moments = on_platform(cpu=_cpu_moments, default=native_sums.batch_norm_moments_reference)
_grad_sums = on_platform(cpu=_cpu_grad_sums, default=native_sums.batch_norm_grad_sums_reference)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
    """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch variance).

    The variance is the mean of squared deviations, as torch computes it. The backward is the
    closed form, dx = k * (g - mean(g) - xhat * mean(g * xhat)) with k = scale / std, from two
    reductions, sum(g) and sum(g * (x - mean)), that read only same-shape operands: autodiff of
    the two-pass forward takes three and materialises an activation-sized intermediate.
    """
    return _bn_train_fwd(x, scale, bias, epsilon)[0]


def _bn_train_fwd(x, scale, bias, epsilon):
    mean, var = _moments(x.astype(jnp.float32))
    rstd = lax.rsqrt(var + epsilon)
    mul = scale * rstd
    add = bias - mean * mul
    y = x * mul.astype(x.dtype) + add.astype(x.dtype)
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = cotangents
    n = math.prod(x.shape[:-1])
    sum_g, sum_gc = _grad_sums(g.astype(jnp.float32), x.astype(jnp.float32), mean)
    k = scale * rstd
    # dx = k*g + x * cx + c0; the mean/var outputs' own cotangents (zero when they only feed
    # the running statistics) enter the same per-channel coefficients.
    cx = -k * rstd * rstd * sum_gc / n + 2.0 * g_var / n
    c0 = -k * sum_g / n - cx * mean + g_mean / n
    dx = g * k.astype(g.dtype) + x * cx.astype(x.dtype) + c0.astype(x.dtype)
    return dx.astype(x.dtype), sum_gc * rstd, sum_g


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)
