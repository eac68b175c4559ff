"""What the sweep and the costs table measure about a model: parameters, MACs, and inference latency.

Latency is the time of one call of ``jax.jit(ghostnetv2_jax.predict_fn(model, fuse=...))`` on a
batch, after compilation and a warm-up call; the weights are random (filled on the host, so no
initialiser is compiled): the time of a dense network does not depend on its values.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax import predict_fn
from ghostnetv2_jax.summary import count_macs, count_params


def _input(batch: int, size: int) -> jax.Array:
    return jnp.zeros((batch, size, size, 3), jnp.float32)


def abstract_variables(model, size: int) -> Dict[str, Any]:
    """The variables' shapes and dtypes, without computing anything."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _input(1, size)))


def params_and_macs(model, size: int) -> Tuple[int, int]:
    """Parameter count and MACs of one ``size`` x ``size`` image (``ghostnetv2_jax.summary``)."""
    shapes = abstract_variables(model, size)
    return count_params(shapes), count_macs(model, shapes, (size, size))


def random_variables(model, size: int, seed: int = 0) -> Dict[str, Any]:
    """Variables filled on the host: kernels scaled by fan-in, BatchNorm scales and variances
    near 1, small biases and means (finite activations of a realistic range)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], 'key', str(path[-1]))
        if name == 'kernel':
            value = rng.standard_normal(leaf.shape) / np.sqrt(max(int(np.prod(leaf.shape[:-1])), 1))
        elif name in ('scale', 'var'):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, size))


def compiled_predict(model, batch: int, size: int, fuse: bool = True) -> Callable[[], jax.Array]:
    """A no-argument call of the jitted ``predict_fn(model)`` on a zero batch, compiled and run
    once (the warm-up), ready to be timed."""
    variables, images = random_variables(model, size), _input(batch, size)
    fn = jax.jit(predict_fn(model, fuse=fuse)).lower(variables, images).compile()
    call = lambda: fn(variables, images)
    jax.block_until_ready(call())
    return call


def _time_once(call: Callable[[], jax.Array]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def median_ms(call: Callable[[], jax.Array], runs: int) -> float:
    """Median wall time of ``runs`` calls, in milliseconds."""
    return 1e3 * statistics.median(_time_once(call) for _ in range(runs))


def interleaved_ms(calls: Mapping[str, Callable[[], jax.Array]], rounds: int) -> Dict[str, List[float]]:
    """Each round times one call of every function, starting one further along the list each
    round, so that drift in the machine's speed falls on all of them alike. Milliseconds."""
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(1e3 * _time_once(calls[name]))
    return times
