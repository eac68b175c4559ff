"""The pipeline: batch layout, exact single pass over eval data, disjoint host shares, the
per-example augmentation keys, resume from any step, and clear errors."""
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ghostnetv2_jax import data
from ghostnetv2_jax.data import augment, pipeline, sources

# the recipe's augmentations on the embedded digits, small so the tests stay fast
AUGMENTED = {'dataset': 'digits', 'image_size': 16, 'randaugment': 'rand-m9-mstd0.5',
             'reprob': 0.25}
# no randomness at all: 8x8 digits pass through unchanged (whole-image crop, same-size resize),
# so every output image identifies its source example
IDENTITY = {'dataset': 'digits', 'image_size': 8, 'crop_pct': 1.0, 'interpolation': 'bilinear',
            'train_interpolation': 'bilinear', 'scale': (1.0, 1.0), 'ratio': (1.0, 1.0),
            'hflip': 0.0, 'color_jitter': 0.0, 'randaugment': '', 'reprob': 0.0}
BATCH = 32                    # training on the 359 validation digits: 11 steps per epoch


@pytest.fixture(scope='module')
def fresh():
    """The first 14 batches (one epoch boundary) of a fresh augmented training run."""
    split = data.create_split(AUGMENTED, split='validation', train=True, global_batch=BATCH,
                              seed=7)
    return split, [next(split.iterator) for _ in range(14)]


def _ids(batches, source):
    """Map identity-pipeline images back to the source examples' bytes."""
    normalized = augment.normalize(source.images, pipeline.IMAGENET_MEAN,
                                   pipeline.IMAGENET_STD).numpy()
    index = {}
    for i, image in enumerate(normalized):
        index.setdefault(image.tobytes(), []).append(i)
    out = []
    for batch in batches:
        for image in batch['images']:
            assert image.tobytes() in index, 'an output image is not an unchanged source image'
            out.append(image.tobytes())
    return out, index


def _counts(keys):
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return counts


# ----------------------------------------------------------------------------- layout

def test_train_batches_have_the_promised_layout(fresh):
    split, batches = fresh
    assert (split.num_examples, split.num_classes, split.steps_per_epoch, split.batch_size) == (
        359, 10, 359 // BATCH, BATCH)
    for batch in batches[:3]:
        assert set(batch) == {'images', 'labels', 'mask'}
        assert batch['images'].shape == (BATCH, 16, 16, 3) and batch['images'].dtype == np.float32
        assert batch['labels'].shape == (BATCH,) and batch['labels'].dtype == np.int32
        assert batch['mask'].dtype == np.float32 and (batch['mask'] == 1.0).all()
        assert np.isfinite(batch['images']).all() and set(batch['labels']) <= set(range(10))


def test_train_examples_are_the_eager_transform_of_their_record(fresh):
    # the example at (epoch 0, position p) is TrainTransform(record p of the epoch's order,
    # key(seed, epoch, host, p)), computed here eagerly
    _, batches = fresh
    transform = pipeline.DataConfig.from_config(AUGMENTED).train_transform()
    order = pipeline._key(7, pipeline._ORDER, 0, 0)
    records = sources.digits('validation').epoch_records(0, 1, order).take(6)
    for position, record in enumerate(records):
        key = pipeline._key(7, pipeline._AUGMENT, 0, 0, position)
        np.testing.assert_array_equal(batches[0]['images'][position],
                                      transform(record['image'], key).numpy())
        assert batches[0]['labels'][position] == record['label']


# ----------------------------------------------------------------------------- eval

def test_eval_covers_every_example_exactly_once_then_masks_padding():
    # with IDENTITY the eval images are the source images, normalized: exact, in order
    source = sources.digits('validation')
    split = data.create_split(IDENTITY, split='validation', train=False, global_batch=64, seed=0)
    batches = list(split.iterator)
    assert len(batches) == split.steps_per_epoch == 6                # ceil(359 / 64)
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.tolist() == [1.0] * 359 + [0.0] * (6 * 64 - 359)
    images = np.concatenate([b['images'] for b in batches])
    expected = augment.normalize(source.images, pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)
    np.testing.assert_array_equal(images[:359], expected.numpy())
    np.testing.assert_array_equal(np.concatenate([b['labels'] for b in batches])[:359],
                                  source.labels)
    again = list(split.fresh_iterator())
    np.testing.assert_array_equal(np.concatenate([b['images'] for b in again]), images)


def test_eval_examples_are_the_eager_eval_transform_of_their_record():
    # computed eagerly on purpose: under tf.function grappler's constant folding rewrites
    # (x / 255 - mean) / std and moves the result by an ulp
    source = sources.digits('validation')
    split = data.create_split(AUGMENTED, split='validation', train=False, global_batch=64, seed=0)
    transform = pipeline.DataConfig.from_config(AUGMENTED).eval_transform()
    batch = next(split.iterator)
    for i in range(8):
        np.testing.assert_array_equal(batch['images'][i],
                                      transform(tf.constant(source.images[i])).numpy())


def test_eval_host_shares_together_cover_the_split_once():
    hosts, global_batch = 3, 48
    parts = []
    for host in range(hosts):
        split = data.create_split(IDENTITY, split='validation', train=False,
                                  global_batch=global_batch, seed=0, host_index=host,
                                  host_count=hosts)
        batches = list(split.iterator)
        assert len(batches) == split.steps_per_epoch == 8                # same on every host
        assert all(b['images'].shape[0] == global_batch // hosts for b in batches)
        mask = np.concatenate([b['mask'] for b in batches]) == 1
        parts.append(np.concatenate([b['labels'] for b in batches])[mask])
    np.testing.assert_array_equal(np.concatenate(parts), sources.digits('validation').labels)


# ----------------------------------------------------------------------------- train order

def test_train_hosts_read_disjoint_shares_without_repeats():
    source = sources.digits('validation')
    hosts, global_batch = 2, 32
    for host in range(hosts):
        split = data.create_split(IDENTITY, split='validation', train=True,
                                  global_batch=global_batch, seed=1, host_index=host,
                                  host_count=hosts, num_epochs=1)
        batches = list(split.iterator)
        assert len(batches) == 359 // global_batch
        assert batches[0]['images'].shape[0] == global_batch // hosts
        seen, index = _ids(batches, source)
        share = set(sources.host_slice(359, host, hosts))
        for key, count in _counts(seen).items():
            owners = [i for i in index[key] if i in share]
            assert count <= len(owners), 'an example from another host, or one seen twice'


def test_each_epoch_is_a_new_order_without_repeats():
    source = sources.digits('validation')
    split = data.create_split(IDENTITY, split='validation', train=True, global_batch=128,
                              seed=2, num_epochs=3)
    batches = list(split.iterator)
    assert len(batches) == 3 * split.steps_per_epoch == 6
    epochs = [_ids(batches[2 * e:2 * e + 2], source)[0] for e in range(3)]
    _, index = _ids([], source)
    for seen in epochs:
        assert all(c <= len(index[k]) for k, c in _counts(seen).items())
    assert epochs[0] != epochs[1] != epochs[2]


# ----------------------------------------------------------------------------- resume, seeds

@pytest.mark.parametrize('start_step', [9, 12])       # before and after the epoch boundary
def test_resume_gives_exactly_the_batches_of_an_uninterrupted_run(fresh, start_step):
    _, batches = fresh
    split = data.create_split(AUGMENTED, split='validation', train=True, global_batch=BATCH,
                              seed=7, start_step=start_step)
    for expected in batches[start_step:]:
        got = next(split.iterator)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_the_seed_decides_order_and_augmentation(fresh):
    _, batches = fresh
    other = next(data.create_split(AUGMENTED, split='validation', train=True,
                                   global_batch=BATCH, seed=8).iterator)
    assert not np.array_equal(other['images'], batches[0]['images'])
    assert not np.array_equal(other['labels'], batches[0]['labels'])


def test_num_epochs_ends_the_training_iterator():
    split = data.create_split(IDENTITY, split='validation', train=True, global_batch=128,
                              seed=0, num_epochs=1, start_step=1)
    assert len(list(split.iterator)) == 1


# ----------------------------------------------------------------------------- folders

def test_image_folder_jpegs_are_decoded_inside_the_crop_window(tmp_path):
    # JPEGs take the decode_and_crop_jpeg path; it must equal decoding then cropping (crop,
    # flip and colour jitter are enough to show it; RandAugment is tested above)
    rng = np.random.RandomState(0)
    for label in ('a', 'b'):
        os.makedirs(tmp_path / 'train' / label)
        for i in range(4):
            image = (rng.rand(30, 40, 1) * np.linspace(0, 255, 40)[None, :, None]).repeat(3, -1)
            Image.fromarray(image.astype(np.uint8)).save(tmp_path / 'train' / label / f'{i}.jpg')
    config = pipeline.DataConfig.from_config({**AUGMENTED, 'dataset': f'folder:{tmp_path}',
                                              'randaugment': ''})
    source = config.source('train')
    batch = next(data.create_split(config, split='train', train=True, global_batch=8,
                                   seed=5).iterator)
    records = list(source.epoch_records(0, 1, pipeline._key(5, pipeline._ORDER, 0, 0)))
    for position, record in enumerate(records):
        key = pipeline._key(5, pipeline._AUGMENT, 0, 0, position)
        image = tf.io.decode_jpeg(tf.io.read_file(record['image']), channels=3)
        expected = config.train_transform()(image, key).numpy()
        np.testing.assert_array_equal(batch['images'][position], expected)


# ----------------------------------------------------------------------------- config, errors

def test_default_config_lists_every_field_and_round_trips():
    config = data.default_config()
    assert isinstance(config, ml_collections.ConfigDict)
    assert pipeline.DataConfig.from_config(config) == pipeline.DataConfig()
    config.dataset, config.image_size = 'digits', 32
    assert pipeline.DataConfig.from_config(config).image_size == 32
    assert data.num_classes_of(config) == 10
    as_dict = {**config.to_dict(), 'image_size': (64, 64)}   # a model's pretrained input_size
    assert pipeline.DataConfig.from_config(as_dict).image_size == 64


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match='unknown data config fields'):
        data.create_split({'dataset': 'digits', 'img_size': 8}, split='train', train=True,
                          global_batch=8, seed=0)
    with pytest.raises(ValueError, match='multiple of host_count'):
        data.create_split(IDENTITY, split='train', train=True, global_batch=10, seed=0,
                          host_count=4)
    with pytest.raises(ValueError, match='fewer than one global batch'):
        data.create_split(IDENTITY, split='validation', train=True, global_batch=512, seed=0)
    with pytest.raises(ValueError, match='square'):
        data.create_split({'dataset': 'digits', 'image_size': (32, 48)}, split='train',
                          train=True, global_batch=8, seed=0)
    with pytest.raises(ValueError, match='start_step'):
        data.create_split(IDENTITY, split='train', train=True, global_batch=8, seed=0,
                          start_step=-1)
    with pytest.raises(ValueError, match='host_index'):
        data.create_split(IDENTITY, split='train', train=True, global_batch=8, seed=0,
                          host_index=2, host_count=2)
