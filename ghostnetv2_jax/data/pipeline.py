"""Source -> decode -> augment -> batch, per host, as numpy batches for the trainer.

``create_split(config.data, split=..., train=...)`` returns a ``DataSplit`` whose iterator
yields ``{'images': float32 (B, H, W, 3), 'labels': int32 (B,), 'mask': float32 (B,)}`` with
B = global_batch // host_count.

Determinism and resume: epoch e of host h visits its records in an order drawn from a key
folded from (seed, e, h), and the example at position p of that order is augmented with a key
folded from (seed, e, h, p). A run restarted with ``start_step=k`` therefore begins at epoch
k // steps_per_epoch, position (k % steps_per_epoch) * B, and produces exactly the batches a
fresh run produces from step k on; the skipped records are neither decoded nor augmented.

Bad records (``DataConfig.bad_images``): every batch is made from the B records of its B
positions. A record that cannot be read or decoded keeps its position: with 'skip' its row
holds a copy of another image of the batch with ``mask`` 0 (the steps weigh it 0), and its name
is reported once (``on_skip``); with 'error' the iterator raises ``DataError`` naming it. Batches
therefore never shift, and resume stays exact with skipped records. An image folder is checked
before any batch is made (``sources.InMemorySource.problems``): 'error' stops there with the
first problem, 'skip' reports every one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
from absl import logging

from ghostnetv2_jax.data import augment, sources
from ghostnetv2_jax.data._tf import tf
from ghostnetv2_jax.data.config import BAD_IMAGES, DataConfig, default_config  # noqa: F401
from ghostnetv2_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401


def num_classes_of(data_config: Any) -> int:
    """Classes of the train split, without building a pipeline (digits: no TF work at all)."""
    cfg = DataConfig.from_config(data_config)
    return cfg.source(cfg.train_split).num_classes


@dataclasses.dataclass
class DataSplit:
    iterator: Iterator[Dict[str, np.ndarray]]
    num_examples: int                  # whole split, all hosts
    num_classes: int
    steps_per_epoch: int
    batch_size: int                    # per host
    restart: Callable[[int], Iterator[Dict[str, np.ndarray]]] = dataclasses.field(repr=False)

    def fresh_iterator(self, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
        """A new iterator from ``start_step`` (e.g. another pass over an eval split)."""
        return self.restart(start_step)


# ----------------------------------------------------------------------------- decoding

def _as_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 images with 1 or 3 channels -> 3 channels."""
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return tf.ensure_shape(image, [None, None, 3])


def decode_window(raw: tf.Tensor, window_fn: Callable) -> tf.Tensor:
    """Decode only what ``window_fn(shape_hw) -> (top, left, h, w)`` asks for: JPEGs with
    decode_and_crop_jpeg, other encodings fully then crop, uint8 tensors by slicing."""
    if raw.dtype != tf.string:
        image = _as_rgb(raw)
        return augment.crop(image, window_fn(tf.shape(image)[:2]))

    def jpeg():
        top, left, h, w = window_fn(tf.image.extract_jpeg_shape(raw)[:2])
        return tf.image.decode_and_crop_jpeg(raw, tf.stack([top, left, h, w]), channels=3)

    def other():
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
        return augment.crop(image, window_fn(tf.shape(image)[:2]))

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(raw), jpeg, other), [None, None, 3])


def decode(raw: tf.Tensor) -> tf.Tensor:
    if raw.dtype != tf.string:
        return _as_rgb(raw)
    return tf.ensure_shape(tf.io.decode_image(raw, channels=3, expand_animations=False),
                           [None, None, 3])


# ----------------------------------------------------------------------------- datasets

def _options(cfg: DataConfig) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = cfg.num_threads or (os.cpu_count() or 1)
    options.threading.max_intra_op_parallelism = 1
    return options


def _key(seed: int, *data) -> tf.Tensor:
    """A stateless key folded from the run seed and ``data`` (ints or int tensors)."""
    key = tf.constant([0, seed], tf.int64)
    for value in data:
        key = augment.fold_in(key, value)
    return key


_ORDER, _AUGMENT = 0, 1          # key streams: record order, per-example augmentation
SKIPPED = 'skipped'              # batch key inside the pipeline: names of masked-out records


def _blank(cfg: DataConfig) -> Dict[str, tf.Tensor]:
    return {'images': tf.zeros([cfg.image_size] * 2 + [3], tf.float32),
            'labels': tf.constant(0, tf.int32), 'mask': tf.constant(0.0, tf.float32)}


def _fill(slots: tf.Tensor, rows: Dict[str, tf.Tensor], names: tf.Tensor,
          batch_size: int, image_size: int) -> Dict[str, tf.Tensor]:
    """A batch of ``batch_size`` rows from the rows that decoded (``slots``: their positions in
    the batch, then -1 for the blank row). A position without its row (unreadable, or past the
    last record) takes a copy of a decoded row, or the blank when none decoded, with mask 0;
    ``SKIPPED`` names the unreadable ones."""
    decoded_slots = tf.cast(slots[:-1], tf.int32)
    n = tf.size(decoded_slots)
    where = tf.tensor_scatter_nd_update(tf.fill([batch_size], -1), decoded_slots[:, None],
                                        tf.range(n))
    decoded = where >= 0
    position = tf.range(batch_size)
    fallback = tf.where(n > 0, position % tf.maximum(n, 1), n)     # row n: the blank
    take = tf.where(decoded, where, fallback)
    out = {key: tf.gather(value, take) for key, value in rows.items()}
    out['images'] = tf.ensure_shape(out['images'], [batch_size, image_size, image_size, 3])
    out['mask'] = tf.where(decoded, out['mask'], 0.0)
    count = tf.size(names)
    padded = tf.concat([names, tf.fill([batch_size - count], '')], 0)
    out[SKIPPED] = tf.where(decoded | (position >= count), '', padded)
    return out


def _assemble(records: Dict[str, tf.Tensor], example: Callable, cfg: DataConfig,
              batch_size: int) -> tf.data.Dataset:
    """One batch (a dataset of one element) from up to ``batch_size`` records, each made by
    ``example``; a record whose reading, decoding or augmentation fails is left out (``_fill``)."""
    rows = (tf.data.Dataset.from_tensor_slices(records).enumerate()
            .map(lambda slot, record: (slot, example(record)),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .ignore_errors())
    blank = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), _blank(cfg)))
    return rows.concatenate(blank).batch(batch_size + 1).map(
        lambda slots, decoded: _fill(slots, decoded, records['name'], batch_size, cfg.image_size))


def _batches(records: tf.data.Dataset, example: Callable, cfg: DataConfig, batch_size: int,
             drop_remainder: bool) -> tf.data.Dataset:
    """Records -> batches of ``batch_size`` rows, in order; the batches are made in parallel."""
    return records.batch(batch_size, drop_remainder=drop_remainder).interleave(
        lambda chunk: _assemble(chunk, example, cfg, batch_size),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(source, cfg: DataConfig, *, seed: int, batch_size: int, steps: int,
                  start_step: int = 0, host_index: int = 0, host_count: int = 1,
                  num_epochs: Optional[int] = None) -> tf.data.Dataset:
    """Training batches for one host from ``start_step`` on, every epoch in one tf.data graph.

    Epoch e reads this host's records in the order of key (seed, e, host), keeps the first
    ``steps * batch_size``, and augments the one at position p with key (seed, e, host, p).
    Resuming skips records of the first epoch before they are loaded, decoded or augmented.
    """
    transform = cfg.train_transform()
    first_epoch, first_step = divmod(start_step, steps)
    last_epoch = np.iinfo(np.int64).max if num_epochs is None else num_epochs

    @tf.autograph.experimental.do_not_convert       # plain graph code; tfds inside
    def epoch_records(epoch):
        records = source.epoch_records(host_index, host_count,
                                       _key(seed, _ORDER, epoch, host_index))
        skip = tf.where(epoch == first_epoch, first_step * batch_size, 0)
        records = records.take(steps * batch_size).enumerate().skip(tf.cast(skip, tf.int64))
        return records.map(lambda position, record: {**record, 'epoch': epoch,
                                                     'position': position})

    @tf.autograph.experimental.do_not_convert
    def example(record):
        key = _key(seed, _AUGMENT, record['epoch'], host_index, record['position'])
        raw = source.load(record)['image']
        image = decode_window(raw, lambda shape: transform.crop_window(shape, key))
        return {'images': transform.after_crop(image, key), 'labels': record['label'],
                'mask': tf.constant(1.0, tf.float32)}

    records = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch_records)
    ds = _batches(records, example, cfg, batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(cfg))


def eval_dataset(source, cfg: DataConfig, *, batch_size: int, steps: int,
                 host_index: int = 0, host_count: int = 1) -> tf.data.Dataset:
    """Every example of this host's share once, then masked padding up to ``steps`` batches."""
    transform = cfg.eval_transform()
    filled = math.ceil(source.host_num_examples(host_index, host_count) / batch_size)

    @tf.autograph.experimental.do_not_convert
    def example(record):
        image = transform(decode(source.load(record)['image']))
        return {'images': image, 'labels': record['label'], 'mask': tf.constant(1.0, tf.float32)}

    blank = {key: tf.stack([value] * batch_size) for key, value in _blank(cfg).items()}
    blank[SKIPPED] = tf.fill([batch_size], '')
    ds = _batches(source.records(host_index, host_count), example, cfg, batch_size,
                  drop_remainder=False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(steps - filled))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(cfg))


def _reason(name: str) -> str:
    """What the decoder says about a file the pipeline could not use."""
    if os.path.isfile(name):
        why = sources.check_image_file(name) or sources.decode_error(name)
        if why:
            return why
    return 'cannot be read or decoded'


def _screened(batches: Iterator[Dict[str, np.ndarray]], mode: str,
              on_skip: Callable[[str], None], reported: set) -> Iterator[Dict[str, np.ndarray]]:
    """The batches without their ``SKIPPED`` names, which are reported (once each) or, with
    ``mode`` 'error', raised."""
    for batch in batches:
        names = batch.pop(SKIPPED)
        bad = [n.decode('utf-8', 'replace') for n in names if n]
        if bad:
            if mode == 'error':
                raise sources.DataError(f'{bad[0]}: {_reason(bad[0])}; fix or remove it, or set '
                                        'data.bad_images=skip to leave it out')
            if len(bad) == len(names):
                raise sources.DataError(f'no image of a batch of {len(names)} could be read or '
                                        f'decoded (the first: {bad[0]}: {_reason(bad[0])})')
            for name in bad:
                if name not in reported:
                    reported.add(name)
                    on_skip(f'skipped {name}: {_reason(name)}')
        yield batch


def _check_source(source, cfg: DataConfig, host_index: int, host_count: int,
                  on_skip: Callable[[str], None]) -> set:
    """What can be checked before any batch: 'error' raises the first problem; 'skip' reports
    each one. Returns the names reported."""
    problems = source.problems(host_index, host_count)
    if problems and cfg.bad_images == 'error':
        path, why = problems[0]
        more = f' (and {len(problems) - 1} more problems)' if len(problems) > 1 else ''
        raise sources.DataError(f'{path}: {why}{more}; fix or remove it, or set '
                                'data.bad_images=skip to leave it out')
    for path, why in problems:
        on_skip(f'skipped {path}: {why}')
    return {path for path, _ in problems}


def create_split(data_config: Any, *, split: str, train: bool, global_batch: int, seed: int,
                 start_step: int = 0, host_index: int = 0, host_count: int = 1,
                 num_epochs: Optional[int] = None,
                 on_skip: Callable[[str], None] = logging.warning) -> DataSplit:
    """The batches of ``split`` for one host (see the module docstring for the guarantees).

    Train: shuffled, augmented, ``num_epochs`` epochs (None: forever) of
    ``num_examples // global_batch`` steps, starting at ``start_step``. Eval: every example
    exactly once over ``ceil(num_examples / global_batch)`` steps, padding masked out.
    An image folder's files are checked first (``data.bad_images``); ``on_skip`` receives one
    line per skipped file or other problem, once each.
    """
    cfg = DataConfig.from_config(data_config)
    if global_batch <= 0 or global_batch % host_count:
        raise ValueError(f'global_batch {global_batch} must be a positive multiple of '
                         f'host_count {host_count}')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}')
    source = cfg.source(split)
    sources.host_slice(1, host_index, host_count)              # validates the host indices
    batch = global_batch // host_count
    n = source.num_examples
    if train:
        steps = n // global_batch
        if steps == 0:
            raise ValueError(f'{source.name} {split!r} has {n} examples, fewer than one global '
                             f'batch of {global_batch}')
    reported = _check_source(source, cfg, host_index, host_count, on_skip)
    if train:
        make_dataset = lambda start: train_dataset(
            source, cfg, seed=seed, batch_size=batch, steps=steps, start_step=start,
            host_index=host_index, host_count=host_count, num_epochs=num_epochs)
    else:
        steps = math.ceil(n / global_batch)
        make_dataset = lambda start: eval_dataset(
            source, cfg, batch_size=batch, steps=steps, host_index=host_index,
            host_count=host_count).skip(start)
    make = lambda start: _screened(make_dataset(start).as_numpy_iterator(), cfg.bad_images,
                                   on_skip, reported)
    return DataSplit(make(start_step), n, source.num_classes, steps, batch, make)
