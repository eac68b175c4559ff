"""TensorFlow for the input pipeline, kept off the accelerators that JAX owns: every data
module that uses TF imports it from here (``from ghostnetv2_jax.data._tf import tf``), so the
accelerators are hidden before TF first touches them, whichever module is imported first."""
import tensorflow as tf


def _hide_accelerators_from_tf() -> None:
    for kind in ('GPU', 'TPU'):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            pass    # already initialised, or no such device type in this TF build


_hide_accelerators_from_tf()

__all__ = ['tf']
