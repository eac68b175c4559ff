"""GhostNet / GhostNetV2 in JAX + Flax (linen), numerically identical to the PyTorch reference."""
from ghostnetv2_jax.models.registry import create_model, get_spec, list_models

__all__ = ['create_model', 'get_spec', 'list_models']
__version__ = '0.1.0'
