"""Native CPU kernels: C++ XLA FFI custom calls (``csrc/``), built on first use.

Each op module holds the op and its jnp reference (what it computes, as separate XLA ops):

- ``depthwise``: depthwise convolution, forward and both gradients;
- ``batchnorm``: training BatchNorm's moments and gradient sums, one pass each;
- ``ghost_module``: a ghost module at inference (primary conv, both BatchNorms, cheap
  depthwise conv, concatenation, DFC gate, a following stride-2 depthwise conv) in one pass;
- ``stem``: the few-input-channel stem conv with its BatchNorm affine and ReLU;
- ``pointwise``: the 1x1 conv with its bias and ReLU, over every core at one image's sizes.

The ops on a single image share their work with this library's helper threads, which stay awake
between ops (``csrc/common.h``); with more images, with XLA's intra-op pool.

``build`` compiles, caches, loads and registers the library (for the CPU platform only);
``ffi`` calls it with batch partitioning and vmap rules. This package imports nothing from the
Flax layers: the layers (``ghostnetv2_jax.layers``) and the inference runtime
(``ghostnetv2_jax.runtime``) decide where these ops run.
"""
from ghostnetv2_jax.kernels.build import library_path, load, load_error

__all__ = ['available', 'library_path', 'load', 'load_error']


def available() -> bool:
    """Whether the kernels are built, loaded and registered here (builds them on first call)."""
    return load()
