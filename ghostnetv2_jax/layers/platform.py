"""Choosing a layer's implementation per *lowering* platform.

A jitted or exported program is traced once and may be lowered for CPU, GPU or TPU. A layer that
has a faster CPU form (a native kernel, a matmul instead of a convolution) must therefore not
pick it from the tracing host's backend: ``on_platform`` stages out both forms with
``jax.lax.platform_dependent``, and lowering keeps only the one for its platform, so a program
traced on a CPU host and exported for TPU carries no CPU custom call.

Exporters to other runtimes (ONNX, LiteRT) read the traced program itself, where a
``platform_dependent`` would carry both forms; under ``plain_xla()`` every layer traces only its
default (plain XLA) form.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import jax
from jax import lax

_PLAIN_XLA = contextvars.ContextVar('ghostnetv2_plain_xla', default=False)


@contextlib.contextmanager
def plain_xla() -> Iterator[None]:
    """Within this context, layers traced choose their default form for every platform."""
    token = _PLAIN_XLA.set(True)
    try:
        yield
    finally:
        _PLAIN_XLA.reset(token)


def _plain() -> bool:
    return _PLAIN_XLA.get()


def on_platform(cpu: Callable, default: Callable) -> Callable:
    """``fn(*arrays)``: ``cpu(*arrays)`` where lowered for CPU, ``default(*arrays)`` elsewhere.
    For forms that are not differentiated through (see ``differentiable_on_platform``)."""
    return lambda *args: default(*args) if _plain() else lax.platform_dependent(*args, cpu=cpu, default=default)


def differentiable_on_platform(cpu: Callable, default: Callable) -> Callable:
    """``on_platform(cpu, default)`` whose gradient on each platform is the VJP of that
    platform's own form. The residuals are the inputs on every platform (each backward
    recomputes what it needs), so the other platform's form leaves nothing behind."""
    if _plain():
        return default
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
