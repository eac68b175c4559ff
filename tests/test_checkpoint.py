"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, retention, workdir identity."""
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_trainer import (assert_ok, committed_steps, compile_cache, load_meta, load_state, load_tiny,  # noqa: F401
                          run_training, start_training, wait_for)

K = 3   # steps before the kill; the straight run does 2K


def batch_log(path: pathlib.Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, compile_cache):
    common = (f'--config.num_train_steps={2 * K}', f'--config.checkpoint_every_steps={K}')
    straight_log, resumed_log = tmp_path / 'straight.log', tmp_path / 'resumed.log'
    assert_ok(run_training(tmp_path, tmp_path / 'straight', *common, cache=compile_cache, TRAIN_LOG=straight_log))

    # Killed: from batch K on the input stalls, so the run sits right after its step-K checkpoint.
    workdir = tmp_path / 'resumed'
    proc = start_training(tmp_path, workdir, *common, cache=compile_cache, TRAIN_LOG=resumed_log,
                          SLOW_AFTER=K, SLOW_SECONDS=600, SLOW_MARK=tmp_path / 'stalled')
    try:
        wait_for(lambda: committed_steps(workdir) == [K], proc, what=f'the step-{K} checkpoint')
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [line.split()[0] for line in batch_log(resumed_log)] == [str(i) for i in range(K)]

    result = run_training(tmp_path, workdir, *common, cache=compile_cache, TRAIN_LOG=resumed_log)
    assert_ok(result)
    assert f'resumed from {workdir / "checkpoints"}/{K} (step {K})' in result.stdout

    # Same data, in the same order: the resumed run read batches K..2K-1 and nothing twice.
    assert batch_log(resumed_log) == batch_log(straight_log)
    assert len(batch_log(straight_log)) == 2 * K
    # Same state, bit for bit: params, BN statistics, optimizer state, EMA, RNG, step.
    want, got = load_state(tmp_path / 'straight', 2 * K), load_state(workdir, 2 * K)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert load_meta(workdir, 2 * K)['data_step'] == 2 * K


def test_sigterm_saves_a_loadable_checkpoint_and_exits_0(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    mark = tmp_path / 'slow'
    proc = start_training(tmp_path, workdir, '--config.num_train_steps=40', cache=compile_cache,
                          SLOW_AFTER=2, SLOW_SECONDS=0.5, SLOW_MARK=mark)
    wait_for(mark.exists, proc, what='training to be under way')
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 'preempted: saved step' in out
    steps = committed_steps(workdir)
    assert len(steps) == 1 and 2 <= steps[0] < 40
    meta = load_meta(workdir, steps[0])
    assert (meta['step'], meta['data_step']) == (steps[0], steps[0])
    state = load_state(workdir, steps[0])
    assert int(state['step']) == steps[0]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state['params']))


def _tiny_state(value: float):
    return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.asarray(1, jnp.int32)}


def test_keeps_the_latest_n_and_the_best_checkpoint(tmp_path):
    from ghostnetv2_jax.train.checkpoint import Checkpoints
    ckpts = Checkpoints(tmp_path, keep=2, best_metric='top1')
    for step, top1 in zip(range(1, 6), [10.0, 50.0, 20.0, None, 30.0]):
        ckpts.save(step, _tiny_state(step), {'step': step}, None if top1 is None else {'top1': top1})
    ckpts.wait()
    assert sorted(ckpts.all_steps()) == [2, 4, 5]          # latest two + best (top-1 50 at step 2)
    assert ckpts.best_step() == 2
    restored = ckpts.restore(2, jax.eval_shape(lambda: _tiny_state(0.0)))
    np.testing.assert_array_equal(restored['w'], np.full(3, 2.0))
    assert ckpts.restore_meta(4) == {'step': 4}
    ckpts.close()


def test_workdir_holding_another_model_is_a_clear_error(tmp_path):
    from ghostnetv2_jax.train import trainer
    from ghostnetv2_jax.train.checkpoint import Checkpoints, WorkdirMismatchError
    ckpts = Checkpoints(tmp_path)
    ckpts.save(5, _tiny_state(0.0), {'model': 'ghostnet_100', 'model_overrides': {}, 'num_classes': 1000,
                                      'step': 5, 'data_step': 5})
    ckpts.close()
    with pytest.raises(WorkdirMismatchError, match=r"holds a checkpoint of another model \(model: checkpoint has "
                                                    r"'ghostnet_100', config gives 'ghostnetv2_100'"):
        trainer.train_and_evaluate(load_tiny(), str(tmp_path))
    assert committed_steps(tmp_path) == [5]                 # nothing touched
