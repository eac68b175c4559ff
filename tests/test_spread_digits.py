"""The generated spread digits: one digit over most of the canvas among large fragments of other
digits, new canvases every training epoch and fixed validation canvases, digits split like the
embedded digits, and a config whose network gives DFC real extent to pool in every attention block."""
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ghostnetv2_jax import data
from ghostnetv2_jax.data import sources as S
from ghostnetv2_jax.data._tf import tf
from ghostnetv2_jax.layers.attention import DFCAttention

SIDE, DIGIT = S.SPREAD_CANVAS, 8 * S.SPREAD_UPSCALE
CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'spread_digits.py'


def _records(dataset, count):
    return list(dataset.take(count).as_numpy_iterator())


def _load(split, records):
    source = S.spread_digits(split)
    return np.stack([source.load({k: tf.constant(v) for k, v in r.items()})['image'].numpy() for r in records])


def _config():
    spec = importlib.util.spec_from_file_location('spread_digits_config', CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_validation_canvases_are_fixed_uint8_rgb_with_the_digits_labels():
    source = S.open_source('spread_digits', 'validation')
    assert source.num_examples == S.SPREAD_EXAMPLES['validation'] >= 2000   # one example <= 0.05 points
    assert source.num_classes == 10 and source.class_names == tuple(map(str, range(10)))
    first, again = _records(source.records(0, 1), 32), _records(source.records(0, 1), 32)
    images = _load('validation', first)
    assert images.shape == (32, SIDE, SIDE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, _load('validation', again))
    assert (images[..., 0] == images[..., 2]).all()
    _, labels = S._digit_bank('validation')
    assert all(r['label'] == labels[r['digit']] for r in first)
    everything = np.array([r['label'] for r in source.records(0, 1).as_numpy_iterator()])
    assert len(everything) == source.num_examples and np.bincount(everything, minlength=10).min() > 300


def test_the_digit_lies_whole_on_the_canvas_among_fragments_of_others():
    source = S.spread_digits('validation')
    bank, _ = S._digit_bank('validation')
    records = _records(source.records(0, 1), 16)
    for record, image in zip(records, _load('validation', records)):
        grey = image[..., 0].astype(int)
        digit = bank[record['digit']]
        places = [(r, c) for r in range(SIDE - DIGIT + 1) for c in range(SIDE - DIGIT + 1)
                  if (grey[r:r + DIGIT, c:c + DIGIT] >= digit).all()]
        assert places                                 # painted last: all its ink is there
        r, c = places[0]
        outside = grey.copy()
        outside[r:r + DIGIT, c:c + DIGIT] = 0
        assert outside.any() or (grey[r:r + DIGIT, c:c + DIGIT] > digit).any()   # and clutter


def test_every_epoch_draws_new_canvases_from_its_key_and_the_splits_keep_their_digits():
    source = S.spread_digits('train')
    key = lambda epoch: tf.constant([0, epoch], tf.int64)
    a, a_again, b = (_records(source.epoch_records(0, 1, key(e)), 16) for e in (1, 1, 2))
    images_a, images_b = _load('train', a), _load('train', b)
    np.testing.assert_array_equal(images_a, _load('train', a_again))
    assert (images_a != images_b).any(axis=(1, 2, 3)).all()
    assert len(_records(source.epoch_records(0, 2, key(1)), 10 ** 6)) == source.num_examples // 2
    digits_images, _, splits = S._digits_arrays()
    for split in S.DIGITS_SPLITS:
        bank, _ = S._digit_bank(split)
        np.testing.assert_array_equal(bank[:, ::S.SPREAD_UPSCALE, ::S.SPREAD_UPSCALE],
                                      digits_images[splits[split], :, :, 0])


def test_unknown_split_is_a_clear_error():
    with pytest.raises(S.DataError, match="spread_digits has splits"):
        S.open_source('spread_digits', 'test')


def test_the_config_trains_on_whole_canvases_with_dfc_pooling_3x3_or_more_everywhere():
    config = _config()
    split = data.create_split(config.data, split='validation', train=True, global_batch=8, seed=0)
    batch = next(split.iterator)
    assert batch['images'].shape == (8, SIDE, SIDE, 3)
    assert (batch['images'][..., 0] == batch['images'][..., 2]).all()
    levels = (batch['images'] * 0.5 + 0.5) * 255                       # the config's mean and std
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)   # unresized grey levels
    from ghostnetv2_jax.train.trainer import build_model
    model = build_model(config, 10)
    pooled = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, DFCAttention) and context.method_name == '__call__':
            pooled.append(tuple(s // 2 for s in args[0].shape[1:3]))
        return next_fun(*args, **kwargs)
    with nn.intercept_methods(spy):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, SIDE, SIDE, 3)))
    assert len(pooled) == 9 and min(min(p) for p in pooled) >= 3, pooled
