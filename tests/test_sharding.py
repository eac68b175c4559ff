"""Data parallelism: 8 (fake CPU) devices compute what 1 device computes, BatchNorm included."""
import jax
import numpy as np
import pytest

from ghostnetv2_jax.train import sharding
from test_trainer import (TINY_RUN, TINY_RUN_STEPS, assert_ok, compile_cache, load_state,  # noqa: F401
                          run_training, tiny_run)

STEPS = TINY_RUN_STEPS


def test_eight_devices_equal_one_device(tmp_path, compile_cache, tiny_run):
    """Same config, same data: after a few steps params and BN statistics agree to fp32 rounding.

    BatchNorm computes batch statistics with a mean over the batch axis; with the batch sharded
    8 ways that mean is global under jit. Were it per device (4 images each), the normalised
    activations, hence the gradients and the running variances, would differ by far more than
    rounding (the check below on batch_stats would fail at the first step).
    """
    eight = tmp_path / 'eight'
    r8 = run_training(tmp_path, eight, *TINY_RUN, cache=compile_cache, devices=8)
    assert_ok(r8)
    assert 'on 8 devices' in r8.stdout
    a, b = load_state(tiny_run, STEPS), load_state(eight, STEPS)   # one device: the session's shared run
    for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats'):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a[name])[0], jax.tree.leaves(b[name])):
            np.testing.assert_allclose(y, x, rtol=2e-5, atol=2e-6, err_msg=f'{name}{jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('env, expected', [
    ({}, False),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),               # a single-host TPU VM
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'}, True),          # a pod slice
    ({'SLURM_NTASKS': '1'}, False),
    ({'SLURM_NTASKS': '8'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
])
def test_multihost_is_detected_from_the_cluster_environment(env, expected):
    assert sharding.multihost_requested('auto', env) is expected
    assert sharding.multihost_requested('no', env) is False
    assert sharding.multihost_requested('yes', env) is True


def test_bad_distributed_mode_and_indivisible_batch_are_clear_errors():
    with pytest.raises(ValueError, match="config.distributed must be 'auto', 'yes' or 'no'"):
        sharding.multihost_requested('maybe', {})
    n = jax.device_count()
    bad = n * 3 + 1 if n > 1 else 0
    with pytest.raises(ValueError, match=rf'batch_size={bad} must be a positive multiple of the device count \({n}\)'):
        sharding.check_batch(bad)


def test_host_batches_become_one_global_array_sharded_on_data():
    mesh = sharding.create_mesh()
    n = jax.device_count()
    batch = {'images': np.zeros((2 * n, 4, 4, 3), np.float32), 'labels': np.arange(2 * n, dtype=np.int32)}
    out = sharding.shard_batch(batch, mesh)
    assert out['images'].shape == (2 * n, 4, 4, 3)
    assert out['labels'].sharding.spec == jax.sharding.PartitionSpec('data')
    np.testing.assert_array_equal(np.asarray(out['labels']), batch['labels'])
