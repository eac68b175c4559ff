"""A traced JAX inference function -> a serialized ``jax.export.Exported`` (StableHLO with its
calling convention), for XLA serving or a later ``jax.export.deserialize(data).call(images)``.

The batch is symbolic (any batch runs); the weights are constants inside the module, so the
artifact is the whole inference program. Lowered for each of ``platforms`` from the layers'
plain-XLA forms, it carries no custom calls and runs on any of them.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

PLATFORMS = ('cpu', 'cuda', 'tpu')


def to_stablehlo(fn: Callable, image_shape: Tuple[int, int, int], *, platforms: Sequence[str] = PLATFORMS) -> bytes:
    import jax
    import jax.numpy as jnp
    (batch,) = jax.export.symbolic_shape('batch')
    spec = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)
    return bytes(jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec).serialize())


def load(data: bytes):
    """The deserialized ``jax.export.Exported``; ``.call(images)`` runs it."""
    import jax
    return jax.export.deserialize(bytearray(data))
