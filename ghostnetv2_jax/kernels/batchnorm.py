"""Training BatchNorm's per-channel reductions as native CPU custom calls, one pass each."""
from __future__ import annotations

import jax.numpy as jnp

from ghostnetv2_jax.kernels.ffi import call


def batch_norm_moments(x):
    """(mean, biased variance) over every axis of NHWC ``x`` but the channels, in one pass over
    ``x`` (float32). The kernel returns each example's mean and sum of squared deviations, shifted
    by its first pixel and summed in double; examples are combined here (Chan et al.)."""
    n, h, w, c = x.shape
    per = call('gnv2_batchnorm_moments', (), (2, c), x)
    means, m2 = per[:, 0], per[:, 1]
    mean = jnp.mean(means, axis=0)
    m2 = jnp.sum(m2, axis=0) + (h * w) * jnp.sum(jnp.square(means - mean), axis=0)
    return mean, m2 / max(n * h * w, 1)


def batch_norm_moments_reference(x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def batch_norm_grad_sums(g, x, mean):
    """(sum(g), sum(g * (x - mean))) over every axis of NHWC ``g`` and ``x`` but the channels,
    in one pass over both (float32; summed in double per example)."""
    per = jnp.sum(call('gnv2_batchnorm_grad_sums', (), (2, x.shape[-1]), g, x, mean), axis=0)
    return per[0], per[1]


def batch_norm_grad_sums_reference(g, x, mean):
    axes = tuple(range(x.ndim - 1))
    sum_g = jnp.sum(g, axes)
    return sum_g, jnp.sum(g * x, axes) - mean * sum_g
