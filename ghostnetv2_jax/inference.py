"""Inference over cache-sized chunks of the batch: the fast path for CPU inference.

XLA runs a jitted network one whole-batch op at a time. At batch 32 the early 112x112 and 56x56
stages' activations are 10-80 MB each, past the caches, so every op streams its input and output
through DRAM. ``chunked`` runs the network over the batch in chunks (a ``lax.map`` loop inside
the same jitted function), so each op's buffers stay in cache between the ops that produce and
consume them. The output is the same (each image's result does not depend on the others' at
inference); only the order of work changes.

Measured on the 2-core AVX-512 VM of docs/benchmarks.md (batch 32, 224x224, float32, BN folded):
with the first native kernels, chunks of 8 ran at ~215 img/s against ~160 unchunked (chunks of 4
and 16 at ~195 and ~185); with the fused gate, stem and 4-channel blocks, which cut most of the
traffic chunking saved, 8 x 2 streams runs at ~238 against ~226 (in-process A/B); with the fused
primary and stride-2 convs, 117.5 against 120.6 ms a batch, and the whole batch is the faster
one (173.5 against 190.3 ms) while the VM's two cores share no cache (docs/benchmarks.md). timm's model
gets slower when chunked the same way (146 -> 116 img/s), so the gain is XLA's, not the
model's. On GPU/TPU one launch over the whole batch is what keeps the device busy, so ``'auto'``
chunks only on CPU::

    predict = jax.jit(inference.predict_fn(model))      # chunks of 8 on CPU, whole batch elsewhere
    logits = predict(variables, images)

Only inference is chunked: a training step's BatchNorm needs the whole batch's statistics and
its backward needs every chunk's activations anyway.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from ghostnetv2_jax.models.ghostnet import GhostNet

CPU_CHUNK = 8   # best of 2/4/8/16/32 above; also the best on one core (121 vs 84 img/s unchunked)
# Two chunks per loop step, as independent computations that XLA:CPU's executor overlaps: the
# small late-stage ops leave a core idle when run one at a time. In-process A/B on 2 cores:
# 134 ms a batch of 32 against 141 ms with one chunk per step; 2 chunks of 4 as fast as 2 of 8.
CPU_STREAMS = 2

Chunk = Union[str, int, None]


def resolve_chunk(chunk: Chunk = 'auto', backend: Optional[str] = None) -> Optional[int]:
    """``'auto'``: ``CPU_CHUNK`` on CPU, None (the whole batch) elsewhere; None or 0: the whole
    batch; a positive int: that many images per chunk."""
    if chunk == 'auto':
        return CPU_CHUNK if (backend or jax.default_backend()) == 'cpu' else None
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


def chunked(fn: Callable[[jax.Array], Any], chunk: Chunk = 'auto',
            streams: Optional[int] = None) -> Callable[[jax.Array], Any]:
    """``fn(images)`` computed over chunks of ``chunk`` images along axis 0, as one ``lax.map``
    loop whose every step runs ``streams`` chunks as independent computations (default
    ``CPU_STREAMS``), which XLA:CPU executes concurrently. A batch that does not divide evenly
    runs its last images as one smaller call. Every leaf of ``fn``'s output must have the batch
    on axis 0; the result is ``fn(images)``'s.

    For a batch on one device: a batch sharded over devices would be gathered chunk by chunk.
    """
    size = resolve_chunk(chunk)
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


def predict_fn(model, chunk: Chunk = 'auto', **apply_kwargs) -> Callable[[Any, jax.Array], Any]:
    """``(variables, images) -> model.apply(variables, images, train=False, **apply_kwargs)``, run
    in chunks of the batch on CPU (see the module docstring). Jit it; works for the eval and the
    BN-folded (``deploy``) models, and for ``features_only=True``.

    For a GhostNet's logits only the convolutional part is chunked; the head (pool, conv_head,
    classifier) runs once over the whole batch. In the loop, each chunk would read its 10 MB of
    weights again for an 8-row matmul (6.9 ms of a 129 ms batch of 32 on 2 cores in the profile;
    in-process A/B, 127.1 against 129.9 ms a batch)."""
    split_head = resolve_chunk(chunk) is not None and _has_head_split(model, apply_kwargs)

    def predict(variables: Any, images: jax.Array) -> Any:
        if not split_head:
            return chunked(lambda x: model.apply(variables, x, train=False, **apply_kwargs), chunk)(images)
        maps = chunked(lambda x: model.apply(variables, x, train=False, part='features'), chunk)(images)
        return model.apply(variables, maps, train=False, part='head')
    return predict


def _has_head_split(model, apply_kwargs) -> bool:
    # only for the plain logits: other apply arguments (features_only) keep the whole network
    return isinstance(model, GhostNet) and not apply_kwargs
