"""Running a model for inference: fast on CPU, the model's own numbers everywhere.

- ``predict_fn(model)``: the inference entry point (``jax.jit`` it). On CPU it runs the batch in
  cache-sized chunks and the parts of the network that the native fused ops implement through
  them (``cpu_fusion``); elsewhere the model as written. Tested to equal ``model.apply``.
  ``bound_predict_fn(model, variables)``: the same for fixed weights, ``images -> outputs``:
  jitted, the weights are constants of the program (the deploy form; faster per call).
- ``fold_batchnorm(model, variables)``: the deploy form, BatchNorm folded into the convs;
  ``reparameterize(model, variables)``: GhostNetV3's deploy form, its branches folded too.
- ``chunked``, ``resolve_chunk``, ``chunk_for``: the batch chunking.

The model (``ghostnetv2_jax.models``) stays the specification; nothing here changes it.
"""
from ghostnetv2_jax.runtime.chunking import CPU_CHUNK, Chunk, chunk_for, chunked, resolve_chunk
from ghostnetv2_jax.runtime.deploy import fold_batchnorm, reparameterize
from ghostnetv2_jax.runtime.forward import bound_predict_fn, predict_fn

__all__ = ['CPU_CHUNK', 'Chunk', 'bound_predict_fn', 'chunk_for', 'chunked', 'fold_batchnorm', 'predict_fn', 'reparameterize', 'resolve_chunk']
