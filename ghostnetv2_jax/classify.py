"""Classify image files: the top-K classes of each, with names and probabilities (the library of
the ``predict`` command).

``load_classifier(source)`` reads weights as ``ghostnetv2_jax.weights.load`` does: converted
weights (model name and overrides in the file), a PyTorch file with a model name, or a training
workdir. Images are read with Pillow and preprocessed as the model is evaluated: the
registered model's eval preprocessing (224 px, crop 0.875, bicubic, ImageNet mean/std), or a
workdir's own data settings. Inference is ``bound_predict_fn(model, variables)``, jitted (the
weights compiled in), over batches of a fixed size (the last one padded) so that one compiled
program serves every batch.

Class names: a workdir's are its dataset's (WordNet ids of ImageNet become readable names); a
checkpoint with 1000 classes and no dataset gets ImageNet-1k's (``data/imagenet_class_names.txt``);
anything else prints ``class N``. An image that cannot be read is one ``error: IMAGE: why`` line
on stderr; the others are still predicted and the exit status is 1.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from importlib import resources
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ghostnetv2_jax.models.registry import get_spec

IMAGENET_CLASSES = 1000
_SYNSET = re.compile(r'^n\d{8}$')
# Pillow's resampling filter per interpolation name (the names of data/augment.py's RESIZE_METHODS).
_RESAMPLE = {'nearest': 'NEAREST', 'bilinear': 'BILINEAR', 'bicubic': 'BICUBIC', 'lanczos': 'LANCZOS',
             'area': 'BOX'}


# ----------------------------------------------------------------------------- class names

@functools.lru_cache(maxsize=None)
def _data_lines(name: str) -> Tuple[str, ...]:
    """Lines of a file shipped in ghostnetv2_jax/data/, found from the top package: importing
    ``ghostnetv2_jax.data`` would import TensorFlow, which the core install lacks."""
    path = resources.files('ghostnetv2_jax').joinpath('data').joinpath(name)
    return tuple(path.read_text('utf-8').splitlines())


def imagenet_class_names() -> Tuple[str, ...]:
    """ImageNet-1k's 1000 class names in label order: timm's WordNet lemmas of the sorted synsets
    (``imagenet_synset_to_lemma.txt``); the two synsets whose lemma is 'crane' are told apart as
    'crane (bird)' and 'crane (machine)' so that every name is unique."""
    return _data_lines('imagenet_class_names.txt')


def readable_names(names: Sequence[str]) -> Tuple[str, ...]:
    """Dataset class names with every ImageNet-1k WordNet id (tfds imagenet2012, folders named
    n01440764 ...) replaced by its readable name; other names unchanged."""
    index = {s: i for i, s in enumerate(_data_lines('imagenet_synsets.txt'))}
    readable = imagenet_class_names()
    return tuple(readable[index[n]] if _SYNSET.match(n) and n in index else n for n in names)


def _dataset_class_names(data: Mapping[str, Any]) -> Tuple[Optional[Tuple[str, ...]], str]:
    """(the class names of a workdir's dataset in the trainer's label order, or None; why not)."""
    try:
        from ghostnetv2_jax.data.pipeline import DataConfig
        cfg = DataConfig.from_config(data)
        return tuple(cfg.source(cfg.train_split).class_names), ''
    except Exception as e:   # the dataset may not be reachable from here; names are not essential
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _numbered(num_classes: int) -> Tuple[str, ...]:
    return tuple(f'class {i}' for i in range(num_classes))


def _workdir_class_names(data: Mapping[str, Any], num_classes: int) -> Tuple[str, ...]:
    """The workdir's dataset's names; if it cannot be opened here, ImageNet-1k's for a model
    trained on imagenet2012, else 'class N' (with a warning line)."""
    names, why = _dataset_class_names(data)
    if names is not None and len(names) != num_classes:
        names, why = None, f'it has {len(names)} classes, the model {num_classes}'
    if names is not None:
        return readable_names(names)
    dataset = str(data.get('dataset', ''))
    print(f'warning: no class names from the dataset {dataset!r} ({why})', file=sys.stderr)
    imagenet = 'imagenet2012' in dataset and num_classes == IMAGENET_CLASSES
    return imagenet_class_names() if imagenet else _numbered(num_classes)


def class_names(num_classes: int, saved_config: Optional[Mapping[str, Any]] = None) -> Tuple[str, ...]:
    """Names for the model's classes: a workdir's (``saved_config``) from its dataset, else
    ImageNet-1k's for 1000 classes, else 'class N'."""
    if saved_config is not None:
        return _workdir_class_names(saved_config['data'], num_classes)
    return imagenet_class_names() if num_classes == IMAGENET_CLASSES else _numbered(num_classes)


# ----------------------------------------------------------------------------- preprocessing

def eval_preprocessing(model_name: str, saved_data: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """image_size, crop_pct, interpolation, mean, std: a workdir's data settings where it has
    them, else the registered model's eval preprocessing (timm's pretrained config)."""
    pre = get_spec(model_name).pretrained
    cfg = dict(image_size=pre.input_size[0], crop_pct=pre.crop_pct, interpolation=pre.interpolation,
               mean=tuple(pre.mean), std=tuple(pre.std))
    cfg.update({k: saved_data[k] for k in cfg if saved_data is not None and saved_data.get(k) is not None})
    if cfg['interpolation'] not in _RESAMPLE:
        raise ValueError(f"interpolation {cfg['interpolation']!r}; expected one of {sorted(_RESAMPLE)}")
    return cfg


def _resize_short_side(image, size: int, interpolation: str):
    """torchvision ``Resize(size)``: short side -> size, long side -> int(size * long / short)."""
    from PIL import Image
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return image.resize(new, getattr(Image.Resampling, _RESAMPLE[interpolation]))


def _center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop``: zero-pads a too-small image, offsets round half to even."""
    h, w = pixels.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    pixels = np.pad(pixels, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    top, left = round((pixels.shape[0] - size) / 2), round((pixels.shape[1] - size) / 2)
    return pixels[top:top + size, left:left + size]


def preprocess(path: str, data_cfg: Mapping[str, Any]) -> np.ndarray:
    """float32 (S, S, 3) model input from an image file: RGB (grey, palette and RGBA images
    converted), short side resized to floor(S / crop_pct), centre crop S, (x / 255 - mean) / std.
    A file Pillow cannot read raises one of ``_unreadable_errors()``."""
    from PIL import Image
    size = int(data_cfg['image_size'])
    with Image.open(path) as image:
        rgb = image.convert('RGB')
    rgb = _resize_short_side(rgb, math.floor(size / data_cfg['crop_pct']), data_cfg['interpolation'])
    x = _center_crop(np.asarray(rgb), size).astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(data_cfg['mean'], np.float32)) / np.asarray(data_cfg['std'], np.float32)


def unreadable_reason(error: BaseException) -> str:
    """Why an image could not be read, in a few words."""
    from PIL import UnidentifiedImageError
    if isinstance(error, FileNotFoundError):
        return 'no such file'
    if isinstance(error, IsADirectoryError):
        return 'is a directory'
    if isinstance(error, PermissionError):
        return 'permission denied'
    if isinstance(error, UnidentifiedImageError):
        return 'not an image file Pillow can read'
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _unreadable_errors() -> Tuple[type, ...]:
    """What Pillow raises for a file it cannot open or decode."""
    from PIL import Image
    return (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------- inference

def top_k(probs: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities), each (N, min(k, classes)): the k most probable classes of each
    row, most probable first (ties: the lower index first)."""
    index = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    return index, np.take_along_axis(probs, index, axis=-1)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A loaded checkpoint ready to classify: ``probabilities(images)`` is softmax of the logits
    of ``bound_predict_fn(model, variables)``, jitted (the weights compiled in);
    ``preprocessing`` is what ``preprocess`` needs."""
    model_name: str
    model: Any
    variables: Any
    preprocessing: Dict[str, Any]
    class_names: Tuple[str, ...]
    forward: Callable

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.forward(images))


def load_classifier(source: str, model_name: Optional[str] = None, ema: bool = False,
                    step: str = 'latest') -> Classifier:
    """The model, weights, eval preprocessing and class names of a weights file, a workdir or
    published weights (``'pretrained:NAME'``)."""
    from ghostnetv2_jax import weights
    return classifier_of(weights.load(source, model_name, step=step, ema=ema))


def classifier_of(w) -> Classifier:
    """The ``Classifier`` of loaded ``weights.Weights``."""
    import jax
    import jax.numpy as jnp
    from ghostnetv2_jax import xla_options
    from ghostnetv2_jax.runtime import bound_predict_fn

    model, variables = w.model(), jax.device_put(w.variables)
    logits = bound_predict_fn(model, variables)
    forward = xla_options.jit(lambda x: jax.nn.softmax(logits(x).astype(jnp.float32), axis=-1), train=False)
    return Classifier(w.model_name, model, variables,
                      eval_preprocessing(w.model_name, None if w.config is None else w.config['data']),
                      class_names(model.num_classes, w.config), forward)


def _batches(paths: Sequence[str], data_cfg: Mapping[str, Any], size: int,
             on_error: Callable[[str, BaseException], None]) -> Iterator[Tuple[List[str], np.ndarray]]:
    """(paths, images) of ``size`` readable images at a time, the last batch zero-padded to
    ``size`` (one batch shape: one compiled program); unreadable files go to ``on_error``."""
    ready: List[str] = []
    images: List[np.ndarray] = []
    unreadable = _unreadable_errors()
    for path in paths:
        try:
            images.append(preprocess(path, data_cfg))
        except unreadable as e:
            on_error(path, e)
            continue
        ready.append(path)
        if len(ready) == size:
            yield ready, np.stack(images)
            ready, images = [], []
    if ready:
        pad = np.zeros((size - len(ready),) + images[0].shape, np.float32)
        yield ready, np.concatenate([np.stack(images), pad])


def predict(classifier: Classifier, paths: Sequence[str], k: int = 5, batch_size: int = 32,
            on_error: Optional[Callable[[str, BaseException], None]] = None) -> Iterator[Dict[str, Any]]:
    """For each readable image, in order: ``{'image': path, 'top': [{'class', 'name', 'prob'}]}``
    with the ``k`` most probable classes, most probable first."""
    report = on_error or (lambda path, e: None)
    size = max(1, min(batch_size, len(paths)))
    for batch_paths, images in _batches(paths, classifier.preprocessing, size, report):
        index, probs = top_k(classifier.probabilities(images)[:len(batch_paths)], k)
        for path, row, p in zip(batch_paths, index, probs):
            yield {'image': path, 'top': [{'class': int(c), 'name': classifier.class_names[c], 'prob': float(q)}
                                          for c, q in zip(row, p)]}


def format_result(result: Dict[str, Any]) -> str:
    """The path, then one ``  rank. name  (prob%)`` line per class."""
    lines = [result['image']]
    lines += [f"  {rank}. {t['name']}  ({100 * t['prob']:.2f}%)" for rank, t in enumerate(result['top'], 1)]
    return '\n'.join(lines)
