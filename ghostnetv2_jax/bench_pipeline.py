"""The input-pipeline benchmark of the harness (``bench --modes pipeline``): its JPEG folder, the
same JPEGs as tfds records, and the runner each pipeline contender's worker process drives.

The folder (``generate_folder``; ``prepare_folder`` caches it): ``images`` JPEG photographs in
each of ROOT/train/<class>/ and ROOT/validation/<class>/, 8 classes, all derived
deterministically from a seed from the one photograph our dependencies ship, matplotlib's
``mpl-data/sample_data/grace_hopper.jpg`` (512x600): a crop of 50-100% of its area with a long
side 1-1.5x the short one (landscape or portrait), resized (bicubic) to a short side of 300-500
px, flipped horizontally half the time, per-channel colour gains of 0.8-1.2 and sensor noise
N(0, 3), saved by PIL at quality 90 (4:2:0 chroma subsampling, baseline). Image i of a split
depends on (seed, split, i) only, so a larger folder extends a smaller one. ``folder_stats``
gives what the report states about them: count, mean KiB, mean width x height, bits per pixel.

The records (``prepare_tfds``): the same JPEG files, their bytes unchanged, as a prepared tfds
dataset ``bench_images`` (tfds' default format, TFRecord), built with a GeneratorBasedBuilder as
tfds builds a user's image dataset; this project reads it with ``dataset='bench_images'`` and
timm with ``create_dataset('tfds/bench_images', root=...)``.

The contenders (``PipelineRunner``, one per worker process): this project's
``data.create_split`` of the recipe's train or eval pipeline (``ours``), or timm's
``create_loader`` with the same transforms (``timm``), over the folder or the records; both use
every usable core. The harness (bench.py) times them; the method is in bench.py's
``run_group`` and docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

SPLITS = ('train', 'validation')
CLASSES = 8
JPEG_QUALITY = 90
SHORT_SIDE = (300, 500)          # px, inclusive
MAX_ASPECT = 1.5                 # long side / short side
CROP_AREA = (0.5, 1.0)           # of the photograph's area
GAINS = (0.8, 1.2)               # per-channel colour gain
NOISE_SIGMA = 3.0                # sensor noise, in 8-bit levels
DEFAULT_IMAGES = 512             # per split
MANIFEST = 'bench_images.json'   # written last by generate_folder: what the folder holds
TFDS_NAME = 'bench_images'
TFDS_DIR = 'tfds'                # prepare_tfds's data_dir under the folder's root
PHOTO = 'grace_hopper.jpg'


class PipelineDataError(ValueError):
    """A benchmark folder that cannot be made or used; the message says why, on one line."""


def source_photo() -> str:
    """The path of matplotlib's sample photograph (matplotlib: the dev and notebooks extras)."""
    try:
        import matplotlib
    except ImportError:
        raise PipelineDataError(
            "the pipeline benchmark's images are derived from matplotlib's sample photograph, and "
            'matplotlib is not installed: pip install matplotlib (the dev extra), or pass '
            '--pipeline-data with an image folder (ROOT/train/<class>/*.jpg, ROOT/validation/...)') from None
    path = os.path.join(matplotlib.get_data_path(), 'sample_data', PHOTO)
    if not os.path.isfile(path):
        raise PipelineDataError(f'matplotlib {matplotlib.__version__} has no sample photograph {path}')
    return path


def make_image(photo, rng: np.random.Generator):
    """One benchmark photograph (a PIL image) from ``photo`` (a PIL RGB image), drawn from ``rng``."""
    from PIL import Image
    width, height = photo.size
    area = rng.uniform(*CROP_AREA) * width * height
    aspect = rng.uniform(1.0, MAX_ASPECT)
    if rng.random() < 0.5:
        aspect = 1 / aspect                                  # portrait
    w = min(width, int(round(np.sqrt(area * aspect))))
    h = min(height, int(round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    scale = short / min(w, h)
    image = photo.crop((left, top, left + w, top + h)).resize(
        (max(short, int(round(w * scale))), max(short, int(round(h * scale)))), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) * rng.uniform(*GAINS, 3).astype(np.float32)
    pixels += NOISE_SIGMA * rng.standard_normal(pixels.shape, np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def generate_folder(root: str, images: int = DEFAULT_IMAGES, seed: int = 0,
                    log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Write ``images`` photographs to each split of ``root`` (ROOT/SPLIT/c<k>/NNNNN.jpg, image i
    in class i % CLASSES) and the manifest; returns the manifest."""
    from PIL import Image
    path = source_photo()
    photo = Image.open(path).convert('RGB')
    t0 = time.perf_counter()
    for s, split in enumerate(SPLITS):
        for k in range(CLASSES):
            os.makedirs(os.path.join(root, split, f'c{k}'), exist_ok=True)
        for i in range(images):
            image = make_image(photo, np.random.default_rng([seed, s, i]))
            image.save(os.path.join(root, split, f'c{i % CLASSES}', f'{i:05d}.jpg'), 'JPEG',
                       quality=JPEG_QUALITY)
    manifest = {'images_per_split': images, 'seed': seed, 'classes': CLASSES, 'quality': JPEG_QUALITY,
                'derived_from': f'matplotlib mpl-data/sample_data/{PHOTO}'}
    with open(os.path.join(root, MANIFEST + '.tmp'), 'w') as f:
        json.dump(manifest, f)
    os.replace(os.path.join(root, MANIFEST + '.tmp'), os.path.join(root, MANIFEST))
    log(f'generated {images} JPEGs per split in {root} ({time.perf_counter() - t0:.0f} s)')
    return manifest


def prepare_folder(root: str, images: int = DEFAULT_IMAGES, seed: int = 0,
                   log: Callable[[str], None] = lambda s: None) -> Optional[Dict[str, Any]]:
    """``root`` ready to benchmark: generated there when it is missing or empty, reused when it
    holds a folder this module generated with the same ``images`` and ``seed``, used as it is when
    it holds another image folder (ROOT/train/...). Returns the manifest (None: a user's folder)."""
    manifest_path = os.path.join(root, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if (manifest.get('images_per_split'), manifest.get('seed')) != (images, seed):
            raise PipelineDataError(
                f'{root} holds a generated folder of {manifest.get("images_per_split")} images per split '
                f'(seed {manifest.get("seed")}), not {images}: pass --pipeline-images '
                f'{manifest.get("images_per_split")}, another --pipeline-data, or remove it')
        log(f'using the generated folder {root}')
        return manifest
    if os.path.isdir(os.path.join(root, 'train')):
        for split in SPLITS:
            if not os.path.isdir(os.path.join(root, split)):
                raise PipelineDataError(f'{root} has no {split}/ folder; the pipeline benchmark reads '
                                        f'{os.path.join(root, "{" + ",".join(SPLITS) + "}", "<class>", "<image>")}')
        log(f'using the image folder {root} as it is')
        return None
    if os.path.isdir(root) and os.listdir(root):
        raise PipelineDataError(f'{root} is neither empty nor an image folder (ROOT/train/<class>/...); '
                                'pass an empty or new directory to generate the benchmark images in')
    return generate_folder(root, images, seed, log)


def folder_stats(root: str) -> Dict[str, Dict[str, float]]:
    """Per split: images, mean KiB, mean width and height, bits per pixel (all bytes * 8 / all
    pixels). Reads the files' headers only."""
    from PIL import Image
    from ghostnetv2_jax.data import sources
    stats = {}
    for split in SPLITS:
        paths = sources.image_folder(root, split, 'train').images
        sizes, dims = [], []
        for path in paths:
            sizes.append(os.path.getsize(path))
            with Image.open(path) as image:
                dims.append(image.size)
        dims = np.array(dims, np.float64)
        stats[split] = {'images': len(paths), 'mean_kib': float(np.mean(sizes)) / 1024,
                        'mean_width': float(dims[:, 0].mean()), 'mean_height': float(dims[:, 1].mean()),
                        'bits_per_pixel': 8 * float(np.sum(sizes)) / float(np.prod(dims, axis=1).sum())}
    return stats


def prepare_tfds(root: str) -> str:
    """The folder's JPEGs as the prepared tfds dataset ``TFDS_NAME`` in ROOT/tfds (built once;
    stamped with the folder's file list, sizes and times, so a changed folder is built anew).
    Returns that data_dir."""
    import hashlib
    import shutil
    import tensorflow_datasets as tfds
    from ghostnetv2_jax.data import sources
    data_dir = os.path.join(root, TFDS_DIR)
    listing = {split: sources.image_folder(root, split, 'train') for split in SPLITS}
    files = {s: [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in src.images] for s, src in listing.items()}
    digest = hashlib.sha1(json.dumps(files).encode()).hexdigest()
    stamp = os.path.join(data_dir, 'folder.sha1')
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read() == digest:
                return data_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    names = listing['train'].class_names
    tfds.disable_progress_bar()

    class BenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """The benchmark folder's JPEG files, unchanged."""
        name = TFDS_NAME
        code_path = None     # no source file holds it: no checksums file to look for
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=list(names))}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(src) for split, src in listing.items()}

        def _generate_examples(self, src):
            for path, label in zip(src.images, src.labels):
                yield str(path), {'image': str(path), 'label': int(label)}   # a path: its bytes as they are

    BenchImages(data_dir=data_dir).download_and_prepare()
    with open(stamp, 'w') as f:
        f.write(digest)
    return data_dir


# ----------------------------------------------------------------------------- the runner (worker side)
@dataclasses.dataclass
class _Pass:
    """Where a runner is: its iterator, and how a new one is made when it ends."""
    iterator: Any
    restart: Callable[[], Any]
    count: Callable[[Any], int]      # the real images of a batch (not its padding)


class PipelineRunner:
    """One pipeline, pulled as a trainer pulls it: ``step()`` takes one batch; ``run_round(n)``
    times ``n`` batches after ``skip`` untimed ones.

    spec: framework 'ours' | 'timm'; variant 'train' | 'eval'; source 'folder' | 'tfds'; batch;
    size (the square output); root (the folder) and tfds_dir; cores (tf.data threads, or timm's
    DataLoader workers).
    An iterator that ends (an eval pass; a timm epoch) is replaced by a new one, outside the
    timed time; the first batches of the new pass are timed.
    """

    def __init__(self, spec: Dict[str, Any]):
        self.batch, self.cores, self.size = spec['batch'], spec['cores'], spec['size']
        self.train = spec['variant'] == 'train'
        self.restarts = 0
        t0 = time.perf_counter()
        self.info: Dict[str, Any] = {}
        self.state = (self._ours if spec['framework'] == 'ours' else self._timm)(spec)
        self.compile_s = None
        self.info['setup_s'] = time.perf_counter() - t0

    def _ours(self, spec) -> _Pass:
        from ghostnetv2_jax import process
        process.fast_cpu_defaults()          # as the train and evaluate commands run
        from ghostnetv2_jax.data import pipeline
        from ghostnetv2_jax.data._tf import tf
        if spec['source'] == 'tfds':
            config = {'dataset': TFDS_NAME, 'data_dir': spec['tfds_dir']}
        else:
            config = {'dataset': 'image_folder', 'data_dir': spec['root']}
        config = pipeline.DataConfig.from_config({**config, 'num_threads': self.cores, 'image_size': self.size})
        split = config.train_split if self.train else config.eval_split
        data = pipeline.create_split(config, split=split, train=self.train, global_batch=self.batch, seed=0)
        self.info.update(backend='tf.data', tensorflow=tf.__version__, threads=self.cores,
                         split_images=data.num_examples, epoch_batches=data.steps_per_epoch)
        return _Pass(data.iterator, data.fresh_iterator, lambda b: int(b['mask'].sum()))

    def _timm(self, spec) -> _Pass:
        import timm
        import torch
        from timm.data import create_dataset, create_loader
        torch.set_num_threads(1)             # the DataLoader's workers are processes, one per core
        split = 'train' if self.train else 'validation'
        if spec['source'] == 'tfds':
            dataset = create_dataset(f'tfds/{TFDS_NAME}', root=spec['tfds_dir'], split=split,
                                     is_training=self.train, batch_size=self.batch)
        else:
            dataset = create_dataset('', root=spec['root'], split=split)
        augment = dict(re_prob=0.2, re_mode='pixel', re_count=1, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       hflip=0.5, color_jitter=0.4, auto_augment='rand-m9-mstd0.5',
                       interpolation='random') if self.train else dict(interpolation='bicubic', crop_pct=0.875)
        # Training from the folder: timm's MultiEpochsDataLoader (train.py --use-multi-epochs-loader),
        # whose workers go on into the next epoch as ours does (every epoch in one tf.data graph);
        # its tfds reader is an IterableDataset, which that loader cannot take.
        multi_epochs = self.train and spec['source'] == 'folder'
        loader = create_loader(dataset, input_size=(3, self.size, self.size), batch_size=self.batch,
                               is_training=self.train, use_prefetcher=False, num_workers=self.cores,
                               persistent_workers=True, use_multi_epochs_loader=multi_epochs,
                               device=torch.device('cpu'), **augment)
        self.info.update(backend='torch DataLoader', torch=torch.__version__, timm=timm.__version__,
                         workers=self.cores, multi_epochs_loader=multi_epochs, split_images=len(dataset),
                         epoch_batches=len(loader))
        return _Pass(iter(loader), lambda: iter(loader), lambda b: int(b[0].shape[0]))

    def _next(self) -> Tuple[int, float]:
        """One batch: (its real images, seconds spent making a new iterator)."""
        try:
            return self.state.count(next(self.state.iterator)), 0.0
        except StopIteration:
            t0 = time.perf_counter()
            self.state.iterator = self.state.restart()
            self.restarts += 1
            restart = time.perf_counter() - t0
            return self.state.count(next(self.state.iterator)), restart

    def step(self) -> None:
        self._next()

    def run_round(self, n: int, skip: int) -> Dict[str, Any]:
        """``skip`` untimed batches, then ``n`` timed: seconds per ``batch`` images over them
        (elapsed time less restarts, times batch / real images)."""
        for _ in range(skip):
            self._next()
        restarts, images, excluded = self.restarts, 0, 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            count, restart = self._next()
            images += count
            excluded += restart
        elapsed = time.perf_counter() - t0 - excluded
        return {'times': [elapsed * self.batch / max(images, 1)], 'faults': [], 'images': images,
                'restarts': self.restarts - restarts}

    def memory(self) -> Dict[str, float]:
        return {}

    def describe(self) -> Dict[str, Any]:
        return dict(self.info)


# ----------------------------------------------------------------------------- where the time goes
PROFILE_STAGES = ('read', 'decode in the crop window', 'resize', 'flip', 'randaugment', 'normalize',
                  'random erasing', 'batched (create_split)')


def stage_profile(root: str, seconds: float = 3.0, size: int = 224, batch: int = 64) -> List[Dict[str, float]]:
    """The recipe's train chain over ``root``'s train JPEGs on one thread, cumulatively: each row
    runs every stage up to and including its own, per image (ms), so the difference between two
    rows is one stage's cost; the last row is ``data.create_split`` itself (batches of ``batch``,
    tf.data on one thread). Each row runs for ``seconds`` after a warm-up."""
    from ghostnetv2_jax.data import augment, pipeline, sources
    from ghostnetv2_jax.data._tf import tf
    config = pipeline.DataConfig.from_config({'dataset': 'image_folder', 'data_dir': root, 'num_threads': 1,
                                              'image_size': size})
    transform = config.train_transform()
    files = [str(p) for p in sources.image_folder(root, config.train_split).images]
    stages = transform._stages
    key = lambda i: tf.stack([tf.constant(0, tf.int64), tf.cast(i, tf.int64)])

    def chain(upto: int):
        @tf.autograph.experimental.do_not_convert
        def example(i, path):
            raw, k = tf.io.read_file(path), key(i)
            if upto == 0:
                return tf.strings.length(raw)
            image = pipeline.decode_window(raw, lambda shape: transform.crop_window(shape, k))
            if upto >= 2:
                image = augment.random_interpolation_resize(image, (size, size), augment.fold_in(k, 1),
                                                            augment.RANDOM_INTERPOLATIONS)
            for stage, name in ((3, 'hflip'), (4, 'randaugment')):
                if upto >= stage and stages[name] is not None:
                    image = stages[name](image, augment.fold_in(k, augment.UINT8_STAGES[name][0]))
            if upto >= 5:
                image = augment.normalize(image, transform.mean, transform.std)
            if upto >= 6 and stages['random_erasing'] is not None:
                image = stages['random_erasing'](image, augment.fold_in(k, augment.FLOAT_STAGES['random_erasing'][0]))
            return tf.reduce_sum(tf.cast(image[:1, :1], tf.float32))   # keep the image, return little
        return example

    def timed(iterator, per_item: int) -> float:
        for _ in range(3):
            next(iterator)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(iterator)
            n += per_item
        return 1e3 * (time.perf_counter() - t0) / n

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    rows = []
    for upto, name in enumerate(PROFILE_STAGES[:-1]):
        ds = (tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64), files)).repeat()
              .map(chain(upto), num_parallel_calls=1).batch(16).with_options(options))
        rows.append({'stage': name, 'ms_per_image': timed(iter(ds), 16)})
    data = pipeline.create_split(config, split=config.train_split, train=True, global_batch=batch, seed=0)
    rows.append({'stage': PROFILE_STAGES[-1], 'ms_per_image': timed(data.iterator, batch)})
    return rows
