"""Input pipeline: sources (digits, cluttered digits, image folder, tfds) -> timm-style
augmentation -> batches.

TensorFlow is used for input only, so it is kept off the accelerators that JAX owns.
"""
import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
    for kind in ('GPU', 'TPU'):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            pass    # already initialised, or no such device type in this TF build


_hide_accelerators_from_tf()

from ghostnetv2_jax.data.pipeline import (DataConfig, DataSplit, create_split,  # noqa: E402
                                          default_config, num_classes_of)
from ghostnetv2_jax.data.sources import DataError  # noqa: E402

__all__ = ['DataConfig', 'DataError', 'DataSplit', 'create_split', 'default_config',
           'num_classes_of']
