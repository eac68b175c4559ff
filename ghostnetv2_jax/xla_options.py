"""XLA compiler options for this project's jitted functions, per backend, kind of step and
depthwise implementation.

CPU training steps (jaxlib 0.10), measured side by side (docs/benchmarks.md):
- All of them compile with LLVM at -O1 instead of -O2: 10-30% less compile time, same step time.
- With the portable 'shift' depthwise form they also use XLA's loop emitters, which run the step
  ~1.5x faster than the default MLIR fusion emitters. Its backward pass is hundreds of
  strided-slice fusions, which the default emitters compile into slower kernels.
- With the 'native' kernels (the CPU default) those fusions are gone, and the default emitters
  are ~10% faster than the loop emitters.

Inference keeps XLA's defaults: the default emitters were 10-25% faster there.

The options are passed per function (``jax.jit(..., compiler_options=...)``), not through the
process-wide ``XLA_FLAGS``, so importing this package changes nothing for other JAX code. JAX
accepts them only on a top-level jit. On GPU/TPU no option is set.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import jax

TRAIN_CPU_OPTIONS: Dict[str, Any] = {
    'xla_backend_optimization_level': 1,   # LLVM -O1: less compile time, same step time
}
SHIFT_TRAIN_CPU_OPTIONS: Dict[str, Any] = {
    **TRAIN_CPU_OPTIONS,
    'xla_cpu_use_fusion_emitters': False,  # loop emitters: the shift form's backward ~1.5x faster
}


def compiler_options(train: bool, backend: Optional[str] = None,
                     depthwise: str = 'auto') -> Optional[Dict[str, Any]]:
    """Options for a training (``train=True``) or inference step on ``backend`` (default: JAX's
    default backend) of a model with depthwise implementation ``depthwise``, or None for XLA's
    defaults."""
    from ghostnetv2_jax.nn.depthwise import resolve_impl
    backend = backend or jax.default_backend()
    if not train or backend != 'cpu':
        return None
    shift = (depthwise == 'shift' or (depthwise == 'auto' and backend == jax.default_backend()
                                      and resolve_impl('auto') == 'shift'))
    return dict(SHIFT_TRAIN_CPU_OPTIONS if shift else TRAIN_CPU_OPTIONS)


def jit(fun: Callable, *, train: bool, depthwise: str = 'auto', **kwargs) -> Callable:
    """``jax.jit(fun, **kwargs)`` compiled with this project's options for a training or
    inference step on the default backend, for a model with depthwise implementation
    ``depthwise``."""
    return jax.jit(fun, compiler_options=compiler_options(train, depthwise=depthwise), **kwargs)
