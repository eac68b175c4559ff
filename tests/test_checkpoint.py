"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, retention, workdir identity."""
import pathlib
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_trainer import (TINY_RUN, assert_ok, committed_steps, compile_cache, load_meta, load_state,  # noqa: F401
                          load_tiny, run_training, start_training, tiny_run, wait_for)

# One uninterrupted run (straight_run, below) is the reference of every resume here: 6 steps,
# checkpoints at 2, 4 and 6 (all kept), its batches logged.
STEPS = TINY_RUN
K = 4   # the killed run's last checkpoint


def batch_log(path: pathlib.Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope='module')
def straight_run(tiny_run):
    """An uninterrupted 6-step run that saved steps 2, 4 and 6, its batch log beside it: the
    session's shared tiny run (read only)."""
    assert committed_steps(tiny_run) == [2, 4, 6]
    return tiny_run


def assert_same_state(a, b, step: int = 6) -> None:
    want, got = load_state(a, step), load_state(b, step)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, compile_cache, straight_run):
    straight_log, resumed_log = straight_run.parent / 'batches.log', tmp_path / 'resumed.log'

    # Killed: from batch K on the input stalls, so the run sits right after its step-K checkpoint.
    workdir = tmp_path / 'resumed'
    proc = start_training(tmp_path, workdir, *STEPS, cache=compile_cache, TRAIN_LOG=resumed_log,
                          SLOW_AFTER=K, SLOW_SECONDS=600, SLOW_MARK=tmp_path / 'stalled')
    try:
        wait_for(lambda: committed_steps(workdir) == [2, K], proc, what=f'the step-{K} checkpoint')
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [line.split()[0] for line in batch_log(resumed_log)] == [str(i) for i in range(K)]

    result = run_training(tmp_path, workdir, *STEPS, cache=compile_cache, TRAIN_LOG=resumed_log)
    assert_ok(result)
    assert f'resumed from {workdir / "checkpoints"}/{K} (step {K})' in result.stdout

    # Same data, in the same order: the resumed run read batches K..5 and nothing twice.
    assert batch_log(resumed_log) == batch_log(straight_log)
    assert len(batch_log(straight_log)) == 6
    # Same state, bit for bit: params, BN statistics, optimizer state, EMA, RNG, step.
    assert_same_state(straight_run, workdir)
    assert load_meta(workdir, 6)['data_step'] == 6


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
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=2, best_metric='top1')
    for step, top1 in zip(range(1, 6), [10.0, 50.0, 20.0, None, 30.0]):
        ckpts.save(step, _tiny_state(step), {'step': step}, None if top1 is None else {'top1': top1})
    ckpts.wait()
    assert sorted(ckpts.all_steps()) == [2, 4, 5]          # latest two + best (top-1 50 at step 2)
    assert ckpts.best_step() == 2
    restored = ckpts.restore(2, jax.eval_shape(lambda: _tiny_state(0.0)))
    np.testing.assert_array_equal(restored['w'], np.full(3, 2.0))
    assert ckpts.restore_meta(4) == {'step': 4, 'fingerprint': ckpt_lib.fingerprint(_tiny_state(4))}
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


# ----------------------------------------------------------------------------- damaged checkpoints
def garble(step_dir: pathlib.Path) -> None:
    """Overwrite bytes in the middle of the largest array file of a step's state (a failing disk)."""
    files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(range(64, 128))
    target.write_bytes(bytes(data))


def drop_item(step_dir: pathlib.Path) -> None:
    """Delete the step's 'state' item (an interrupted copy between buckets)."""
    shutil.rmtree(step_dir / 'state')


def snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def test_damaged_latest_checkpoints_fall_back_to_the_newest_that_restores(tmp_path, compile_cache, straight_run):
    """Step 6's arrays garbled (its fingerprint differs), step 4's state item missing (it does not
    restore): each is named, moved aside, and training goes on from step 2."""
    workdir = tmp_path / 'run'
    shutil.copytree(straight_run, workdir)
    directory = workdir / 'checkpoints'
    garble(directory / '6')
    drop_item(directory / '4')
    damaged = {step: snapshot(directory / str(step)) for step in (6, 4)}

    result = run_training(tmp_path, workdir, *STEPS, cache=compile_cache)
    assert_ok(result)
    for step in (6, 4):
        assert f'checkpoint {directory}/{step} cannot be restored' in result.stdout
        assert f'checkpoint step {step} is damaged; moved to {workdir / "damaged_checkpoints" / str(step)}; ' \
            'going on from step 2' in result.stdout
        assert snapshot(workdir / 'damaged_checkpoints' / str(step)) == damaged[step]   # moved aside, not deleted
    assert f'resumed from {directory}/2 (step 2)' in result.stdout
    # Steps 3 to 6 trained again from step 2: the state equals the uninterrupted run's, bit for bit.
    assert committed_steps(workdir) == [2, 4, 6]
    assert_same_state(straight_run, workdir)

    # evaluate reads a workdir by the same rule (read only: it moves nothing).
    shutil.copytree(workdir / 'damaged_checkpoints' / '6', directory / '8')
    from ghostnetv2_jax import weights
    variables = weights.load(str(workdir)).variables
    np.testing.assert_array_equal(jax.tree.leaves(variables['params'])[0],
                                  jax.tree.leaves(load_state(workdir, 6)['params'])[0])
    assert (directory / '8').exists()


def test_all_checkpoints_damaged_is_one_line_and_nothing_is_moved(tmp_path, compile_cache, straight_run):
    workdir = tmp_path / 'run'
    shutil.copytree(straight_run, workdir)
    for step in (2, 4, 6):
        garble(workdir / 'checkpoints' / str(step))
    before = snapshot(workdir)
    result = run_training(tmp_path, workdir, *STEPS, cache=compile_cache)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1
    assert errors[0].startswith(f'error: no checkpoint in {workdir / "checkpoints"} restores (steps 6, 4, 2')
    assert '--workdir' in errors[0] and 'init_from' in errors[0]
    for step in (6, 4, 2):
        assert f'checkpoint {workdir / "checkpoints"}/{step} cannot be restored' in result.stdout
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k != 'config.json'} == \
        {k: v for k, v in before.items() if k != 'config.json'}   # nothing moved or deleted


def test_fingerprint_notices_one_changed_value():
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    state = {'w': jnp.arange(6, dtype=jnp.float32), 'h': jnp.ones((2,), jnp.bfloat16),
             'step': jnp.asarray(3, jnp.int32), 'key': jax.random.key(0)}
    meta = {'fingerprint': ckpt_lib.fingerprint(state)}
    ckpt_lib.verify(state, meta, 7)
    changed = dict(state, w=state['w'].at[4].set(np.nextafter(np.float32(4), np.float32(5))))
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"step 7: 1 array\(s\) differ .* first \['w'\]"):
        ckpt_lib.verify(changed, meta, 7)


# ----------------------------------------------------------------------------- failing saves
def test_a_save_that_cannot_be_made_names_the_step_and_keeps_the_earlier_ones(tmp_path):
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=3, best_metric=None)
    ckpts.save(1, _tiny_state(1.0), {'step': 1})
    ckpts.wait()
    (tmp_path / 'checkpoints' / '2').write_text('a file where the step directory should go')
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r'cannot save step 2: .*checkpoints/2 exists'):
        ckpts.save(2, _tiny_state(2.0), {'step': 2})
    restored = ckpts.restore(1, jax.eval_shape(lambda: _tiny_state(0.0)))
    np.testing.assert_array_equal(restored['w'], np.full(3, 1.0))


def test_a_save_whose_step_is_not_on_disk_fails_at_wait(tmp_path, monkeypatch):
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    ckpts = ckpt_lib.Checkpoints(tmp_path, keep=3, best_metric=None)
    ckpts.save(1, _tiny_state(1.0), {'step': 1})
    ckpts.wait()
    monkeypatch.setattr(ckpts.manager, 'save', lambda *args, **kwargs: True)   # says saved, writes nothing
    ckpts.save(2, _tiny_state(2.0), {'step': 2})
    with pytest.raises(ckpt_lib.CheckpointSaveError, match=r'checkpoint step 2 was not written: .* lacks state and meta'):
        ckpts.wait()


def test_training_whose_save_fails_exits_1_naming_the_step(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    mark = tmp_path / 'slow'
    # Steps 1-2 run at full speed and save step 2; from the third batch on each batch waits 2 s,
    # time to put a file where step 4's directory will go.
    proc = start_training(tmp_path, workdir, *STEPS, cache=compile_cache,
                          SLOW_AFTER=2, SLOW_SECONDS=2, SLOW_MARK=mark)
    try:
        wait_for(lambda: mark.exists() and committed_steps(workdir) == [2], proc, what='the step-2 checkpoint')
        (workdir / 'checkpoints' / '4').write_text('not a directory')
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert errors == [f'error: cannot save step 4: {workdir / "checkpoints" / "4"} exists and is not a checkpoint '
                      'directory; the earlier checkpoints are intact']
    assert 'final validation' not in out
    assert int(load_state(workdir, 2)['step']) == 2


def test_a_save_onto_a_full_disk_is_one_line_without_orbax_tracebacks(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    # Every file is capped at 64 kB: the step-1 checkpoint's array data (about 180 kB) cannot be
    # written, as on a full disk; orbax's save threads fail in the background.
    result = run_training(tmp_path, workdir, '--config.checkpoint_every_steps=1', cache=compile_cache,
                          FILE_SIZE_LIMIT=64 * 1024)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, result.stderr[-4000:]
    assert errors[0].startswith(f'error: saving step 1 in {workdir / "checkpoints"} failed: ')
    assert errors[0].endswith('; the earlier checkpoints are intact') and 'File too large' in errors[0]
    assert 'Traceback' not in result.stderr and 'future.py' not in result.stderr, result.stderr[-4000:]
    assert committed_steps(workdir) == []


def test_an_unawaited_failed_save_task_logs_nothing_but_other_task_errors_still_do(tmp_path, caplog):
    """orbax's write tasks left unawaited by a failed save log "Task exception was never
    retrieved" with a traceback whenever the garbage collector reaches them; that record is
    dropped once a Checkpoints exists, and the same record from any other code still shows."""
    import asyncio
    import gc
    import os

    from ghostnetv2_jax.train.checkpoint import Checkpoints

    Checkpoints(tmp_path / 'run')

    def failing_coroutine(filename):
        namespace = {}
        exec(compile('async def write():\n    raise OSError("File too large")\n', filename, 'exec'), namespace)
        return namespace['write']()

    def leave_unretrieved(filename):
        loop = asyncio.new_event_loop()
        task = loop.create_task(failing_coroutine(filename))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()

    orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', '_src', 'serialization.py')
    with caplog.at_level('ERROR', logger='asyncio'):
        leave_unretrieved(orbax_file)
        assert [r for r in caplog.records if r.name == 'asyncio'] == []
        leave_unretrieved(str(tmp_path / 'user_code.py'))
        assert any('never retrieved' in r.getMessage() for r in caplog.records if r.name == 'asyncio')
