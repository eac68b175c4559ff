"""Pillow's resize, affine transform and per-channel look-up tables and torchvision's
ToTensor + Normalize as TensorFlow
ops (``csrc/pil_ops.cc``), bit-exact to Pillow 13 and torchvision and several times faster than
the same arithmetic in TensorFlow's graph ops.

timm's transforms run on PIL images, so these ops are what the train chain's RandomResizedCrop,
the eval resize, RandAugment's rotate / shear / translate and its table ops (autocontrast,
equalize, solarize) and the final normalization compute.
``augment`` uses them when ``available()`` and otherwise its TensorFlow forms (the resize within
one grey level of Pillow, the others exact, all slower). The library is compiled on first
use against the installed TensorFlow and cached (``ghostnetv2_jax.native_build``: the cache and
the environment variables; GHOSTNETV2_NATIVE=0 turns it off).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ghostnetv2_jax import native_build
from ghostnetv2_jax.data._tf import tf

SOURCE = Path(__file__).with_name('csrc') / 'pil_ops.cc'
# No FMA contraction: Pillow's double arithmetic is rounded step by step, and one fused
# multiply-add can move a coefficient or a sample across a rounding boundary.
CXXFLAGS = ('-O3', '-march=native', '-ffp-contract=off', '-std=c++17', '-shared', '-fPIC', '-w')
# Pillow's resampling filters by name -> the op's filter id.
RESIZE_FILTERS = {'box': 0, 'bilinear': 1, 'hamming': 2, 'bicubic': 3, 'lanczos': 4}
AFFINE_METHODS = ('nearest', 'bilinear', 'bicubic')      # the op's method ids, in order

def library_path() -> Path:
    flags = (*CXXFLAGS, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags())
    return native_build.library_path('gnv2_pil_ops', [SOURCE], flags, tf.__version__)


def _load():
    path = library_path()
    if not path.exists():
        flags = (*CXXFLAGS, *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags())
        native_build.build(path, [SOURCE], flags, f'the pipeline ops in {SOURCE}')
    return tf.load_op_library(str(path))


_loader = native_build.Loader(_load)


def available() -> bool:
    """Build (once), load and register the ops. False if disabled or unavailable."""
    return _loader.ok()


def load_error() -> Optional[str]:
    """Why ``available()`` returned False (None if it has not, or has not been called)."""
    return _loader.error()


def resize(image: tf.Tensor, size, method: str) -> tf.Tensor:
    """``Image.resize((w, h), method)`` of a uint8 [h, w, c] image to ``size`` (h, w)."""
    return _loader.library.gnv2_pil_resize(image, tf.cast(size, tf.int32), RESIZE_FILTERS[method])


def affine(image: tf.Tensor, matrix: tf.Tensor, fill: tf.Tensor, method: tf.Tensor) -> tf.Tensor:
    """``Image.transform(size, AFFINE, matrix, method, fillcolor=fill)`` of a uint8 [h, w, c]
    image; ``method`` indexes AFFINE_METHODS (an int32 tensor)."""
    return _loader.library.gnv2_pil_affine(image, tf.cast(matrix, tf.float64), tf.cast(fill, tf.uint8),
                                         tf.cast(method, tf.int32))


def apply_lut(image: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
    """``Image.point``: uint8 [..., c] image through per-channel tables (int32 [c, 256])."""
    return _loader.library.gnv2_apply_lut(image, tf.cast(luts, tf.int32))


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
    """``(image / 255 - mean) / std`` in float32, per channel (the last axis)."""
    return _loader.library.gnv2_normalize(image, tf.constant(mean, tf.float32), tf.constant(std, tf.float32))


def main() -> int:
    """Build now and say where, or why not."""
    if available():
        print(f'native pipeline ops: {library_path()}')
        return 0
    print(f'native pipeline ops unavailable ({load_error()}); the pipeline uses its TensorFlow forms')
    return 1


if __name__ == '__main__':
    raise SystemExit(main())
