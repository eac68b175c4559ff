"""XLA compiler options for this project's jitted functions, per backend and per kind of step.

On CPU (jaxlib 0.10) the *training* step is compiled with LLVM at -O1 instead of -O2: it compiles
no slower and runs as fast. XLA's emitters stay its defaults (the MLIR fusion emitters), which
run the train step faster than the loop emitters (docs/benchmarks.md). *Inference* keeps XLA's
defaults throughout.
``python -m ghostnetv2_jax bench --xla-options project,default`` measures the options against
XLA's defaults side by side.

The options are passed per function (``jax.jit(..., compiler_options=...)``), not through the
process-wide ``XLA_FLAGS``, so importing this package changes nothing for other JAX code. JAX
accepts them only on a top-level jit. On GPU/TPU no option is set.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax

TRAIN_CPU_OPTIONS: Dict[str, Any] = {
    'xla_backend_optimization_level': 1,   # LLVM -O1: the same step time, no slower to compile
}


def compiler_options(train: bool, backend: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Options for a training (``train=True``) or inference step on ``backend`` (default: JAX's
    default backend), or None for XLA's defaults."""
    backend = backend or jax.default_backend()
    return dict(TRAIN_CPU_OPTIONS) if train and backend == 'cpu' else None


def dispatch_cpu_synchronously() -> None:
    """Make each CPU computation return when it has run (``jax_cpu_enable_async_dispatch`` off).

    With JAX's default asynchronous dispatch, a train step is dispatched, and allocates its
    temporaries, before the previous step's are freed, so the heap holds two or more sets and
    each growth re-faults a whole set (measured: docs/benchmarks.md). With synchronous dispatch
    one set is reused every step, with the same steady step time: a step of hundreds of milliseconds gains nothing from
    dispatching ahead (the input pipeline prefetches on its own threads).

    Process-wide and read when the CPU backend starts, so programs call it first (the trainer,
    the benchmark's workers); the library never does. Other backends are unaffected.
    """
    jax.config.update('jax_cpu_enable_async_dispatch', False)


def jit(fun: Callable, *, train: bool, **kwargs) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with this project's options for a training or
    inference step on the default backend."""
    return jax.jit(fun, compiler_options=compiler_options(train), **kwargs)


def run_once(fn: Callable, *args, out_shardings=None):
    """jit-compile and run a function used once (e.g. a model's initialisation). On CPU, LLVM's
    optimisations are skipped: they make compiling the RNG-heavy initialisers ~4x slower and save
    nothing on a single run."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
    return lowered.compile(options)(*args)
