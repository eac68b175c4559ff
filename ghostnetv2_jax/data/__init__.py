"""Input pipeline: sources (digits, cluttered digits, image folder, tfds) -> timm-style
augmentation -> batches.

Importing this package is light: its config (``ghostnetv2_jax.data.config``: ``DataConfig``,
``default_config``) needs no TensorFlow, and the names below that do are loaded on first use.
TensorFlow is used for input only, so it is kept off the accelerators that JAX owns
(``data/_tf.py``, imported by every module here that uses TF).
"""
import importlib
from typing import Any

_LAZY = {
    'DataConfig': 'ghostnetv2_jax.data.config',
    'default_config': 'ghostnetv2_jax.data.config',
    'DataSplit': 'ghostnetv2_jax.data.pipeline',
    'create_split': 'ghostnetv2_jax.data.pipeline',
    'num_classes_of': 'ghostnetv2_jax.data.pipeline',
    'DataError': 'ghostnetv2_jax.data.sources',
}

__all__ = ['DataConfig', 'DataError', 'DataSplit', 'create_split', 'default_config',
           'num_classes_of']


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(__all__))
