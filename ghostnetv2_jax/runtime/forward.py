"""``predict_fn``: the one entry point for fast inference, on every platform."""
from __future__ import annotations

from typing import Any, Callable, Union

import jax

from ghostnetv2_jax.models.ghostnet import GhostNet
from ghostnetv2_jax.runtime import cpu_fusion
from ghostnetv2_jax.runtime.chunking import Chunk, chunked, resolve_chunk

Method = Union[str, Callable[..., Any]]


def _forward(model, method: Method, method_kwargs, chunk, fuse: bool) -> Callable[[Any, jax.Array], Any]:
    """The forward for one platform: fused or not, over chunks or the whole batch."""
    def apply(variables, x, method, **kwargs):
        if not fuse:
            return model.apply(variables, x, train=False, method=method, **kwargs)
        with cpu_fusion.fused():
            return model.apply(variables, x, train=False, method=method, **kwargs)

    name = method if isinstance(method, str) else getattr(method, '__name__', None)
    split_head = chunk is not None and name == '__call__' and not method_kwargs and isinstance(model, GhostNet)

    def forward(variables, images):
        if not split_head:
            return chunked(lambda x: apply(variables, x, method, **method_kwargs), chunk)(images)
        # The head (pool, conv_head, classifier) runs once over the whole batch: in the loop,
        # each chunk would read the head's weights again for a matmul of a few rows.
        maps = chunked(lambda x: apply(variables, x, 'forward_features'), chunk)(images)
        return apply(variables, maps, 'forward_head')
    return forward


def predict_fn(model, chunk: Chunk = 'auto', fuse: bool = True, method: Method = '__call__',
               **method_kwargs) -> Callable[[Any, jax.Array], Any]:
    """``(variables, images) -> model.apply(variables, images, train=False, method=method,
    **method_kwargs)``, computed the fastest way this project knows on the platform the program is
    lowered for. Jit it; for the eval and the BN-folded (``fold_batchnorm``) models and any of
    GhostNet's entry points (a name or the method itself), e.g.
    ``predict_fn(model, method='forward_intermediates', intermediates_only=True)`` for the 5
    feature maps. Every output must have the batch on axis 0.

    Where lowered for CPU: over chunks of ``CPU_CHUNK`` images (``chunk='auto'``; an int or
    None/0 sets it), with the fused native ops where the model's modules match them
    (``cpu_fusion``; ``fuse=False`` runs the modules as written); the logits' head runs once over
    the whole batch, after the chunks. Elsewhere: the whole batch (unless ``chunk`` is an int),
    the model as written. The choice is per lowering platform, so one traced program is right on
    each platform it is exported for."""
    fuse = bool(fuse) and cpu_fusion.is_fusible(model)
    cpu = _forward(model, method, method_kwargs, resolve_chunk(chunk, 'cpu'), fuse)
    default = _forward(model, method, method_kwargs, resolve_chunk(chunk, 'default'), False)
    if not fuse and resolve_chunk(chunk, 'cpu') == resolve_chunk(chunk, 'default'):
        return default

    def predict(variables, images):
        return jax.lax.platform_dependent(variables, images, cpu=cpu, default=default)
    return predict


def bound_predict_fn(model, variables, chunk: Chunk = 'auto', fuse: bool = True, method: Method = '__call__',
                     **method_kwargs) -> Callable[[jax.Array], Any]:
    """``images -> predict_fn(model, ...)(variables, images)`` for one fixed set of variables:
    the deploy form of ``predict_fn``. Jitted, the variables are constants of the compiled
    program, as in a deployment runtime's compiled model: a call passes only the images (not
    hundreds of variable arrays), and what depends on the variables alone (the eval model's
    BatchNorm affines) is computed once, when compiling. Each set of variables compiles its own
    program, which holds its own copy of them. Same numbers as ``predict_fn``."""
    forward = predict_fn(model, chunk, fuse, method, **method_kwargs)

    def predict(images):
        return forward(variables, images)
    return predict
