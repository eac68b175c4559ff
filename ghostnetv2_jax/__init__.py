"""GhostNet / GhostNetV2 / GhostNetV3 in JAX + Flax (linen), numerically identical to the PyTorch reference."""
from ghostnetv2_jax import runtime
from ghostnetv2_jax.models.registry import create_model, get_spec, list_models
from ghostnetv2_jax.runtime import fold_batchnorm, predict_fn, reparameterize

__all__ = ['create_model', 'fold_batchnorm', 'get_spec', 'list_models', 'predict_fn', 'reparameterize', 'runtime']
__version__ = '0.1.0'
