"""Published weights by name, offline: a Hugging Face cache is built from a timm state_dict the test
saves itself, in huggingface_hub's own cache layout, and ``load_pretrained`` / ``--pretrained``
read it with ``HF_HUB_OFFLINE=1`` through ``hf_hub_download``'s real cache lookup (in a fresh
process, where huggingface_hub reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` at import). Without a cached
copy and without the Hub the error is one line saying where the file goes."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import rel_err
from ghostnetv2_jax import cli, hub, weights

REPO = pathlib.Path(__file__).resolve().parents[1]
NAME, HUB_ID = 'ghostnetv2_100', 'timm/ghostnetv2_100.in1k'
COMMIT = 'c0ffee' + '0' * 34   # any 40-hex commit hash


def hf_env(home, **extra) -> dict:
    """The environment of a fresh process whose huggingface_hub sees ``home`` (offline)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HF_', 'HUGGINGFACE_')) and k not in ('TRANSFORMERS_OFFLINE', 'XLA_FLAGS')}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''), **extra)
    return env


def run_cli(*args: str, home) -> subprocess.CompletedProcess:
    """``python -m ghostnetv2_jax ARGS`` in a fresh process whose huggingface_hub sees ``home`` (offline)."""
    return subprocess.run([sys.executable, '-m', 'ghostnetv2_jax', *args], env=hf_env(home), capture_output=True,
                          text=True, timeout=300, cwd=str(REPO))


def put_in_hub_cache(hub_cache: pathlib.Path, repo_id: str, filename: str, data: bytes) -> pathlib.Path:
    """Lay ``data`` into a huggingface_hub cache as a download of ``repo_id``'s ``filename`` at
    ``main`` leaves it: blobs/<sha256> (an LFS file's etag), snapshots/<commit>/<filename> linking to
    it, refs/main holding the commit."""
    repo = hub_cache / ('models--' + repo_id.replace('/', '--'))
    blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    pointer = repo / 'snapshots' / COMMIT / filename
    pointer.parent.mkdir(parents=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)
    return pointer


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A HF_HOME whose cache holds timm's ghostnetv2_100 (random weights, random BN statistics) as
    its published model.safetensors, and timm's logits of a random NCHW batch."""
    import timm
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp('published')
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / 'model.safetensors'))
    pointer = put_in_hub_cache(root / 'home' / 'hub', HUB_ID, hub.FILENAME, (root / 'model.safetensors').read_bytes())

    import huggingface_hub   # the layout is the library's: its scanner and its cache lookup find the file
    info = huggingface_hub.scan_cache_dir(root / 'home' / 'hub')
    assert not info.warnings and [r.repo_id for r in info.repos] == [HUB_ID]
    assert huggingface_hub.try_to_load_from_cache(HUB_ID, hub.FILENAME, cache_dir=root / 'home' / 'hub') == str(pointer)

    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    np.savez(root / 'batch.npz', images=images.transpose(0, 2, 3, 1), logits=logits)
    return root


LOAD = r'''
import json, sys
import jax, numpy as np
import ghostnetv2_jax
from ghostnetv2_jax import weights

batch = np.load(sys.argv[1])
O0 = {'xla_backend_optimization_level': 0}   # compiled for one call: LLVM -O0
model, variables = ghostnetv2_jax.load_pretrained('ghostnetv2_100')
logits = jax.jit(lambda v, x: model.apply(v, x), compiler_options=O0)(variables, batch['images'])
_, tagged = ghostnetv2_jax.load_pretrained('ghostnetv2_100.in1k')
tuned, fresh_head = ghostnetv2_jax.load_pretrained('ghostnetv2_100', num_classes=10, rng=1)
tuned_logits = jax.jit(lambda v, x: tuned.apply(v, x), compiler_options=O0)(fresh_head, batch['images'])
w = weights.load('pretrained:ghostnetv2_100', 'ghostnetv2_100')
flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
a, b, c = flat(variables), flat(tagged), flat(fresh_head)
np.savez(sys.argv[2], logits=np.asarray(logits), tuned_logits=np.asarray(tuned_logits),
         head_kernel=c["['params']['classifier']['kernel']"], head_bias=c["['params']['classifier']['bias']"],
         published_kernel=a["['params']['classifier']['kernel']"])
print(json.dumps({
    'tag_equal': sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a),
    'body_equal': all(np.array_equal(a[k], c[k]) for k in a if 'classifier' not in k),
    'keys_equal': sorted(a) == sorted(c),
    'num_classes': (model.num_classes, tuned.num_classes),
    'weights': [w.model_name, w.overrides, w.source, w.num_classes],
}))
'''


@pytest.fixture(scope='module')
def loaded(published):
    """What ``load_pretrained`` gives in a fresh process with HF_HUB_OFFLINE=1 and that cache."""
    out = published / 'loaded.npz'
    result = subprocess.run([sys.executable, '-c', LOAD, str(published / 'batch.npz'), str(out)],
                            env=hf_env(published / 'home'), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_load_pretrained_offline_matches_timm(published, loaded):
    summary, arrays = loaded
    assert summary['num_classes'] == [1000, 10]
    assert rel_err(arrays['logits'], np.load(published / 'batch.npz')['logits']) < 1e-5
    assert summary['weights'] == [NAME, {'num_classes': 1000}, 'pretrained:ghostnetv2_100.in1k', 1000]


def test_the_tag_names_the_same_weights(loaded):
    assert loaded[0]['tag_equal']


def test_another_class_count_gets_a_new_head_on_the_published_features(loaded):
    summary, arrays = loaded
    assert summary['keys_equal'] and summary['body_equal']
    kernel = arrays['head_kernel']
    assert kernel.shape == (1280, 10) and arrays['head_bias'].shape == (10,)
    assert not np.any(arrays['head_bias'])   # the model's own init: zero bias, LeCun-normal kernel
    assert 0.5 < kernel.std() * np.sqrt(1280) < 1.5
    assert not np.allclose(kernel, arrays['published_kernel'][:, :10])
    assert arrays['tuned_logits'].shape == (2, 10) and np.all(np.isfinite(arrays['tuned_logits']))


def test_convert_pretrained_on_the_command_line(published, tmp_path):
    dst = tmp_path / 'out' / 'v2.safetensors'
    result = run_cli('convert', '--pretrained', NAME, '--dst', str(dst), home=published / 'home')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f'wrote {dst}'
    written = weights.load(str(dst))
    direct = weights.load(str(published / 'model.safetensors'), NAME)   # the file read directly, as the error suggests
    assert (written.model_name, written.overrides) == (NAME, {'num_classes': 1000})
    got, want = (jax.tree_util.tree_leaves_with_path(w.variables) for w in (written, direct))
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))


@pytest.fixture
def in_process_cache(published, monkeypatch):
    """This process's huggingface_hub pointed at the cache (offline): its settings are module globals."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(published / 'home' / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return published


def test_init_from_and_a_teacher_take_published_weights(in_process_cache):
    """``config.init_from`` / ``distill.teacher_checkpoint`` = 'pretrained:NAME' (weights.load_into)."""
    from ghostnetv2_jax import create_model
    from ghostnetv2_jax.convert import ConversionError
    from ghostnetv2_jax.train.state import init_variables
    shapes = jax.eval_shape(lambda: init_variables(create_model(NAME, num_classes=10), jax.random.PRNGKey(0), 64))
    fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)
    fitted = weights.load_into('pretrained:ghostnetv2_100', NAME, {}, fresh)
    direct = weights.load(str(in_process_cache / 'model.safetensors'), NAME).variables
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
    got, want, new = flat(fitted), flat(direct), flat(fresh)
    assert sorted(got) == sorted(new)
    assert all(np.array_equal(got[k], new[k] if 'classifier' in k else want[k]) for k in got)
    with pytest.raises(ConversionError, match='classifier'):   # a teacher must have the student's classes
        weights.load_into('pretrained:ghostnetv2_100', NAME, {}, fresh, keep_fresh_head=False,
                          role='distill.teacher_checkpoint')


# ----------------------------------------------------------------------------- errors (no torch)
@pytest.mark.parametrize('name, says', [
    ('ghostnet_050', 'ghostnet_050 has no published weights'),
    ('resnet50', "'resnet50' is not a registered model"),
    ('ghostnetv2_100.in22k', "ghostnetv2_100's published weights are ghostnetv2_100.in1k"),
])
def test_a_name_without_published_weights_says_which_have_them(name, says):
    import ghostnetv2_jax
    with pytest.raises(ValueError) as e:
        ghostnetv2_jax.load_pretrained(name)
    assert says in str(e.value) and '\n' not in str(e.value)
    assert all(tag in str(e.value) for tag in hub.published())
    assert 'ghostnetv2_100.in1k' in hub.published() and 'ghostnet_050.in1k' not in hub.published()


def error_line(capsys, argv) -> tuple:
    """(exit status, stderr) of a command run in this process."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_no_network_and_no_cache_is_one_line_through_the_cli(tmp_path):
    pytest.importorskip('huggingface_hub')
    dst = tmp_path / 'out' / 'v2.safetensors'
    result = run_cli('convert', '--pretrained', NAME, '--dst', str(dst), home=tmp_path / 'empty_home')
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for says in (HUB_ID, hub.FILENAME, str(tmp_path / 'empty_home' / 'hub'), 'HF_HUB_OFFLINE',
                 f'--model {NAME}', 'hf download'):
        assert says in lines[0], (says, lines[0])
    assert not dst.parent.exists() and not result.stdout


def test_a_connection_error_is_the_same_line(monkeypatch):
    huggingface_hub = pytest.importorskip('huggingface_hub')
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        try:
            raise ConnectionError('[Errno 111] Connection refused')
        except ConnectionError as e:
            raise LocalEntryNotFoundError('An error happened while trying to locate the file on the Hub and we '
                                          'cannot find the requested files in the local cache.') from e
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', unreachable)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with pytest.raises(FileNotFoundError) as e:
        weights.load('pretrained:ghostnetv2_100')
    assert isinstance(e.value, hub.NotCached)
    assert 'no connection: [Errno 111] Connection refused' in str(e.value) and '\n' not in str(e.value)
    assert constants.HF_HUB_CACHE in str(e.value)


def test_without_huggingface_hub_one_line_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)   # import fails
    code, err = error_line(capsys, ['convert', '--pretrained', NAME, '--dst', str(tmp_path / 'x.safetensors')])
    assert code == 1 and err.strip().splitlines() == [err.strip()]
    assert 'pip install huggingface_hub' in err and 'Error' not in err
    assert not (tmp_path / 'x.safetensors').exists()


@pytest.mark.parametrize('argv, says', [
    (['convert', '--pretrained', 'resnet50', '--dst', 'x.safetensors'], 'published weights: ghostnet_100.in1k'),
    (['convert', '--pretrained', NAME, '--src', 'a.safetensors', '--dst', 'x.safetensors'], 'not allowed with'),
    (['convert', '--dst', 'x.safetensors'], 'one of the arguments --src --pretrained is required'),
    (['evaluate', '--pretrained', NAME, '--ema'], '--ema'),
    (['predict', '--pretrained', NAME, '--step', 'best', 'cat.jpg'], '--step'),
    (['export', '--pretrained', NAME, '--model', 'ghostnetv2_130', '--dst', 'x.pth'], 'not ghostnetv2_130'),
])
def test_pretrained_usage_errors(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = error_line(capsys, argv)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_a_recipe_with_a_wrong_published_name_fails_before_training():
    from ghostnetv2_jax.cli.config import load_config
    from ghostnetv2_jax.train import trainer
    config = load_config(str(REPO / 'configs' / 'default.py'), ['--config.init_from=pretrained:ghostnetv2_130'])
    with pytest.raises(ValueError, match='config.init_from: pretrained:ghostnetv2_130 holds ghostnetv2_130 weights'):
        trainer.validate_config(config)
    config.init_from, config.distill.teacher = '', 'ghostnetv2_160'
    config.distill.teacher_checkpoint = 'pretrained:ghostnet_130'
    with pytest.raises(ValueError, match='config.distill.teacher_checkpoint: ghostnet_130 has no published weights'):
        trainer.validate_config(config)
    with pytest.raises(ValueError, match="written 'pretrained:ghostnetv2_100'"):
        weights.load_into('ghostnetv2_100', NAME, {}, {})
