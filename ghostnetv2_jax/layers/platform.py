"""Choosing a layer's implementation per *lowering* platform.

A jitted or exported program is traced once and may be lowered for CPU, GPU or TPU. A layer that
has a faster CPU form (a native kernel, a matmul instead of a convolution) must therefore not
pick it from the tracing host's backend: ``on_platform`` stages out both forms with
``jax.lax.platform_dependent``, and lowering keeps only the one for its platform, so a program
traced on a CPU host and exported for TPU carries no CPU custom call.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax import lax


def on_platform(cpu: Callable, default: Callable) -> Callable:
    """``fn(*arrays)``: ``cpu(*arrays)`` where lowered for CPU, ``default(*arrays)`` elsewhere.
    For forms that are not differentiated through (see ``differentiable_on_platform``)."""
    return lambda *args: lax.platform_dependent(*args, cpu=cpu, default=default)


def differentiable_on_platform(cpu: Callable, default: Callable) -> Callable:
    """``on_platform(cpu, default)`` whose gradient on each platform is the VJP of that
    platform's own form. The residuals are the inputs on every platform (each backward
    recomputes what it needs), so the other platform's form leaves nothing behind."""
    @jax.custom_vjp
    def fn(*args):
        return lax.platform_dependent(*args, cpu=cpu, default=default)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, g):
        vjp_of = lambda form: lambda args, g: jax.vjp(form, *args)[1](g)
        return lax.platform_dependent(args, g, cpu=vjp_of(cpu), default=vjp_of(default))

    fn.defvjp(fwd, bwd)
    return fn
