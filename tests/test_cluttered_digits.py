"""The embedded cluttered digits: deterministic, shaped like digits, split like digits, really
a digit among fragments of other digits, and fed whole to the network by its config."""
import importlib.util
import pathlib

import numpy as np
import pytest

from ghostnetv2_jax import data
from ghostnetv2_jax.data import sources as S

SIZE = S.CLUTTERED_CANVAS
SIDE = 8 * S.CLUTTERED_UPSCALE
CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'cluttered_digits.py'


@pytest.fixture(scope='module', params=S.DIGITS_SPLITS)
def built(request):
    return request.param, S._cluttered_arrays(request.param)


def test_two_builds_are_byte_identical(built):
    split, first = built
    again = S._cluttered_arrays.__wrapped__(split)                   # recomputed, not cached
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_sources_are_uint8_rgb_canvases_with_digits_labels_and_classes():
    digits_split = {s: S.digits(s) for s in S.DIGITS_SPLITS}
    for split, copies in S.CLUTTERED_COPIES.items():
        source = S.open_source('cluttered_digits', split)
        n = digits_split[split].num_examples
        assert source.name == 'cluttered_digits' and source.split == split
        assert source.images.dtype == np.uint8
        assert source.images.shape == (copies * n, SIZE, SIZE, 3)
        assert (source.images[..., :1] == source.images).all()      # grey in all three channels
        assert source.class_names == tuple('0123456789') and source.num_classes == 10
        assert source.labels.dtype == np.int32
        np.testing.assert_array_equal(source.labels, np.tile(digits_split[split].labels, copies))
    assert S.parse_dataset('cluttered_digits') == ('cluttered_digits', '')
    assert data.num_classes_of({'dataset': 'cluttered_digits'}) == 10


def test_splits_use_disjoint_source_digits_for_digit_and_fragments():
    # fragments come from the example's own split, so checking where digits come from suffices
    _, _, splits = S._digits_arrays()
    for split in S.DIGITS_SPLITS:
        built = S._cluttered_arrays(split)
        assert sorted(set(built.source.tolist())) == sorted(splits[split].tolist())
    train, val = (set(S._cluttered_arrays(s).source.tolist()) for s in S.DIGITS_SPLITS)
    assert not train & val


def test_the_upscaled_source_digit_is_on_the_canvas_where_it_was_placed(built):
    _, arrays = built
    grey = S._digits_arrays()[0][..., 0]
    up = S.CLUTTERED_UPSCALE
    digit = grey.repeat(up, 1).repeat(up, 2)[arrays.source]                # (N, 16, 16)
    assert ((arrays.corner >= 0) & (arrays.corner <= SIZE - SIDE)).all()
    rows = arrays.corner[:, :1, None] + np.arange(SIDE)[None, :, None]      # (N, 16, 1)
    cols = arrays.corner[:, 1:, None] + np.arange(SIDE)[None, None, :]      # (N, 1, 16)
    window = arrays.images[np.arange(len(digit))[:, None, None], rows, cols]
    assert (window >= digit).all()                # every stroke there (fragments only add ink)
    assert (window == digit).mean() > 0.8         # and mostly nothing else
    # placements reach every row and column the digit fits in
    for axis in range(2):
        assert set(arrays.corner[:, axis].tolist()) == set(range(SIZE - SIDE + 1))


def test_distractor_fragments_add_ink_beyond_the_digit(built):
    _, arrays = built
    pixels = S.CLUTTERED_UPSCALE ** 2                                   # per source pixel
    digit_ink = (S._digits_arrays()[0][arrays.source, :, :, 0] > 0).sum((1, 2)) * pixels
    canvas_ink = (arrays.images > 0).sum((1, 2))
    assert (canvas_ink > digit_ink).all()
    # six 6-8 px fragments of strokes: clearly more ink outside the digit than a stray pixel
    assert np.median(canvas_ink - digit_ink) > 50


def test_unknown_split_is_the_same_clear_error_as_digits():
    with pytest.raises(S.DataError, match="splits.*'train', 'validation'") as err:
        S.open_source('cluttered_digits', 'test')
    with pytest.raises(S.DataError) as digits_err:
        S.digits('test')
    assert str(err.value) == str(digits_err.value).replace('digits', 'cluttered_digits', 1)


def test_the_config_trains_on_whole_unchanged_canvases():
    spec = importlib.util.spec_from_file_location('cluttered_config', CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config().data
    split = data.create_split(config, split='validation', train=True, global_batch=16, seed=0)
    batch = next(split.iterator)
    canvases = S._cluttered_arrays('validation').images.astype(np.float32)
    expected = (canvases / 255.0 - 0.5) / 0.5                        # the config's mean and std
    for image, label in zip(batch['images'], batch['labels']):
        assert (image[..., 0] == image[..., 2]).all()
        match = np.abs(expected - image[None, ..., 0]).max((1, 2)) < 1e-5
        assert match.any()                           # some canvas, uncropped and unflipped
        assert (S._cluttered_arrays('validation').labels[match] == label).all()
