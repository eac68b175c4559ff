"""Sources: the embedded digits split, image folders, tfds datasets (a tiny one built locally,
and a missing one), host shares, and dataset names."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ghostnetv2_jax import data
from ghostnetv2_jax.data import pipeline, sources as S


# ----------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_complete():
    train, val = S.digits('train'), S.digits('validation')
    assert (train.num_examples, val.num_examples, train.num_classes) == (1438, 359, 10)
    # pinned: the split must never change between versions or runs
    assert train.labels[:12].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 0, 1, 2, 4]
    assert val.labels[:12].tolist() == [3, 7, 3, 9, 0, 8, 7, 0, 8, 0, 3, 3]
    _, labels, splits = S._digits_arrays.__wrapped__()               # recomputed, not cached
    assert sorted(np.concatenate([splits['train'], splits['validation']]).tolist()) == list(range(1797))
    for c in range(10):                                              # 20% of every class
        assert (val.labels == c).sum() == round(0.2 * (labels == c).sum())


def test_digits_images_are_uint8_rgb_grey_on_the_full_range():
    images = S.digits('train').images
    assert images.dtype == np.uint8 and images.shape == (1438, 8, 8, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert images.min() == 0 and images.max() == 255
    # scikit-learn's 0..16 grey levels scaled by 255/16 and rounded
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}


def test_digits_unknown_split_is_a_clear_error():
    with pytest.raises(S.DataError, match="splits.*'train', 'validation'"):
        S.digits('test')


# ----------------------------------------------------------------------------- host shares

@pytest.mark.parametrize('n,hosts', [(10, 3), (1797, 8), (5, 5)])
def test_host_slices_are_disjoint_near_equal_and_cover_everything(n, hosts):
    shares = [S.host_slice(n, h, hosts) for h in range(hosts)]
    assert np.array_equal(np.concatenate(shares), np.arange(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match='host_index'):
        S.host_slice(n, hosts, hosts)


def test_in_memory_epoch_records_are_a_seeded_permutation_of_the_host_share():
    source = S.digits('validation')

    def labels(host, key):
        ds = source.epoch_records(host, 2, tf.constant(key, tf.int64))
        return [int(r['label']) for r in ds]

    first, again, other = labels(0, [1, 2]), labels(0, [1, 2]), labels(0, [1, 3])
    assert first == again and first != other
    share = source.labels[S.host_slice(359, 0, 2)]
    assert sorted(first) == sorted(share.tolist()) and len(first) == 180


# ----------------------------------------------------------------------------- image folder

def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _folder(tmp_path):
    rng = np.random.RandomState(0)
    images = {}
    for split, classes in [('train', ['zebra', 'ant', 'moth']), ('val', ['moth', 'ant'])]:
        for name in classes:
            for i, rel in enumerate(['a.png', 'sub/b.png', 'c.JPG']):
                path = str(tmp_path / split / name / rel)
                images[path] = rng.randint(0, 256, (5 + i, 7, 3)).astype(np.uint8)
                _write(path, images[path])
    (tmp_path / 'train' / 'ant' / 'notes.txt').write_text('not an image')
    return images


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    images = _folder(tmp_path)
    source = S.image_folder(str(tmp_path), 'train')
    assert source.class_names == ('ant', 'moth', 'zebra') and source.num_examples == 9
    assert source.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [os.path.relpath(p, tmp_path) for p in source.images[:3]] == [
        'train/ant/a.png', 'train/ant/c.JPG', 'train/ant/sub/b.png']
    record = next(iter(source.records(0, 1)))
    decoded = pipeline.decode(source.load(record)['image']).numpy()
    np.testing.assert_array_equal(decoded, images[str(tmp_path / 'train/ant/a.png')])   # PNG: exact


def test_image_folder_numbers_other_splits_like_the_train_split(tmp_path):
    _folder(tmp_path)
    val = S.image_folder(str(tmp_path), 'val', class_split='train')
    assert val.class_names == ('ant', 'moth', 'zebra') and val.labels.tolist() == [0] * 3 + [1] * 3
    assert S.image_folder(str(tmp_path), 'val').class_names == ('ant', 'moth')


def test_image_folder_errors_are_clear(tmp_path):
    _folder(tmp_path)
    with pytest.raises(S.DataError, match='does not exist'):
        S.image_folder(str(tmp_path), 'test')
    os.makedirs(tmp_path / 'val' / 'wasp')
    with pytest.raises(S.DataError, match=r"classes \['wasp'\]"):
        S.image_folder(str(tmp_path), 'val', class_split='train')
    os.makedirs(tmp_path / 'empty' / 'ant')
    with pytest.raises(S.DataError, match='no images'):
        S.image_folder(str(tmp_path), 'empty')


# ----------------------------------------------------------------------------- names

def test_dataset_names_select_the_source_kind():
    assert S.parse_dataset('digits') == ('digits', '')
    assert S.parse_dataset('folder:/data/imgs') == ('folder', '/data/imgs')
    assert S.parse_dataset('image_folder') == ('image_folder', '')
    assert S.parse_dataset('imagenet2012:5.1.0') == ('tfds', 'imagenet2012:5.1.0')
    assert S.parse_dataset('tfds:cifar10') == ('tfds', 'cifar10')
    with pytest.raises(S.DataError, match='needs a path'):
        S.open_source('image_folder', 'train')


# ----------------------------------------------------------------------------- tfds

def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(S.DataError) as err:
        data.num_classes_of({'dataset': 'imagenet2012', 'data_dir': str(tmp_path)})
    message = str(err.value)
    assert '\n' not in message and 'not prepared' in message
    assert 'ILSVRC2012_img_train.tar' in message and str(tmp_path / 'downloads' / 'manual') in message
    assert f'tfds build imagenet2012 --data_dir {tmp_path}' in message


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """30 train and 7 test PNG images of varying size, 3 classes; label = index % 3."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(30, 0), 'test': self._generate_examples(7, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.RandomState(seed)
        for i in range(n):
            image = rng.randint(0, 256, (10 + i % 4, 12, 3)).astype(np.uint8)
            image[0, 0] = i                                   # the example's id, readable back
            yield i, {'image': image, 'label': i % 3}


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    TinyImages(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_tfds_source_reads_a_prepared_dataset(tiny_tfds):
    source = S.tfds_dataset('tiny_images', 'train', tiny_tfds)
    assert (source.num_examples, source.num_classes, source.class_names) == (30, 3, ('a', 'b', 'c'))
    assert [source.host_num_examples(h, 4) for h in range(4)] == [8, 8, 7, 7]
    ids = []
    for record in source.records(0, 1):
        image = pipeline.decode(record['image']).numpy()
        ids.append(int(image[0, 0, 0]))
        assert int(record['label']) == ids[-1] % 3 and image.shape == (10 + ids[-1] % 4, 12, 3)
    assert sorted(ids) == list(range(30))


def test_tfds_epoch_records_are_seeded_and_hosts_disjoint(tiny_tfds):
    source = S.tfds_dataset('tiny_images', 'train', tiny_tfds, shuffle_buffer=64)

    def ids(host, key):
        ds = source.epoch_records(host, 2, tf.constant(key, tf.int64))
        return [int(pipeline.decode(r['image'])[0, 0, 0]) for r in ds]

    first = ids(0, [1, 2])
    assert first == ids(0, [1, 2]) and first != ids(0, [1, 3])
    second = ids(1, [1, 2])
    assert len(first) == len(second) == 15 and sorted(first + second) == list(range(30))


def test_tfds_dataset_runs_through_the_pipeline(tiny_tfds):
    config = {'dataset': 'tiny_images', 'data_dir': tiny_tfds, 'image_size': 8,
              'eval_split': 'test', 'randaugment': '', 'reprob': 0.0}
    assert data.num_classes_of(config) == 3
    train = data.create_split(config, split='train', train=True, global_batch=8, seed=0)
    batch = next(train.iterator)
    assert batch['images'].shape == (8, 8, 8, 3) and batch['mask'].tolist() == [1.0] * 8
    test = data.create_split(config, split='test', train=False, global_batch=4, seed=0)
    batches = list(test.iterator)
    assert len(batches) == test.steps_per_epoch == 2
    mask = np.concatenate([b['mask'] for b in batches])
    labels = np.concatenate([b['labels'] for b in batches])[mask == 1]
    assert mask.tolist() == [1.0] * 7 + [0.0] and sorted(labels.tolist()) == sorted(
        i % 3 for i in range(7))
