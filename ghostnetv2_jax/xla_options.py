"""XLA compiler options for this project's jitted functions, per backend and per kind of step.

On CPU (jaxlib 0.10), XLA's loop emitters run the GhostNet *training* step ~1.5x faster than the
newer MLIR fusion emitters that are the default. That held for the shifted-slice depthwise form
(``nn/depthwise.py``), whose backward is hundreds of strided-slice fusions, and still holds with
the native depthwise kernels: 39.4 against 29.7 img/s at batch 32 (two harness runs, timm
channels_last at 31.4 and 34.1 img/s in them). LLVM at -O1 instead of -O2 compiles that step 20-30% faster and runs
it as fast. For *inference* the default emitters were 10-15% faster, so inference keeps XLA's
defaults. Measured side by side with ``python -m ghostnetv2_jax bench --xla-options
project,default`` (docs/benchmarks.md).

The options are passed per function (``jax.jit(..., compiler_options=...)``), not through the
process-wide ``XLA_FLAGS``, so importing this package changes nothing for other JAX code. JAX
accepts them only on a top-level jit. On GPU/TPU no option is set.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax

TRAIN_CPU_OPTIONS: Dict[str, Any] = {
    'xla_cpu_use_fusion_emitters': False,
    'xla_backend_optimization_level': 1,   # LLVM -O1: ~20-30% less compile time, same step time
}


def compiler_options(train: bool, backend: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Options for a training (``train=True``) or inference step on ``backend`` (default: JAX's
    default backend), or None for XLA's defaults."""
    backend = backend or jax.default_backend()
    return dict(TRAIN_CPU_OPTIONS) if train and backend == 'cpu' else None


def dispatch_cpu_synchronously() -> None:
    """Make each CPU computation return when it has run (``jax_cpu_enable_async_dispatch`` off).

    With JAX's default asynchronous dispatch, a train step is dispatched, and allocates its
    temporaries, before the previous step's are freed, so the heap holds two or more sets: at
    batch 32 (1.7 GB of temporaries) RSS grew to 3.9-7.7 GB, and each growth re-faulted a whole
    set (~405k page faults, +1-2.5 s on that step); at batch 128, RSS settled at 14.4 GB. With
    synchronous dispatch one set is reused every step: 2.3 GB and 7.6 GB, no faults after the
    first step, the same steady step time. A step of hundreds of milliseconds gains nothing
    from dispatching ahead (the input pipeline prefetches on its own threads).

    Process-wide and read when the CPU backend starts, so programs call it first (the trainer,
    the benchmark's workers); the library never does. Other backends are unaffected.
    """
    jax.config.update('jax_cpu_enable_async_dispatch', False)


def jit(fun: Callable, *, train: bool, **kwargs) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with this project's options for a training or
    inference step on the default backend."""
    return jax.jit(fun, compiler_options=compiler_options(train), **kwargs)
