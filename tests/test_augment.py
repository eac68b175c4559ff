"""Augmentations: Pillow-exact pixel and affine ops, and for every random op its shape, dtype,
range, determinism given a key, dependence on the key, and equality eagerly vs in tf.data."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from ghostnetv2_jax.data import augment as A
from ghostnetv2_jax.data import native

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FILL = A.fill_from_mean(MEAN)
_rng = np.random.RandomState(0)
NOISE = _rng.randint(0, 256, (37, 45, 3)).astype(np.uint8)
DULL = (_rng.randint(0, 90, (37, 45, 3)) + 70).astype(np.uint8)   # for autocontrast/equalize
KEY = tf.constant([3, 7], tf.int64)
OTHER_KEYS = [tf.constant([11, k], tf.int64) for k in range(4)]


def _pil(array):
    return Image.fromarray(array)


def _solarize_add_pil(img, add, thresh=128):       # timm's solarize_add, as a Pillow LUT
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


# ----------------------------------------------------------------------------- Pillow exactness

PIXEL_CASES = [
    *[(f'color-{f}', lambda x, f=f: A.color(x, f), lambda p, f=f: ImageEnhance.Color(p).enhance(f))
      for f in (0.1, 0.55, 1.63)],
    *[(f'contrast-{f}', lambda x, f=f: A.contrast(x, f),
       lambda p, f=f: ImageEnhance.Contrast(p).enhance(f)) for f in (0.1, 0.55, 1.63)],
    *[(f'brightness-{f}', lambda x, f=f: A.brightness(x, f),
       lambda p, f=f: ImageEnhance.Brightness(p).enhance(f)) for f in (0.1, 0.55, 1.63)],
    *[(f'sharpness-{f}', lambda x, f=f: A.sharpness(x, f),
       lambda p, f=f: ImageEnhance.Sharpness(p).enhance(f)) for f in (0.1, 0.55, 1.63, 1.9)],
    ('autocontrast', A.autocontrast, ImageOps.autocontrast),
    ('equalize', A.equalize, ImageOps.equalize),
    ('invert', A.invert, ImageOps.invert),
    *[(f'posterize-{b}', lambda x, b=b: A.posterize(x, b), lambda p, b=b: ImageOps.posterize(p, b))
      for b in (1, 3, 4, 7)],
    *[(f'solarize-{t}', lambda x, t=t: A.solarize(x, t), lambda p, t=t: ImageOps.solarize(p, t))
      for t in (0, 77, 128, 256)],
    *[(f'solarize_add-{a}', lambda x, a=a: A.solarize_add(x, a),
       lambda p, a=a: _solarize_add_pil(p, a)) for a in (0, 49, 110)],
]


@pytest.mark.parametrize('image', [NOISE, DULL], ids=['noise', 'dull'])
@pytest.mark.parametrize('name,ours,pillow', PIXEL_CASES, ids=[c[0] for c in PIXEL_CASES])
def test_pixel_op_matches_pillow(name, ours, pillow, image):
    np.testing.assert_array_equal(ours(tf.constant(image)).numpy(), np.asarray(pillow(_pil(image))))


def _rotate_pil(p, deg, resample):
    return p.rotate(deg, resample=resample, fillcolor=FILL)


def _affine_pil(p, matrix, resample):
    return p.transform(p.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)


W, H = NOISE.shape[1], NOISE.shape[0]
AFFINE_CASES = [
    *[(f'rotate{d}', lambda x, m, d=d: A.rotate(x, d, FILL, m),
       lambda p, r, d=d: _rotate_pil(p, d, r)) for d in (17.3, -23.9, 29.99)],
    *[(f'shear_x{f}', lambda x, m, f=f: A.shear_x(x, f, FILL, m),
       lambda p, r, f=f: _affine_pil(p, (1, f, 0, 0, 1, 0), r)) for f in (0.27, -0.13)],
    *[(f'shear_y{f}', lambda x, m, f=f: A.shear_y(x, f, FILL, m),
       lambda p, r, f=f: _affine_pil(p, (1, 0, 0, f, 1, 0), r)) for f in (0.27, -0.13)],
    *[(f'translate_x{t}', lambda x, m, t=t: A.translate_x_rel(x, t, FILL, m),
       lambda p, r, t=t: _affine_pil(p, (1, 0, t * W, 0, 1, 0), r)) for t in (0.31, -0.4)],
    *[(f'translate_y{t}', lambda x, m, t=t: A.translate_y_rel(x, t, FILL, m),
       lambda p, r, t=t: _affine_pil(p, (1, 0, 0, 0, 1, t * H), r)) for t in (0.31, -0.4)],
]
RESAMPLE = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


@pytest.fixture(params=['native', 'tf'])
def impl(request, monkeypatch):
    """Each op as the pipeline runs it here (the native ops) and in its TensorFlow form (where
    no compiler is available)."""
    if request.param == 'tf':
        monkeypatch.setattr(native, 'available', lambda: False)
    return request.param


def test_the_native_pipeline_ops_build_and_load_here():
    assert native.available(), native.load_error()


@pytest.mark.parametrize('method', A.AFFINE_METHODS)
@pytest.mark.parametrize('name,ours,pillow', AFFINE_CASES, ids=[c[0] for c in AFFINE_CASES])
def test_affine_op_matches_pillow(name, ours, pillow, method, impl):
    expected = np.asarray(pillow(_pil(NOISE), RESAMPLE[method]))
    np.testing.assert_array_equal(ours(tf.constant(NOISE), method).numpy(), expected)


def test_affine_ops_match_pillow_on_a_photograph_sized_image():
    # 224x224 (the train crop), every geometric op at RandAugment's largest magnitudes
    image = np.random.RandomState(5).randint(0, 256, (224, 224, 3)).astype(np.uint8)
    for method in A.AFFINE_METHODS:
        for ours, pillow in [(lambda x: A.rotate(x, -30.0, FILL, method), lambda p: _rotate_pil(p, -30.0, RESAMPLE[method])),
                             (lambda x: A.shear_y(x, 0.3, FILL, method), lambda p: _affine_pil(p, (1, 0, 0, 0.3, 1, 0), RESAMPLE[method])),
                             (lambda x: A.translate_x_rel(x, -0.45, FILL, method),
                              lambda p: _affine_pil(p, (1, 0, -0.45 * 224, 0, 1, 0), RESAMPLE[method]))]:
            np.testing.assert_array_equal(ours(tf.constant(image)).numpy(), np.asarray(pillow(_pil(image))))


# (h, w) -> (h, w): up, down, one axis, both, and shrinking the height by more than twice as many
# pixels as the width, where Pillow 13 runs the vertical pass first
RESIZES = [((37, 45), (61, 29)), ((37, 45), (12, 17)), ((37, 45), (37, 90)), ((37, 45), (9, 45)),
           ((246, 165), (112, 204)), ((229, 218), (30, 124)), ((333, 500), (224, 224)),
           ((120, 90), (224, 224)), ((400, 37), (224, 224))]


@pytest.mark.parametrize('method', sorted(native.RESIZE_FILTERS))
def test_native_resize_is_pillows(method):
    rng = np.random.RandomState(3)
    for shape, size in RESIZES:
        image = rng.randint(0, 256, shape + (3,)).astype(np.uint8)
        ours = native.resize(tf.constant(image), size, method).numpy()
        ref = np.asarray(_pil(image).resize(size[::-1], getattr(Image, method.upper())))
        np.testing.assert_array_equal(ours, ref, err_msg=f'{method} {shape} -> {size}')


def test_resize_is_pillows_and_its_tensorflow_form_within_one_grey_level(impl):
    # the TF form runs the passes horizontal first, as Pillow does for these sizes
    for method in ('bilinear', 'bicubic'):
        for image, size in [(NOISE, (61, 29)), (NOISE, (12, 17))]:
            ours = A.resize(tf.constant(image), size, method).numpy().astype(int)
            ref = np.asarray(_pil(image).resize(size[::-1], RESAMPLE[method])).astype(int)
            assert np.abs(ours - ref).max() <= (0 if impl == 'native' else 1), (method, size)


# ----------------------------------------------------------------------------- random ops

def _rand_op_by_index(x, index, key):
    """RandAugment op ``index`` at magnitude 9 with timm's random resampling."""
    method = A.RandAugment(A.RandAugmentSpec.parse('rand-m9'), FILL).method(key)
    return A.apply_rand_op(x, index, tf.constant(9.0, tf.float64), key,
                           tf.constant(FILL, tf.uint8), method)


def _rand_op(name):
    index = tf.constant(A._RAND_OP_NAMES.index(name))
    return lambda x, key: _rand_op_by_index(x, index, key)


LOW = (np.zeros(3) - MEAN) / STD
HIGH = (np.ones(3) - MEAN) / STD
# name -> (fn(uint8 image, key), output kind, whether the output depends on the key)
RANDOM_OPS = {
    'random_resized_crop': (lambda x, key: A.resize(
        A.crop(x, A.random_resized_crop_window(tf.shape(x)[:2], key)), (24, 24), 'bicubic'),
        'uint8', True),
    'random_interpolation_resize': (lambda x, key: A.random_interpolation_resize(
        x, (24, 24), key), 'uint8', True),
    'hflip': (A.random_hflip, 'uint8', True),
    'randaugment': (A.RandAugment(A.RandAugmentSpec.parse('rand-m9-mstd0.5'), FILL), 'uint8', True),
    'color_jitter': (A.ColorJitter(), 'uint8', True),
    'random_erasing': (lambda x, key: A.RandomErasing(1.0)(A.normalize(x, MEAN, STD), key),
                       'erased', True),
    'train_transform': (A.TrainTransform(24, MEAN, STD, randaugment='rand-m9-mstd0.5', reprob=0.5),
                        'erased', True),
    'train_transform_jitter': (A.TrainTransform(24, MEAN, STD), 'normalized', True),
    **{f'rand_op_{n}': (_rand_op(n), 'uint8', n.startswith(('Rotate', 'Shear', 'Translate'))
                        or n.endswith('Increasing') and not n.startswith(('Posterize', 'Solarize')))
       for n in A._RAND_OP_NAMES},
}


@pytest.mark.parametrize('name', sorted(RANDOM_OPS))
def test_random_op_shape_dtype_range(name):
    fn, kind, _ = RANDOM_OPS[name]
    out = fn(tf.constant(NOISE), KEY).numpy()
    if kind == 'uint8':
        assert out.dtype == np.uint8 and out.shape[-1] == 3
        if not name.startswith(('random_resized_crop', 'random_interpolation')):
            assert out.shape == NOISE.shape
        return
    assert out.dtype == np.float32 and out.shape[-1] == 3 and np.isfinite(out).all()
    if kind == 'normalized':
        assert (out >= LOW - 1e-6).all() and (out <= HIGH + 1e-6).all()


@pytest.mark.parametrize('name', sorted(RANDOM_OPS))
def test_random_op_is_deterministic_given_the_key(name):
    fn, _, keyed = RANDOM_OPS[name]
    first = fn(tf.constant(NOISE), KEY).numpy()
    np.testing.assert_array_equal(fn(tf.constant(NOISE), KEY).numpy(), first)
    differs = [not np.array_equal(fn(tf.constant(NOISE), k).numpy(), first) for k in OTHER_KEYS]
    assert any(differs) == keyed


@pytest.mark.parametrize('name', sorted(n for n in RANDOM_OPS if not n.startswith('rand_op_')))
def test_random_op_agrees_eagerly_and_inside_tf_data(name):
    fn = RANDOM_OPS[name][0]
    keys = [KEY] + OTHER_KEYS[:3]
    ds = tf.data.Dataset.from_tensor_slices(tf.stack(keys)).map(lambda k: fn(tf.constant(NOISE), k))
    for key, graph in zip(keys, ds.as_numpy_iterator()):
        np.testing.assert_array_equal(graph, fn(tf.constant(NOISE), key).numpy())


def test_rand_ops_agree_eagerly_and_inside_tf_data():
    # one map over (op, key) pairs: a single call site keeps tf.data's graph set-up short
    names = A._RAND_OP_NAMES
    index = tf.constant([i for i in range(len(names)) for _ in range(2)])
    keys = tf.stack([k for _ in names for k in (KEY, OTHER_KEYS[0])])
    ds = tf.data.Dataset.from_tensor_slices((index, keys)).map(
        lambda i, k: _rand_op_by_index(tf.constant(NOISE), i, k))
    for i, k, graph in zip(index, keys, ds.as_numpy_iterator()):
        eager = RANDOM_OPS['rand_op_' + names[int(i)]][0](tf.constant(NOISE), k).numpy()
        np.testing.assert_array_equal(graph, eager, err_msg=names[int(i)])


# ----------------------------------------------------------------------------- semantics

def test_random_resized_crop_window_respects_scale_and_ratio():
    for k in range(40):
        top, left, h, w = [int(v) for v in A.random_resized_crop_window(
            tf.constant([300, 400]), tf.constant([5, k], tf.int64))]
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        # rounding to whole pixels moves area and ratio a little past the bounds
        assert 0.08 * 0.98 <= h * w / (300 * 400) <= 1.0
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02


def test_random_resized_crop_falls_back_to_the_clamped_centre_crop():
    # a full-area crop with ratio in [3/4, 4/3] never fits a 10x200 strip: timm's fallback
    # keeps the full height and the widest allowed ratio, centred
    window = A.random_resized_crop_window(tf.constant([10, 200]), KEY, scale=(1.0, 1.0))
    assert [int(v) for v in window] == [0, (200 - 13) // 2, 10, 13]


def test_random_erasing_replaces_one_box_of_the_allowed_area():
    image = np.random.RandomState(3).normal(size=(120, 160, 3)).astype(np.float32)
    assert np.array_equal(A.RandomErasing(0.0)(tf.constant(image), KEY).numpy(), image)
    for k in OTHER_KEYS:
        changed = A.RandomErasing(1.0)(tf.constant(image), k).numpy() != image
        rows, cols = np.flatnonzero(changed.any((1, 2))), np.flatnonzero(changed.any((0, 2)))
        assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one box
        area = len(rows) * len(cols) / (image.shape[0] * image.shape[1])
        assert 0.02 * 0.9 <= area <= 1 / 3 * 1.1      # whole-pixel rounding of the sides
        assert 0.3 * 0.9 <= len(rows) / len(cols) <= 1 / 0.3 * 1.1


def test_randaugment_spec_parses_timm_strings():
    spec = A.RandAugmentSpec.parse('rand-m9-mstd0.5')
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
    spec = A.RandAugmentSpec.parse('rand-m7-n3-p1.0-mstd101-mmax12-inc1')
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_max) == (7, 3, 1.0, 12)
    assert spec.magnitude_std == float('inf') and spec.increasing
    ra = A.RandAugment(spec)
    assert 'PosterizeIncreasing' in ra.op_names and 'Posterize' not in ra.op_names
    for bad in ('augmix-m5', 'rand-q3', 'rand-tweights'):
        with pytest.raises(ValueError):
            A.RandAugmentSpec.parse(bad)


def test_randaugment_fill_is_the_mean_in_grey_levels():
    assert A.fill_from_mean(MEAN) == (124, 116, 104)


def test_transform_options_are_validated():
    with pytest.raises(ValueError, match='interpolation'):
        A.TrainTransform(24, MEAN, STD, interpolation='cubic')
    with pytest.raises(ValueError, match='RandAugment'):
        A.TrainTransform(24, MEAN, STD, interpolation='lanczos', randaugment='rand-m9')
    with pytest.raises(ValueError, match='hue'):
        A.TrainTransform(24, MEAN, STD, color_jitter=(0.4, 0.4, 0.4, 0.1))
    with pytest.raises(ValueError, match='erasing mode'):
        A.TrainTransform(24, MEAN, STD, reprob=0.2, remode='noise')


# ----------------------------------------------------------------------------- eval transform

@pytest.mark.parametrize('shape,top,left', [((256, 320), 16, 48), ((320, 256), 48, 16)])
def test_eval_transform_geometry_is_exact(shape, top, left):
    # short side already 256 = floor(224 / 0.875): the resize is the identity, so the output
    # is exactly the centre crop, normalized
    image = np.random.RandomState(1).randint(0, 256, shape + (3,)).astype(np.uint8)
    out = A.EvalTransform(224, 0.875, 'bicubic', MEAN, STD)(tf.constant(image)).numpy()
    crop = image[top:top + 224, left:left + 224].astype(np.float32) / 255.0
    np.testing.assert_array_equal(out, (crop - np.float32(MEAN)) / np.float32(STD))


def test_eval_transform_follows_torchvision_resize_and_centre_crop():
    image = np.random.RandomState(2).randint(0, 256, (97, 131, 3)).astype(np.uint8)
    transform = A.EvalTransform(32, 0.875, 'bicubic', MEAN, STD)
    assert transform.resize_size == 36
    # torchvision Resize(36): 97x131 -> 36 x int(36 * 131 / 97) = 36x48; CenterCrop(32):
    # top = round(4 / 2) = 2, left = round(16 / 2) = 8
    ref = np.asarray(_pil(image).resize((48, 36), Image.BICUBIC))[2:34, 8:40]
    ref = (ref.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    out = transform(tf.constant(image)).numpy()
    assert out.shape == (32, 32, 3)
    assert np.abs(out - ref).max() <= 1.0 / 255.0 / min(STD) + 1e-6


def test_eval_transform_pads_with_black_when_crop_pct_exceeds_one():
    # resize 20 -> floor(32 / 1.25) = 25, then torchvision pads 3 before and 4 after
    image = np.full((20, 20, 3), 200, np.uint8)
    out = A.EvalTransform(32, 1.25, 'bilinear', MEAN, STD)(tf.constant(image)).numpy()
    black = (np.float32(0.0) - np.float32(MEAN)) / np.float32(STD)
    grey = (np.float32(200) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    expected = np.broadcast_to(black, (32, 32, 3)).copy()
    expected[3:28, 3:28] = grey
    np.testing.assert_array_equal(out, expected)
