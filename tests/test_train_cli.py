"""The command lines: bad input gives one clear line and a non-zero exit; evaluate and fine-tune
from converted weights (the training run from a weights file: tests/test_weights.py)."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_trainer import REPO, TINY, assert_ok, compile_cache, load_tiny, train_env  # noqa: F401


def cli(*args, cache=None, timeout=300) -> subprocess.CompletedProcess:
    env = train_env(cache or '/nonexistent-cache')
    if cache is None:
        env.pop('JAX_COMPILATION_CACHE_DIR')
    return subprocess.run([sys.executable, '-m', 'ghostnetv2_jax', *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize('override, message', [
    ('--config.no_such_field=3', 'error: unknown config field --config.no_such_field'),
    ('--config.data.no_such_field=3', 'error: unknown config field --config.data.no_such_field'),
    ('--config.learing_rate=0.1', 'error: unknown config field --config.learing_rate (did you mean learning_rate?)'),
    ('--config.learning_rate=fast', "could not convert string to float: 'fast'"),
])
def test_bad_config_overrides_name_the_field(tmp_path, override, message):
    result = cli('train', f'--config={TINY}', f'--workdir={tmp_path / "run"}', override)
    assert message in error_line(result)
    assert not (tmp_path / 'run').exists()


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = cli('train', f'--config={tmp_path / "nope.py"}', f'--workdir={tmp_path / "run"}')
    assert 'No such file or directory' in error_line(result)


def test_missing_dataset_is_a_clear_error_and_touches_nothing(tmp_path):
    result = cli('train', f'--config={TINY}', f'--workdir={tmp_path / "run"}', '--config.data.dataset=no_such_data')
    assert result.returncode == 1
    assert "unknown dataset 'no_such_data'" in error_line(result)
    assert not (tmp_path / 'run').exists()


def _tiny_variables(num_classes: int = 10):
    from ghostnetv2_jax.train import trainer
    from ghostnetv2_jax.train.state import init_variables
    config = load_tiny()
    model = trainer.build_model(config, num_classes)
    return config, jax.device_get(trainer._run_once(lambda r: init_variables(model, r, 16), jax.random.PRNGKey(3)))


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A converted-weights file (weights.save_variables) of the tiny model with 10 classes."""
    from ghostnetv2_jax import weights
    from ghostnetv2_jax.train.trainer import architecture_overrides
    config, variables = _tiny_variables()
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    weights.save_variables(str(path), variables, config.model, {**architecture_overrides(config), 'num_classes': 10})
    return path, variables


def test_evaluate_converted_weights_with_eval_preprocessing(tmp_path, converted, compile_cache):
    path, _ = converted
    result = cli('evaluate', f'--checkpoint={path}', '--dataset=digits', '--image_size=16', '--crop_pct=1.0',
                 '--interpolation=bilinear', '--batch_size=64', f'--json={tmp_path / "r.json"}', cache=compile_cache)
    assert_ok(result)
    assert 'top-1' in result.stdout and 'top-5' in result.stdout
    got = json.loads((tmp_path / 'r.json').read_text())
    assert got['count'] == 359 and got['model'] == 'ghostnetv2_100' and got['image_size'] == 16
    assert 0 <= got['top1'] <= got['top5'] <= 100


def test_evaluate_bad_input_is_a_clear_error(tmp_path):
    assert 'no such checkpoint' in error_line(cli('evaluate', f'--checkpoint={tmp_path / "x.pth"}'))
    pth = tmp_path / 'w.pth'
    pth.write_bytes(b'not a checkpoint')
    assert '--model is required' in error_line(cli('evaluate', f'--checkpoint={pth}'))
    (tmp_path / 'empty').mkdir()
    assert 'holds no checkpoints' in error_line(cli('evaluate', f'--checkpoint={tmp_path / "empty"}'))


def test_fine_tune_replaces_the_head_and_loads_the_rest_strictly(converted):
    """init_from with another class count: a fresh classifier, every other leaf as saved."""
    from ghostnetv2_jax.convert import ConversionError
    from ghostnetv2_jax.weights import load_into
    from ghostnetv2_jax.train.trainer import architecture_overrides
    path, saved = converted
    config, fresh = _tiny_variables(num_classes=4)
    loaded = load_into(str(path), config.model, architecture_overrides(config), fresh)
    np.testing.assert_array_equal(loaded['params']['classifier']['kernel'], fresh['params']['classifier']['kernel'])
    body = lambda v: {k: x for k, x in v['params'].items() if k != 'classifier'}
    for a, b in zip(jax.tree.leaves(body(loaded)), jax.tree.leaves(body(saved))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(loaded['batch_stats']), jax.tree.leaves(saved['batch_stats'])):
        np.testing.assert_array_equal(a, b)

    other = load_tiny()
    other.model_overrides.cfgs = other.model_overrides.cfgs + (((3, 48, 24, 0, 1),),)   # one block more
    from ghostnetv2_jax.train import trainer
    from ghostnetv2_jax.train.state import init_variables
    model = trainer.build_model(other, 10)
    bigger = jax.device_get(trainer._run_once(lambda r: init_variables(model, r, 16), jax.random.PRNGKey(0)))
    with pytest.raises(ConversionError, match=r'does not fit ghostnetv2_100: missing .*blocks_1_0'):
        load_into(str(path), other.model, architecture_overrides(other), bigger)
    with pytest.raises(ConversionError, match='no such checkpoint file'):
        load_into(str(path) + '.missing', config.model, architecture_overrides(config), fresh)


# A training run started from a weights file (config.init_from) through the command line:
# tests/test_weights.py (from an exported file and from a workdir); every file kind init_from
# takes, a converted-weights file like the one above included, goes through weights.load_into,
# checked above and in test_weights.test_every_source_gives_the_same_weights.
