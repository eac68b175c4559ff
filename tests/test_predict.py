"""``python -m ghostnetv2_jax predict``: top-K names and probabilities of real photographs (scikit-learn's
sample images) from converted weights and from a workdir, eval preprocessing equal to timm's, the
shipped ImageNet-1k class names, and one error line per unreadable image or bad checkpoint."""
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import randomized_variables
from ghostnetv2_jax import classify
from ghostnetv2_jax.cli import main as cli
from ghostnetv2_jax.weights import save_variables
from ghostnetv2_jax.models.registry import create_model
from test_trainer import REPO, load_tiny

MODEL = 'ghostnet_050'
LINE = re.compile(r'^  (\d+)\. (.+)  \((\d+\.\d\d)%\)$')


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """china.jpg and flower.jpg (427x640 RGB), and x.jpg, a text file."""
    sklearn_datasets = pytest.importorskip('sklearn.datasets')
    root = tmp_path_factory.mktemp('photos')
    data = sklearn_datasets.load_sample_images()
    paths = {}
    for name, pixels in zip(data.filenames, data.images):
        stem = name.rsplit('/', 1)[-1].rsplit('.', 1)[0]
        paths[stem] = str(root / f'{stem}.jpg')
        Image.fromarray(pixels).save(paths[stem], quality=95)
    paths['bad'] = str(root / 'x.jpg')
    (root / 'x.jpg').write_text('not an image\n')
    return paths


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A converted-weights file of ghostnet_050 with 1000 classes and random weights and BN
    statistics; (path, model, variables)."""
    model = create_model(MODEL, num_classes=1000)
    variables = jax.device_get(randomized_variables(model, jnp.zeros((1, 64, 64, 3)), seed=1))
    path = str(tmp_path_factory.mktemp('weights') / f'{MODEL}.safetensors')
    save_variables(path, variables, MODEL, {'num_classes': 1000})
    return path, model, variables


def _blocks(stdout: str):
    """{path: [(rank, name, percent)]} from the text output."""
    out, current = {}, None
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            out[current].append((int(m.group(1)), m.group(2), float(m.group(3))))
        else:
            current = line
            out[current] = []
    return out


def _errors(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_shipped_imagenet_class_names():
    names = classify.imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000 and all(n.strip() == n and n for n in names)
    assert names[0] == 'tench, Tinca tinca' and names[207] == 'golden retriever'
    assert names[134] == 'crane (bird)' and names[517] == 'crane (machine)'
    synsets = classify._data_lines('imagenet_synsets.txt')
    assert len(synsets) == 1000 and list(synsets) == sorted(set(synsets))   # tfds' label order
    assert classify.readable_names(['n01440764', 'n02099601', 'cat']) == ('tench, Tinca tinca',
                                                                         'golden retriever', 'cat')


def test_class_names_are_timms_lemmas():
    """The file is timm's ImageNet-1k descriptions, the two 'crane' lemmas told apart."""
    imagenet_info = pytest.importorskip('timm.data.imagenet_info')
    info = imagenet_info.ImageNetInfo('imagenet-1k')
    assert list(classify._data_lines('imagenet_synsets.txt')) == list(info.label_names())
    lemmas = info.label_descriptions()
    assert [n.replace(' (bird)', '').replace(' (machine)', '') for n in classify.imagenet_class_names()] == lemmas


def test_class_names_of_a_checkpoint_without_a_dataset():
    assert classify.class_names(1000) == classify.imagenet_class_names()
    assert classify.class_names(3) == ('class 0', 'class 1', 'class 2')


def test_preprocess_equals_timms_eval_transform(photos, tmp_path):
    """Pillow + numpy against torchvision's Resize / CenterCrop / ToTensor / Normalize (timm's eval
    chain), for RGB, grey and RGBA files, and a crop larger than the resized image (zero padding)."""
    transforms = pytest.importorskip('torchvision.transforms')
    rgb = Image.open(photos['china'])
    rgb.convert('L').save(tmp_path / 'grey.png')
    rgb.convert('RGBA').resize((150, 100)).save(tmp_path / 'rgba.png')
    cases = [(photos['china'], classify.eval_preprocessing(MODEL)),
             (str(tmp_path / 'grey.png'), classify.eval_preprocessing(MODEL)),
             (str(tmp_path / 'rgba.png'), dict(classify.eval_preprocessing(MODEL), image_size=64, crop_pct=1.25,
                                               interpolation='bilinear'))]
    for path, cfg in cases:
        mode = getattr(transforms.InterpolationMode, cfg['interpolation'].upper())
        reference = transforms.Compose([transforms.Resize(int(cfg['image_size'] / cfg['crop_pct']), mode),
                                        transforms.CenterCrop(cfg['image_size']), transforms.ToTensor(),
                                        transforms.Normalize(cfg['mean'], cfg['std'])])
        want = reference(Image.open(path).convert('RGB')).numpy().transpose(1, 2, 0)
        got = classify.preprocess(path, cfg)
        assert got.dtype == np.float32 and got.shape == (cfg['image_size'], cfg['image_size'], 3)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)


def test_top_k_orders_by_probability_then_index():
    probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]], np.float32)
    index, p = classify.top_k(probs, 3)
    assert index.tolist() == [[1, 3, 0], [0, 1, 2]]
    np.testing.assert_array_equal(p, np.float32([[0.4, 0.4, 0.1], [0.7, 0.1, 0.1]]))
    assert classify.top_k(probs, 10)[0].shape == (2, 4)


def test_cli_prints_top5_and_goes_on_past_an_unreadable_image(photos, weights):
    """Through ``python -m ghostnetv2_jax``: a block per readable image, one error line naming the
    text file, exit status 1; and converted weights need no TensorFlow (-X importtime lists it)."""
    result = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'ghostnetv2_jax', 'predict',
                             '--checkpoint', weights[0], photos['china'], photos['bad'], photos['flower']],
                            capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert result.returncode == 1, result.stderr[-3000:]
    assert _errors(result.stderr) == [f"error: {photos['bad']}: not an image file Pillow can read"]
    assert 'Traceback' not in result.stderr
    assert not [line for line in result.stderr.splitlines() if re.search(r'\|\s+tensorflow$', line)]
    blocks = _blocks(result.stdout)
    assert list(blocks) == [photos['china'], photos['flower']]
    names = set(classify.imagenet_class_names())
    for lines in blocks.values():
        assert [rank for rank, _, _ in lines] == [1, 2, 3, 4, 5]
        assert all(name in names for _, name, _ in lines)
        percents = [p for _, _, p in lines]
        assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.01


def test_probabilities_are_softmax_of_model_apply(photos, weights, capsys):
    path, model, variables = weights
    images = [photos['china'], photos['flower']]
    assert cli(['predict', '--checkpoint', path, '--json', '--top', '7', '--batch-size', '1', *images]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cfg = classify.eval_preprocessing(MODEL)
    x = np.stack([classify.preprocess(p, cfg) for p in images])
    probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, x), axis=-1))
    names = classify.imagenet_class_names()
    for result, image, row in zip(results, images, probs):
        assert result['image'] == image and len(result['top']) == 7
        want = np.argsort(-row, kind='stable')[:7]
        assert [t['class'] for t in result['top']] == want.tolist()
        assert [t['name'] for t in result['top']] == [names[c] for c in want]
        np.testing.assert_allclose([t['prob'] for t in result['top']], row[want], atol=1e-4)


@pytest.mark.parametrize('make, args, message', [
    (lambda d: (d / 'w.safetensors').write_text('not weights'), [], 'cannot read'),
    (lambda d: None, [], 'no such checkpoint'),
    (lambda d: (d / 'w.safetensors').write_text('x'), ['--top', '0'], '--top must be at least 1'),
    (lambda d: (d / 'w.safetensors').write_text('x'), ['--model', 'ghostnet_999'], "unknown model 'ghostnet_999'"),
])
def test_bad_checkpoint_or_flags_are_one_line(tmp_path, photos, capsys, make, args, message):
    make(tmp_path)
    code = cli(['predict', '--checkpoint', str(tmp_path / 'w.safetensors'), *args, photos['china']])
    err = capsys.readouterr()
    assert code == (2 if args else 1) and err.out == ''   # a usage error, or a checkpoint that fails
    lines = _errors(err.err)
    assert len(lines) == 1 and message in lines[0] and err.err.strip() == lines[0], err.err


def test_workdir_uses_its_preprocessing_and_dataset_class_names(tmp_path, photos, capsys):
    """A workdir's checkpoint of the tiny model trained on the digits: 16 px bilinear inputs and
    the digits' names '0'..'9'."""
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    from ghostnetv2_jax.train import optim, trainer
    from ghostnetv2_jax.train.state import create_state, init_variables
    config = load_tiny()
    model = trainer.build_model(config, 10)
    variables = jax.device_get(randomized_variables(model, jnp.zeros((1, 16, 16, 3)), seed=2))
    state = create_state(variables, optim.create_optimizer(config, lambda count: 0.0), jax.random.PRNGKey(0),
                         use_ema=True)
    checkpoints = ckpt_lib.Checkpoints(tmp_path, best_metric=None)
    checkpoints.save(1, state, {**trainer.identity(config, 10), 'step': 1, 'data_step': 1, 'epoch': 0.0,
                                'config': json.loads(config.to_json_best_effort())})
    checkpoints.wait()
    checkpoints.close()

    classifier = classify.load_classifier(str(tmp_path), ema=True)
    assert classifier.class_names == tuple(str(d) for d in range(10))
    assert classifier.preprocessing['image_size'] == 16 and classifier.preprocessing['interpolation'] == 'bilinear'
    assert cli(['predict', '--checkpoint', str(tmp_path), '--top', '3', photos['china']]) == 0
    lines = _blocks(capsys.readouterr().out)[photos['china']]
    assert [rank for rank, _, _ in lines] == [1, 2, 3] and all(name in '0123456789' for _, name, _ in lines)
