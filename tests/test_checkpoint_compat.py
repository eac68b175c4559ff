"""A workdir written with the oldest pins (orbax-checkpoint 0.12.4, JAX 0.10.2: requirements.txt)
restores bit-exactly with whatever versions run the tests (make test-latest: the newest JAX line).

The fixture is a tiny run's workdir after one step (configs/tiny.py, --config.num_train_steps=1),
with the raw and EMA variables it held saved beside it as safetensors."""
import pathlib
import tarfile

import jax
import numpy as np
import pytest

from ghostnetv2_jax import weights

FIXTURE = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'workdir_orbax_0.12.4.tar.gz'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('compat')
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter='data')
    return root


@pytest.mark.parametrize('ema', [False, True])
def test_an_old_workdir_restores_bit_exactly(workdir, ema):
    got = weights.load(str(workdir), ema=ema)   # the trainer's restore rule, fingerprints checked
    want, meta = weights.load_variables(str(workdir / f'expected{"_ema" if ema else ""}.safetensors'))
    assert got.step == 1 and got.model_name == meta['model'] and got.overrides == meta['overrides']
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got_flat, want_flat = flat(got.variables), flat(want)
    assert got_flat.keys() == want_flat.keys()
    for key, value in want_flat.items():
        assert got_flat[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got_flat[key], value, err_msg=key)


def test_an_old_workdir_resumes_its_whole_train_state(workdir):
    """Optimizer state, EMA, step and RNG: every leaf against the fingerprint saved with it."""
    import ml_collections
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    from ghostnetv2_jax.train import state as state_lib
    checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
    try:
        meta = checkpoints.restore_meta(1)
        config = ml_collections.ConfigDict(meta['config'])
        model = state_lib.build_model(config, meta['num_classes'])
        state = checkpoints.restore(1, state_lib.abstract_state(config, model))
        ckpt_lib.verify(state, meta, 1)   # raises CheckpointDamagedError on any differing bit
    finally:
        checkpoints.close()
    assert int(state.step) == 1 and state.ema_params is not None
