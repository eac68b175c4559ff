"""Where examples come from: the embedded digits (plain, cluttered, or spread over a canvas
among large fragments, generated anew every epoch), an image folder, or a tfds dataset.

A source knows its size and classes and hands the pipeline *light* records
``{'image': raw, 'label': int32, 'name': string}`` for one host's share of the split (``name``
says which example it is in messages: a file path, a tfds record id, or ``dataset/split[i]``): ``records`` in a fixed
order (eval), ``epoch_records(order_key)`` in an order drawn from a key tensor, so the pipeline
can build every epoch inside one tf.data graph. For the in-memory sources ``raw`` is a uint8
image or a file path (read later by ``load``, so records skipped on resume are never read);
for tfds it is the encoded image bytes. Decoding and augmentation belong to the pipeline.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from ghostnetv2_jax.data._tf import tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
DIGITS_SPLITS = ('train', 'validation')
DIGITS_VALIDATION_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """A dataset that cannot be opened; the message says how to fix it, on one line."""


def host_slice(num_examples: int, host_index: int, host_count: int) -> np.ndarray:
    """Indices of one host's contiguous share; sizes differ by at most one, the first hosts
    taking the extra examples (the same rule as ``tfds.even_splits``)."""
    if not 0 <= host_index < host_count:
        raise ValueError(f'host_index {host_index} is not in [0, {host_count})')
    return np.array_split(np.arange(num_examples), host_count)[host_index]


@dataclasses.dataclass(frozen=True)
class InMemorySource:
    """Examples held as arrays: uint8 images (N, h, w, 3), or file paths read on ``load``."""
    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: Tuple[str, ...]
    # what listing found wrong with the dataset as a whole (image folders): (path, reason)
    listing_problems: Tuple[Tuple[str, str], ...] = ()

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def holds_paths(self) -> bool:
        return self.images.dtype.kind in 'OUS'

    def host_num_examples(self, host_index: int, host_count: int) -> int:
        return len(host_slice(self.num_examples, host_index, host_count))

    def names(self, index: np.ndarray) -> np.ndarray:
        """How messages name the examples at ``index``: their paths, or ``dataset/split[i]``."""
        if self.holds_paths:
            return self.images[index]
        return np.array([f'{self.name}/{self.split}[{i}]' for i in index], dtype=object)

    def problems(self, host_index: int, host_count: int) -> List[Tuple[str, str]]:
        """(path, reason) for what is wrong before anything is decoded: the listing's problems
        and, for files, this host's share checked by ``check_image_files``."""
        if not self.holds_paths:
            return sorted(self.listing_problems)
        index = host_slice(self.num_examples, host_index, host_count)
        return sorted(list(self.listing_problems) + check_image_files(self.images[index]))

    def records(self, host_index: int, host_count: int) -> tf.data.Dataset:
        """This host's share in dataset order."""
        index = host_slice(self.num_examples, host_index, host_count)
        return tf.data.Dataset.from_tensor_slices(
            {'image': self.images[index], 'label': self.labels[index].astype(np.int32),
             'name': self.names(index)})

    def epoch_records(self, host_index: int, host_count: int,
                      order_key: tf.Tensor) -> tf.data.Dataset:
        """This host's share in an exact permutation drawn from ``order_key`` (stateless, so
        the same key gives the same order anywhere; usable inside a traced function)."""
        with tf.init_scope():           # an input of the dataset op, not a graph constant
            index = tf.constant(host_slice(self.num_examples, host_index, host_count))
        order = tf.random.experimental.stateless_shuffle(index, seed=order_key)
        images, labels, names = self._tables
        return tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: {'image': tf.gather(images, i), 'label': tf.gather(labels, i),
                       'name': tf.gather(names, i)})

    @functools.cached_property
    def _tables(self) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # eager tensors even when first used inside a trace: tf.data then passes them to the
        # dataset op as inputs instead of baking a (possibly large) constant into the graph
        with tf.init_scope():
            return (tf.constant(self.images), tf.constant(self.labels.astype(np.int32)),
                    tf.constant(self.names(np.arange(self.num_examples))))

    def load(self, record: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        if self.holds_paths:
            return {**record, 'image': tf.io.read_file(record['image'])}
        return record


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared tfds image classification dataset, read as encoded bytes (decoded later)."""
    name: str
    split: str
    builder: object
    image_key: str = 'image'
    label_key: str = 'label'
    shuffle_buffer: int = 16384

    @property
    def num_examples(self) -> int:
        return self.builder.info.splits[self.split].num_examples

    @property
    def num_classes(self) -> int:
        return self.builder.info.features[self.label_key].num_classes

    @property
    def class_names(self) -> Tuple[str, ...]:
        return tuple(self.builder.info.features[self.label_key].names)

    def _host_split(self, host_index: int, host_count: int):
        import tensorflow_datasets as tfds
        host_slice(1, host_index, host_count)                    # validates the indices
        return tfds.even_splits(self.split, n=host_count)[host_index]

    def host_num_examples(self, host_index: int, host_count: int) -> int:
        return self.builder.info.splits[self._host_split(host_index, host_count)].num_examples

    def _read(self, host_index: int, host_count: int, shuffle_seed=None) -> tf.data.Dataset:
        import tensorflow_datasets as tfds
        shuffle = shuffle_seed is not None
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                      skip_prefetch=True, add_tfds_id=True)
        ds = self.builder.as_dataset(
            split=self._host_split(host_index, host_count), shuffle_files=shuffle,
            read_config=read_config, decoders={self.image_key: tfds.decode.SkipDecoding()})
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda ex: {'image': ex[self.image_key],
                                  'label': tf.cast(ex[self.label_key], tf.int32),
                                  'name': ex['tfds_id']})

    def records(self, host_index: int, host_count: int) -> tf.data.Dataset:
        """This host's share in file order."""
        return self._read(host_index, host_count)

    def epoch_records(self, host_index: int, host_count: int,
                      order_key: tf.Tensor) -> tf.data.Dataset:
        """This host's share with the file order and a ``shuffle_buffer`` shuffle both seeded
        from ``order_key``: reproducible, but only as random as the buffer allows."""
        seed = tf.random.stateless_uniform([], order_key, minval=0, maxval=2**31 - 1,
                                           dtype=tf.int64)
        return self._read(host_index, host_count, shuffle_seed=seed)

    def problems(self, host_index: int, host_count: int) -> List[Tuple[str, str]]:
        """Nothing is checked before decoding: the records live in tfds' files."""
        return []

    def load(self, record: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        return record


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits as uint8 RGB, and a fixed stratified split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)       # legacy generator: a frozen stream
    validation = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        validation.extend(members[:int(round(DIGITS_VALIDATION_FRACTION * len(members)))])
    is_val = np.zeros(len(labels), bool)
    is_val[validation] = True
    return images, labels, {'train': np.flatnonzero(~is_val), 'validation': np.flatnonzero(is_val)}


def digits(split: str) -> InMemorySource:
    """The embedded dataset: 1797 digits, 10 classes, about 80/20 train/validation per class."""
    images, labels, splits = _digits_arrays()
    if split not in splits:
        raise DataError(f"digits has splits {list(DIGITS_SPLITS)}, not {split!r}")
    index = splits[split]
    return InMemorySource('digits', split, images[index], labels[index],
                          tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------- cluttered digits

# The cluttered-MNIST construction of the spatial-transformer papers, on the embedded digits and
# from a fixed seed. The plain digits saturate near 98% for every attention variant; here each
# digit lies at a random spot among fragments cut from other digits, so a local patch of strokes
# may belong to either and the class is decided by the whole digit.
CLUTTERED_CANVAS = 40                  # >= 33 px: DFC still has last-stage maps to pool
CLUTTERED_UPSCALE = 2                  # nearest-neighbour: 8x8 -> 16x16, exact grey levels
CLUTTERED_DISTRACTORS = 6              # fragments of other digits per canvas
CLUTTERED_FRAGMENT_SIZES = (6, 8)      # square fragment side in canvas pixels, inclusive
CLUTTERED_FRAGMENT_MARGIN = 2          # fragments are cut this far inside the 16x16 digit,
                                       # where the strokes are, so few are blank
CLUTTERED_COPIES = {'train': 4, 'validation': 2}   # placements per source digit
CLUTTERED_SEED = 0


class ClutteredDigits(NamedTuple):
    """One split of cluttered digits, with where each digit came from and where it lies.

    ``images`` (N, CLUTTERED_CANVAS, CLUTTERED_CANVAS) uint8 grey; ``source`` the index of the
    example's digit in scikit-learn's 1797 digits; ``corner`` (N, 2) the (row, column) of the
    upscaled digit's top-left pixel on the canvas.
    """
    images: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    corner: np.ndarray


def _upscale_digits(grey: np.ndarray) -> np.ndarray:
    """(n, 8, 8) -> (n, 16, 16): every pixel repeated CLUTTERED_UPSCALE times on both axes."""
    return grey.repeat(CLUTTERED_UPSCALE, axis=1).repeat(CLUTTERED_UPSCALE, axis=2)


def _draw_offsets(rng: np.random.RandomState, low: int, high: np.ndarray) -> np.ndarray:
    """Uniform integers in [low, high] (inclusive, per element of ``high``), for (row, col)."""
    span = (high - low + 1)[..., None]
    return low + np.floor(rng.random_sample(high.shape + (2,)) * span).astype(np.int64)


def _paint(canvas: np.ndarray, patch: np.ndarray, corner) -> None:
    """Ink adds as the brighter of the two, so nothing painted later erases a stroke."""
    r, c = corner
    view = canvas[r:r + patch.shape[0], c:c + patch.shape[1]]
    np.maximum(view, patch, out=view)


@functools.lru_cache(maxsize=len(DIGITS_SPLITS))
def _cluttered_arrays(split: str) -> ClutteredDigits:
    """Each digit of the digits ``split`` placed CLUTTERED_COPIES[split] times at a random spot
    of a black canvas with CLUTTERED_DISTRACTORS fragments of other digits of the same split
    (so no source digit crosses splits) and of any class (so fragments hint at no label);
    deterministic from CLUTTERED_SEED."""
    images, labels, splits = _digits_arrays()
    index = splits[split]
    digits = _upscale_digits(images[index, :, :, 0])
    n, side = len(index), digits.shape[1]
    own = np.tile(np.arange(n), CLUTTERED_COPIES[split])
    m, k = len(own), CLUTTERED_DISTRACTORS
    rng = np.random.RandomState([CLUTTERED_SEED, DIGITS_SPLITS.index(split)])
    corner = _draw_offsets(rng, 0, np.full(m, CLUTTERED_CANVAS - side))
    other = (own[:, None] + 1 + rng.randint(0, n - 1, (m, k))) % n      # never the digit itself
    low, high = CLUTTERED_FRAGMENT_SIZES
    size = low + rng.randint(0, high - low + 1, (m, k))
    cut = _draw_offsets(rng, CLUTTERED_FRAGMENT_MARGIN, side - CLUTTERED_FRAGMENT_MARGIN - size)
    spot = _draw_offsets(rng, 0, CLUTTERED_CANVAS - size)
    canvases = np.zeros((m, CLUTTERED_CANVAS, CLUTTERED_CANVAS), np.uint8)
    for e in range(m):
        for f in range(k):
            (r, c), s = cut[e, f], size[e, f]
            _paint(canvases[e], digits[other[e, f], r:r + s, c:c + s], spot[e, f])
        _paint(canvases[e], digits[own[e]], corner[e])
    return ClutteredDigits(canvases, labels[index][own], index[own], corner)


def cluttered_digits(split: str) -> InMemorySource:
    """The embedded cluttered dataset: 40x40 canvases, 10 classes; 5,752 train examples
    (4 placements of each of digits' 1,438) and 718 validation (2 of each of its 359)."""
    if split not in DIGITS_SPLITS:
        raise DataError(f"cluttered_digits has splits {list(DIGITS_SPLITS)}, not {split!r}")
    built = _cluttered_arrays(split)
    images = np.repeat(built.images[..., None], 3, axis=-1)
    return InMemorySource('cluttered_digits', split, images, built.labels,
                          tuple(str(d) for d in range(10)))


# ----------------------------------------------------------------------------- spread digits

# One digit as large as most of the canvas among large fragments of other digits: any patch a few
# strokes wide may belong to the digit or to a fragment, so its identity needs strokes far apart,
# brought together across the image. Every training epoch draws new canvases (digit, place and
# clutter) from the run's order key, so a small network cannot memorise a fixed set; the
# validation canvases are fixed. The digits (and the fragments) of each split come from that
# split of the embedded digits, so no digit crosses splits.
SPREAD_CANVAS = 96                     # stride 16 leaves 6x6 maps: DFC pools them to 3x3
SPREAD_UPSCALE = 9                     # nearest-neighbour: 8x8 -> 72x72, exact grey levels
SPREAD_FRAGMENTS = 6                   # clutter: fragments of other digits of the split
SPREAD_FRAGMENT_SIZES = (20, 36)       # square fragment side in canvas pixels, inclusive
SPREAD_EXAMPLES = {'train': 8192, 'validation': 4000}   # per epoch (train), fixed (validation)
SPREAD_SEED = 0                        # the validation canvases


@functools.lru_cache(maxsize=len(DIGITS_SPLITS))
def _digit_bank(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The split's digits upscaled to 72x72 grey, and their labels."""
    images, labels, splits = _digits_arrays()
    index = splits[split]
    grey = images[index, :, :, 0]
    return grey.repeat(SPREAD_UPSCALE, axis=1).repeat(SPREAD_UPSCALE, axis=2), labels[index]


@dataclasses.dataclass(frozen=True)
class SpreadDigits:
    """The generated spread digits: 96x96 canvases, 10 classes. A record holds the digit's index
    in the split's bank and a layout key; ``load`` paints the canvas from them."""
    split: str
    num_examples: int
    name: str = 'spread_digits'
    holds_paths: bool = False

    @property
    def class_names(self) -> Tuple[str, ...]:
        return tuple(str(d) for d in range(10))

    @property
    def num_classes(self) -> int:
        return 10

    def host_num_examples(self, host_index: int, host_count: int) -> int:
        return len(host_slice(self.num_examples, host_index, host_count))

    def problems(self, host_index: int, host_count: int) -> List[Tuple[str, str]]:
        return []

    @functools.cached_property
    def _tables(self) -> Tuple[tf.Tensor, tf.Tensor]:
        with tf.init_scope():     # dataset inputs, not graph constants
            bank, labels = _digit_bank(self.split)
            return tf.constant(bank), tf.constant(labels.astype(np.int32))

    def _draw(self, key: tf.Tensor, count: int) -> tf.data.Dataset:
        """``count`` records drawn from ``key``, named by position."""
        bank, labels = self._tables
        k_digit, k_layout = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        digit = tf.random.stateless_uniform([count], seed=k_digit, minval=0, maxval=tf.shape(bank)[0],
                                            dtype=tf.int32)
        layout = tf.random.stateless_uniform([count, 2], seed=k_layout, minval=None, maxval=None,
                                             dtype=tf.int64)
        names = tf.strings.join([f'{self.name}/{self.split}[', tf.strings.as_string(tf.range(count)), ']'])
        return tf.data.Dataset.from_tensor_slices({'digit': digit, 'layout': layout,
                                                   'label': tf.gather(labels, digit), 'name': names})

    def records(self, host_index: int, host_count: int) -> tf.data.Dataset:
        """This host's share of the fixed canvases (SPREAD_SEED), in order."""
        index = host_slice(self.num_examples, host_index, host_count)
        key = tf.constant([SPREAD_SEED, DIGITS_SPLITS.index(self.split)], tf.int64)
        return self._draw(key, self.num_examples).skip(int(index[0]) if len(index) else 0).take(len(index))

    def epoch_records(self, host_index: int, host_count: int,
                      order_key: tf.Tensor) -> tf.data.Dataset:
        """This host's share of an epoch of new canvases drawn from ``order_key``."""
        return self._draw(order_key, self.host_num_examples(host_index, host_count))

    def load(self, record: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        bank, _ = self._tables
        side, digit, k = SPREAD_CANVAS, 8 * SPREAD_UPSCALE, SPREAD_FRAGMENTS
        keys = tf.unstack(tf.random.experimental.stateless_split(record['layout'], 4))
        draw = lambda key, shape, low, high: tf.random.stateless_uniform(
            shape, seed=key, minval=low, maxval=high + 1, dtype=tf.int32)      # inclusive

        def paint(canvas, patch, top, left):   # ink adds as the brighter of the two
            h, w = tf.shape(patch)[0], tf.shape(patch)[1]
            return tf.maximum(canvas, tf.pad(patch, [[top, side - top - h], [left, side - left - w]]))

        canvas = tf.zeros([side, side], tf.uint8)
        size = draw(keys[0], [k], *SPREAD_FRAGMENT_SIZES)
        other = draw(keys[1], [k], 0, 1 << 20) % tf.shape(bank)[0]
        where = draw(keys[2], [k, 4], 0, 1 << 20)
        for f in range(k):        # the clutter, then the digit over it
            s = size[f]
            r, c = where[f, 0] % (digit - s + 1), where[f, 1] % (digit - s + 1)
            canvas = paint(canvas, bank[other[f], r:r + s, c:c + s],
                           where[f, 2] % (side - s + 1), where[f, 3] % (side - s + 1))
        spot = draw(keys[3], [2], 0, side - digit)
        canvas = paint(canvas, bank[record['digit']], spot[0], spot[1])
        image = tf.ensure_shape(tf.tile(canvas[..., None], [1, 1, 3]), [side, side, 3])
        return {'image': image, 'label': record['label'], 'name': record['name']}


def spread_digits(split: str) -> SpreadDigits:
    """The generated spread digits (``SpreadDigits``): 8,192 new training canvases per epoch,
    4,000 fixed validation canvases."""
    if split not in DIGITS_SPLITS:
        raise DataError(f"spread_digits has splits {list(DIGITS_SPLITS)}, not {split!r}")
    return SpreadDigits(split, SPREAD_EXAMPLES[split])


# ----------------------------------------------------------------------------- image folder

# What each format's files start with and, when complete, end with. A file whose end differs
# (a truncated download, or a JPEG with bytes after its end marker) is decoded to decide.
_SIGNATURES = (
    ('JPEG', (b'\xff\xd8\xff',), b'\xff\xd9'),
    ('PNG', (b'\x89PNG\r\n\x1a\n',), b'IEND\xaeB`\x82'),
    ('GIF', (b'GIF87a', b'GIF89a'), b';'),
    ('BMP', (b'BM',), None),
)
_CHECK_THREADS = 32


def decode_error(path: str) -> Optional[str]:
    """The input pipeline's decoder on the whole file: None if it decodes, else its message."""
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return None
    except (tf.errors.OpError, ValueError) as e:
        text = (getattr(e, 'message', None) or str(e)).strip().splitlines()[0]
        text = re.sub(r'\{\{[^}]*\}\}\s*|\s*\[Op:.*$', '', text)   # TF's op and device
        return text.strip() or type(e).__name__


def check_image_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a training image (None: it looks whole). Reads its first and last
    bytes; only a file that does not end as its format ends is decoded in full."""
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(size - 12, 0))
            tail = f.read()
    except OSError as e:
        return f'cannot be read ({e.strerror or e})'
    if size == 0:
        return 'empty file'
    for kind, starts, end in _SIGNATURES:
        if head.startswith(starts):
            if end is None or tail.endswith(end):
                return None
            error = decode_error(path)
            return None if error is None else f'damaged or truncated {kind} ({error})'
    return f'not a JPEG, PNG, GIF or BMP image (starts with {head[:8]!r})'


def check_image_files(paths) -> List[Tuple[str, str]]:
    """(path, reason) for every file of ``paths`` that ``check_image_file`` rejects, in order."""
    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
        verdicts = list(pool.map(check_image_file, paths, chunksize=64))
    return [(str(p), why) for p, why in zip(paths, verdicts) if why is not None]


def _class_dirs(directory: str) -> Tuple[str, ...]:
    return tuple(sorted(d for d in os.listdir(directory)
                        if os.path.isdir(os.path.join(directory, d)) and not d.startswith('.')))


def image_folder(root: str, split: str, class_split: Optional[str] = None) -> InMemorySource:
    """Images under ``root/split/<class>/...`` (any depth); labels = sorted class names.

    The class list comes from ``root/class_split`` when it exists (the train split), so a
    validation folder missing a class still gets the train split's label numbering. Files with
    other extensions are not listed, and a class folder without images is not an error here:
    both are the source's ``listing_problems`` (hidden files are ignored).
    """
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f'image folder {split_dir!r} does not exist; expected '
                        f'{os.path.join(root, "<split>", "<class>", "<image>")}')
    class_dir = os.path.join(root, class_split) if class_split else split_dir
    classes = _class_dirs(class_dir if os.path.isdir(class_dir) else split_dir)
    present = _class_dirs(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(f'{split_dir!r} has classes {unknown} that {class_dir!r} lacks')
    paths, labels, problems = [], [], []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(split_dir, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(folder, f))
                elif not f.startswith('.'):
                    problems.append((os.path.join(folder, f), 'not an image file by its extension '
                                     f'({", ".join(IMAGE_EXTENSIONS)})'))
        if not found and name in present:
            problems.append((os.path.join(split_dir, name), 'class folder without images'))
        paths += sorted(found)
        labels += [label] * len(found)
    if not paths:
        raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {split_dir!r}')
    # object dtype: a unicode array would pad every path to the longest (4 bytes a character)
    return InMemorySource(f'folder:{root}', split, np.array(paths, dtype=object),
                          np.array(labels, np.int32), classes, tuple(sorted(problems)))


# ----------------------------------------------------------------------------- tfds

def _how_to_prepare(name: str, data_dir: str, builder) -> str:
    if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
        manual = os.path.join(data_dir, 'downloads', 'manual')
        if name.startswith('imagenet2012'):
            files = 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'
        else:
            files = 'the files its tfds catalog page lists'
        return (f'put {files} in {manual}, then run `tfds build {name} --data_dir {data_dir} '
                f'--manual_dir {manual}`')
    return f'run `tfds build {name} --data_dir {data_dir}` (downloads it)'


def tfds_dataset(name: str, split: str, data_dir: Optional[str] = None, *,
                 image_key: str = 'image', label_key: str = 'label',
                 shuffle_buffer: int = 16384) -> TfdsSource:
    """A tfds dataset that is already prepared in ``data_dir``; never downloads."""
    import tensorflow_datasets as tfds
    data_dir = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR')
                                  or '~/tensorflow_datasets')
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {name!r}: not 'digits', 'cluttered_digits', "
                        f"'folder:PATH' nor a tfds dataset name") from None
    if not builder.is_prepared():
        raise DataError(f'tfds dataset {name!r} is not prepared in {data_dir}: '
                        + _how_to_prepare(name, data_dir, builder))
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise DataError(f'tfds dataset {name!r} has no feature {key!r}; features: '
                            f'{sorted(features.keys())}')
    try:
        builder.info.splits[split]
    except (KeyError, ValueError, AssertionError) as e:
        raise DataError(f'tfds dataset {name!r} has no split {split!r} '
                        f'(splits: {sorted(builder.info.splits)}): {e}') from None
    return TfdsSource(name, split, builder, image_key, label_key, shuffle_buffer)


# ----------------------------------------------------------------------------- by name

def _tfds_opener(name, split, data_dir, image_key='image', label_key='label',
                 shuffle_buffer=16384, **_):
    return tfds_dataset(name, split, data_dir, image_key=image_key, label_key=label_key,
                        shuffle_buffer=shuffle_buffer)


# dataset kind -> opener(argument, split, data_dir, **options); each takes the options it needs
SOURCE_KINDS: Dict[str, Callable] = {
    'digits': lambda arg, split, data_dir, **_: digits(split),
    'cluttered_digits': lambda arg, split, data_dir, **_: cluttered_digits(split),
    'spread_digits': lambda arg, split, data_dir, **_: spread_digits(split),
    'folder': lambda arg, split, data_dir, class_split=None, **_: image_folder(
        arg or data_dir, split, class_split),
    'tfds': _tfds_opener,
}
SOURCE_KINDS['image_folder'] = SOURCE_KINDS['folder']


def parse_dataset(dataset: str) -> Tuple[str, str]:
    """'digits' | 'cluttered_digits' | 'spread_digits' | 'folder:PATH' | 'image_folder' |
    'tfds:NAME' | a tfds NAME[:VERSION]."""
    kind, _, arg = dataset.partition(':')
    if kind in SOURCE_KINDS:
        return kind, arg
    return 'tfds', dataset


def open_source(dataset: str, split: str, data_dir: Optional[str] = None, **options):
    """A source by name. ``options``: class_split (folders), image_key, label_key and
    shuffle_buffer (tfds)."""
    kind, arg = parse_dataset(dataset)
    if kind in ('folder', 'image_folder') and not (arg or data_dir):
        raise DataError(f"dataset {dataset!r} needs a path: 'folder:/path' or data_dir")
    return SOURCE_KINDS[kind](arg, split, data_dir, **options)

