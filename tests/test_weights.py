"""The one owner of weights: a trained run's weights leave its workdir through the commands,
timm loads them strictly with the same logits, and a new run starts from them."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from conftest import randomized_variables, rel_err
from ghostnetv2_jax import create_model, weights
from ghostnetv2_jax.convert import ConversionError
from test_trainer import REPO, TINY, compile_cache, load_state, run_training, train_env  # noqa: F401

TINY_CFGS = (((3, 32, 24, 0.25, 2),),)
# The tiny recipe with attention where timm's V2 puts it (blocks after the second), so that timm
# can build the same network; two steps, one evaluation.
TIMM_SHAPED = ('--config.model_overrides.attention_blocks=None', '--config.num_train_steps=2')


def cli(*args, cache: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'ghostnetv2_jax', *args], env=train_env(cache), capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO))


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope='module')
def trained(tmp_path_factory, compile_cache):
    """A workdir of the tiny recipe trained two steps, with an EMA."""
    root = tmp_path_factory.mktemp('trained')
    ok(run_training(root, root / 'run', *TIMM_SHAPED, cache=compile_cache))
    return root / 'run'


def test_a_workdir_exports_to_a_pth_timm_loads_strictly_with_the_same_logits(trained, tmp_path, compile_cache):
    dst = tmp_path / 'model.pth'
    assert f'wrote {dst}' in ok(cli('export', '--src', str(trained), '--step', 'best', '--ema', '--dst', str(dst),
                                    cache=compile_cache))
    sd = torch.load(dst, weights_only=True)
    reference = timm.models.ghostnet.GhostNet(cfgs=[list(map(list, s)) for s in TINY_CFGS], num_classes=10,
                                              version='v2').eval()
    reference.load_state_dict(sd, strict=True)

    # what evaluate runs: the workdir's EMA weights at its best step, in the model they belong to
    w = weights.load(str(trained), step='best', ema=True)
    assert w.step == 2 and w.num_classes == 10
    images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    ours = jax.jit(w.model().apply)(w.variables, jnp.asarray(images))
    with torch.no_grad():
        theirs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert rel_err(ours, theirs) <= 1e-5
    # the EMA copy, not the raw weights
    raw = weights.load(str(trained), step='best')
    assert not np.array_equal(jax.tree.leaves(raw.variables)[0], jax.tree.leaves(w.variables)[0])


def test_a_workdir_exports_to_safetensors_that_a_new_run_starts_from(trained, tmp_path, compile_cache):
    """Through an exported file, and from the workdir itself (init_from_step / init_from_ema). The
    export through the command's main in this process (the .pth export above goes through python -m)."""
    from ghostnetv2_jax.cli import main
    dst = tmp_path / 'model.safetensors'
    assert main(['export', '--src', str(trained), '--ema', '--dst', str(dst)]) == 0
    source = weights.load(str(trained), ema=True).variables['params']
    for name, start in (('file', [f'--config.init_from={dst}']),
                        ('workdir', [f'--config.init_from={trained}', '--config.init_from_step=best',
                                     '--config.init_from_ema=True'])):
        # lr 0: the new run's weights after its step are the ones it started from
        out = ok(run_training(tmp_path, tmp_path / name, *TIMM_SHAPED, *start, '--config.learning_rate=0.0',
                              '--config.num_train_steps=1', cache=compile_cache))
        assert f'initialised from {start[0].split("=", 1)[1]}' in out
        started = load_state(tmp_path / name, 1)['params']
        for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(source)):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_convert_reads_a_workdir_into_a_variables_file(trained, tmp_path, compile_cache):
    ok(cli('convert', '--src', str(trained), '--step', '2', '--dst', str(tmp_path), cache=compile_cache))
    variables, meta = weights.load_variables(str(tmp_path / 'ghostnetv2_100.safetensors'))
    assert meta['model'] == 'ghostnetv2_100' and meta['overrides']['num_classes'] == 10
    assert meta['overrides']['cfgs'] == TINY_CFGS
    want = weights.load(str(trained), step='2').variables
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_workdir_errors_are_one_line(trained, tmp_path, compile_cache):
    for args, message in ((('--step', '7'), 'has no checkpoint at step 7'),
                          (('--step', 'newest'), "step must be 'latest', 'best' or a step number")):
        result = cli('export', '--src', str(trained), *args, '--dst', str(tmp_path / 'x.pth'), cache=compile_cache)
        errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
        assert result.returncode != 0 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert 'Traceback' not in result.stderr and not (tmp_path / 'x.pth').exists()


def test_every_source_gives_the_same_weights(tmp_path):
    """A timm .pth, the same as a timm .safetensors and as a converted variables file: one
    reader, one answer; the model name is checked where the file names one."""
    model = create_model('ghostnet_050', num_classes=7)
    variables = jax.device_get(randomized_variables(model, jnp.zeros((1, 32, 32, 3)), seed=3))
    w = weights.Weights('ghostnet_050', {'num_classes': 7}, variables, 'memory')
    weights.save_state_dict(str(tmp_path / 'a.pth'), w)
    weights.save_state_dict(str(tmp_path / 'a.safetensors'), w)
    weights.save_variables(str(tmp_path / 'v.safetensors'), variables, 'ghostnet_050', {'num_classes': 7})
    for source, name in (('a.pth', 'ghostnet_050'), ('a.safetensors', 'ghostnet_050'), ('v.safetensors', None)):
        got = weights.load(str(tmp_path / source), name)
        assert got.model_name == 'ghostnet_050' and got.num_classes == 7, source
        for a, b in zip(jax.tree.leaves(got.variables), jax.tree.leaves(variables)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ConversionError, match='holds ghostnet_050 weights, not ghostnetv2_100'):
        weights.load(str(tmp_path / 'v.safetensors'), 'ghostnetv2_100')
    with pytest.raises(ConversionError, match='model name'):
        weights.load(str(tmp_path / 'a.pth'))
    with pytest.raises(ValueError, match='not a training workdir'):
        weights.load(str(tmp_path / 'v.safetensors'), step='best')
    with pytest.raises(FileNotFoundError, match='no such checkpoint'):
        weights.load(str(tmp_path / 'missing.pth'), 'ghostnet_050')
