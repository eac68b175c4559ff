"""The input pipeline's config, defined once: the ``DataConfig`` dataclass (its field comments
are the documentation) and ``default_config()``, the ``config.data`` ConfigDict derived from it
that recipes (``configs/default.py``) start from and ``--config.data.FIELD=VALUE`` overrides.

Imports no TensorFlow, so loading a recipe stays light (and works without the data extras);
the methods that build sources and transforms import the pipeline's modules when called.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional, Tuple

import ml_collections

from ghostnetv2_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD

BAD_IMAGES = ('skip', 'error')


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Every knob of the input pipeline; defaults are the GhostNetV2 ImageNet recipe (timm
    train.py flags in comments)."""
    dataset: str = 'imagenet2012'      # 'digits' | 'cluttered_digits' (embedded) |
                                       # 'folder:/path' | 'image_folder' | a tfds name
    data_dir: Optional[str] = None     # tfds data_dir (gs:// ok), or the root for 'image_folder'
    train_split: str = 'train'
    eval_split: str = 'validation'
    image_size: int = 224              # train crop and eval input size (square)
    crop_pct: float = 0.875            # eval: resize short side to floor(image_size / crop_pct)
    interpolation: str = 'bicubic'     # eval resize
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    train_interpolation: str = 'random'   # RandomResizedCrop: 'random' (bilinear|bicubic per
                                          # image) or a method
    scale: Tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)   # RandomResizedCrop aspect ratio range
    hflip: float = 0.5
    color_jitter: Any = 0.4            # a float or a (brightness, contrast, saturation[, hue])
                                       # tuple; timm default; used only when randaugment is ''
    randaugment: str = 'rand-m9-mstd0.5'  # --aa; '' disables
    reprob: float = 0.2                # --reprob (random erasing probability)
    remode: str = 'pixel'              # --remode
    shuffle_buffer: int = 16384        # tfds only; in-memory sources shuffle exactly
    image_key: str = 'image'           # tfds feature names
    label_key: str = 'label'
    num_threads: int = 0               # tf.data private thread pool; 0: one per CPU core
    bad_images: str = 'skip'           # unreadable images: 'skip' (masked out, each file
                                       # reported once) or 'error' (stop, naming the file)

    @classmethod
    def from_config(cls, config: Any) -> 'DataConfig':
        """From a ConfigDict, a mapping or a DataConfig; missing fields take the defaults."""
        if isinstance(config, cls):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        given = dict(config.items()) if hasattr(config, 'items') else dict(config)
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f'unknown data config fields {unknown}; known: {sorted(names)}')
        for key in ('mean', 'std', 'scale', 'ratio'):
            if key in given:
                given[key] = tuple(given[key])
        if isinstance(given.get('color_jitter'), (list, tuple)):
            given['color_jitter'] = tuple(given['color_jitter'])
        size = given.get('image_size')
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            given['image_size'] = int(size[0])       # a model's square input_size (h, w)
        return cls(**given)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 3:
            raise ValueError(f'image_size must be an int >= 3 (square images), got '
                             f'{self.image_size!r}')
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f'mean and std need 3 values, got {self.mean} and {self.std}')
        if self.bad_images not in BAD_IMAGES:
            raise ValueError(f'bad_images must be one of {BAD_IMAGES}, got {self.bad_images!r}')

    def source(self, split: str):
        from ghostnetv2_jax.data import sources
        return sources.open_source(self.dataset, split, self.data_dir,
                                   class_split=self.train_split, image_key=self.image_key,
                                   label_key=self.label_key, shuffle_buffer=self.shuffle_buffer)

    def train_transform(self):
        """An ``augment.TrainTransform``."""
        from ghostnetv2_jax.data import augment
        return augment.TrainTransform(
            self.image_size, self.mean, self.std, self.scale, self.ratio,
            self.train_interpolation, self.hflip, self.color_jitter, self.randaugment,
            self.reprob, self.remode)

    def eval_transform(self):
        """An ``augment.EvalTransform``."""
        from ghostnetv2_jax.data import augment
        return augment.EvalTransform(self.image_size, self.crop_pct, self.interpolation,
                                     self.mean, self.std)


def _field_type(hint: Any) -> type:
    """The type config_flags parses an override of a field annotated ``hint`` as: ``X`` for
    ``Optional[X]``, ``tuple`` for ``Tuple[...]``, ``object`` (a Python literal) for ``Any``."""
    if hint is Any:
        return object
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _field_type(args[0]) if len(args) == 1 else object
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def default_config() -> ml_collections.ConfigDict:
    """``config.data`` with every field of ``DataConfig`` and its default (the ImageNet
    recipe), each overridable by ``--config.data.FIELD=VALUE``: a field whose default is None,
    or that takes more than one type (``color_jitter``), is a ``FieldReference`` typed by its
    annotation; the others are typed by their default."""
    hints = typing.get_type_hints(DataConfig)
    data = ml_collections.ConfigDict()
    for field in dataclasses.fields(DataConfig):
        value, kind = field.default, _field_type(hints[field.name])
        if value is None or kind is object:
            value = ml_collections.FieldReference(value, field_type=kind)
        data[field.name] = value
    return data
