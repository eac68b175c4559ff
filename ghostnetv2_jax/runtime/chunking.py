"""Inference over cache-sized chunks of the batch.

XLA runs a jitted network one whole-batch op at a time. At batch 32 the early 112x112 and 56x56
stages' activations are 10-80 MB each, past the caches, so every op streams its input and output
through DRAM. ``chunked`` runs the network over the batch in chunks (a ``lax.map`` loop inside
the same jitted function), so each op's buffers stay in cache between the ops that produce and
consume them. The output is the same (each image's result does not depend on the others' at
inference); only the order of work changes. On GPU/TPU one launch over the whole batch is what
keeps the device busy, so ``'auto'`` chunks only where lowered for CPU (``runtime.predict_fn``).

Only inference is chunked: a training step's BatchNorm needs the whole batch's statistics and
its backward needs every chunk's activations anyway.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

# Images per chunk on CPU: the best of 2/4/8/16/32 at batch 32 on 2 cores (docs/benchmarks.md).
CPU_CHUNK = 8
# Chunks per loop step, run as independent computations that XLA:CPU's executor overlaps: the
# small late-stage ops leave a core idle when run one at a time.
CPU_STREAMS = 2

Chunk = Union[str, int, None]


def resolve_chunk(chunk: Chunk, platform: str) -> Optional[int]:
    """Images per chunk on ``platform`` ('cpu' or another): ``'auto'`` is ``CPU_CHUNK`` on CPU and
    None (the whole batch) elsewhere; None or 0: the whole batch; a positive int: that many."""
    if chunk == 'auto':
        return CPU_CHUNK if platform == 'cpu' else None
    if chunk is None or chunk == 0:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk must be 'auto', None or a non-negative int, got {chunk!r}")
    return chunk


def chunk_for(mesh) -> Chunk:
    """The chunking for a jitted step whose batch is sharded over ``mesh``: ``'auto'`` on one
    device; None on several, where each device's share is already a fraction of the batch and a
    chunk of the global batch would have to be gathered from every device."""
    return 'auto' if mesh.devices.size == 1 else None


def chunked(fn: Callable[[jax.Array], Any], chunk: Optional[int],
            streams: Optional[int] = None) -> Callable[[jax.Array], Any]:
    """``fn(images)`` computed over chunks of ``chunk`` images (None: the whole batch) along
    axis 0, as one ``lax.map`` loop whose every step runs ``streams`` chunks as independent
    computations (default ``CPU_STREAMS``), which XLA:CPU executes concurrently. A batch that does not divide evenly
    runs its last images as one smaller call. Every leaf of ``fn``'s output must have the batch
    on axis 0; the result is ``fn(images)``'s.

    For a batch on one device: a batch sharded over devices would be gathered chunk by chunk.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f'chunk must be None or a positive int, got {chunk!r}')
    size = chunk
    streams = CPU_STREAMS if streams is None else streams
    if streams < 1:
        raise ValueError(f'streams must be >= 1, got {streams}')

    def step(xs: jax.Array) -> Any:   # (streams, size, ...) -> outputs (streams, size, ...)
        outs = [fn(xs[i]) for i in range(streams)]
        return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

    def run(images: jax.Array) -> Any:
        batch = images.shape[0]
        if size is None or batch < size * streams:
            return fn(images)
        per_step = size * streams
        whole = batch // per_step * per_step
        xs = images[:whole].reshape(batch // per_step, streams, size, *images.shape[1:])
        parts = jax.tree.map(lambda y: y.reshape(whole, *y.shape[3:]), jax.lax.map(step, xs))
        if whole == batch:
            return parts
        rest = fn(images[whole:])
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), parts, rest)
    return run
