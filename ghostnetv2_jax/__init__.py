"""GhostNet / GhostNetV2 / GhostNetV3 in JAX + Flax (linen), numerically identical to the PyTorch reference."""
from ghostnetv2_jax import runtime
from ghostnetv2_jax.models.registry import create_model, get_spec, list_models
from ghostnetv2_jax.process import fast_cpu_defaults
from ghostnetv2_jax.runtime import bound_predict_fn, fold_batchnorm, predict_fn, reparameterize

__all__ = ['bound_predict_fn', 'create_model', 'fast_cpu_defaults', 'fold_batchnorm', 'get_spec', 'list_models', 'load_pretrained', 'predict_fn',
           'reparameterize', 'runtime']
__version__ = '0.1.0'


def load_pretrained(name: str, *, rng=0, **overrides):
    """``(model, variables)`` of published weights by name: timm's released weights for a
    registered model (``'ghostnetv2_100'``, or with its tag, ``'ghostnetv2_100.in1k'``), fetched
    with ``huggingface_hub`` into its cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1``
    reads the cache alone) and converted; no torch needed.

    ``overrides`` are ``create_model``'s (``dtype``, ``drop_rate``, ...). ``num_classes`` other than
    the published 1000 gives a **new, randomly initialised classifier head** (the model's own
    initialisation, from ``rng``: a PRNG key or an int seed) on the published features, for
    fine-tuning; ``num_classes=0``: no head, the model returns the pooled features.

      model, variables = ghostnetv2_jax.load_pretrained('ghostnetv2_100')
      logits = model.apply(variables, images_nhwc)   # images normalised as get_spec(name).pretrained

    ``ghostnetv2_jax.hub.published()`` lists the names. An unknown or unpublished name is a
    ValueError naming them; with no cached copy and no connection (or ``HF_HUB_OFFLINE`` set) a
    FileNotFoundError says where the file goes. ``ghostnetv2_jax.weights.load_pretrained`` gives
    the same as ``Weights`` (with the model name and overrides).
    """
    from ghostnetv2_jax import weights
    w = weights.load_pretrained(name, rng=rng, **overrides)
    return create_model(w.model_name, **{**w.overrides, **overrides}), w.variables
