"""The train + eval loop end to end on the embedded digits with a tiny GhostNetV2 (configs/tiny.py).

Training runs in subprocesses through the real CLI and the real input pipeline, wrapped by a small
harness that can log, slow down or poison the train batches (``run_training``); the other training
test files import these helpers. Every subprocess shares one persistent XLA compilation cache, so
the tiny train step is compiled once per test session, not once per run.
"""
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py')

# The CLI, with the train split's batches watched (env): TRAIN_LOG appends "position sha1" per
# batch; from position SLOW_AFTER on every batch first touches SLOW_MARK and sleeps SLOW_SECONDS;
# NAN_AT turns that position's images into NaN. FILE_SIZE_LIMIT (bytes) makes writing a file past
# it fail as a full disk would (RLIMIT_FSIZE, SIGXFSZ ignored: the write returns EFBIG).
HARNESS = r'''
import hashlib, os, resource, signal, sys, time
import numpy as np

if os.environ.get('FILE_SIZE_LIMIT'):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ['FILE_SIZE_LIMIT']),) * 2)
from ghostnetv2_jax.cli import main
from ghostnetv2_jax.train import trainer

real_create_split = trainer.create_split


def watched(batches, position):
    log, mark = os.environ.get('TRAIN_LOG'), os.environ.get('SLOW_MARK')
    slow_after, nan_at = int(os.environ.get('SLOW_AFTER', -1)), int(os.environ.get('NAN_AT', -1))
    for batch in batches:
        if 0 <= slow_after <= position:
            if mark:
                open(mark, 'a').close()
            time.sleep(float(os.environ.get('SLOW_SECONDS', '1')))
        if position == nan_at:
            batch = dict(batch, images=np.full_like(batch['images'], np.nan))
        if log:
            digest = hashlib.sha1(batch['images'].tobytes() + batch['labels'].tobytes()).hexdigest()
            with open(log, 'a') as f:
                f.write(f'{position} {digest}\n')
        position += 1
        yield batch


def create_split(data_config, *, split, train, **kwargs):
    result = real_create_split(data_config, split=split, train=train, **kwargs)
    if train:
        result.iterator = watched(result.iterator, kwargs.get('start_step', 0))
    return result


trainer.create_split = create_split
sys.exit(main(['train'] + sys.argv[1:]))
'''


def _source_digest() -> str:
    """The package, the configs the tests train and the versions that write a workdir."""
    import flax
    import jaxlib
    import orbax.checkpoint
    files = sorted((REPO / 'ghostnetv2_jax').rglob('*.py')) + [REPO / 'configs' / 'default.py', pathlib.Path(TINY)]
    versions = f'{sys.version} {jax.__version__} {jaxlib.__version__} {flax.__version__} {orbax.checkpoint.__version__}'
    return hashlib.sha1(b''.join(f.read_bytes() for f in files) + versions.encode()).hexdigest()[:16]


# The shared tiny run (tiny_run): 6 steps, checkpoints at 2, 4 and 6, all kept; its batches logged.
TINY_RUN_STEPS = 6
TINY_RUN = (f'--config.num_train_steps={TINY_RUN_STEPS}', '--config.checkpoint_every_steps=2',
            '--config.keep_checkpoints=3')


def _cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.getbasetemp().parent / 'ghostnetv2_train_xla_cache'


def _tiny_run_dir(tmp_path_factory) -> pathlib.Path:
    """Where the shared tiny run lives: its workdir ``run`` and its batch log ``batches.log``."""
    return tmp_path_factory.getbasetemp().parent / 'ghostnetv2_tiny_runs' / _source_digest()


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory) -> str:
    """One XLA cache for every training subprocess of the session (xdist workers included),
    warmed by one tiny run before any test uses it: otherwise every test that starts at once
    compiles the same train step side by side on the same two cores. The warm-up run is the
    tiny recipe trained with the TINY_RUN flags, kept for the tests that read one (tiny_run)."""
    path = _cache_dir(tmp_path_factory)
    path.mkdir(exist_ok=True)
    root, warm = _tiny_run_dir(tmp_path_factory), path / f'warm-{_source_digest()}'
    with open(path / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # the other worker waits for the warm-up
        if not (warm.exists() and (root / 'run').exists()):
            shutil.rmtree(root, ignore_errors=True)   # a run cut short
            root.mkdir(parents=True)
            scratch = tmp_path_factory.mktemp('warmup')
            assert_ok(run_training(scratch, root / 'run', *TINY_RUN, cache=str(path),
                                   TRAIN_LOG=root / 'batches.log'))
            warm.touch()
    return str(path)


@pytest.fixture(scope='session')
def tiny_run(compile_cache, tmp_path_factory) -> pathlib.Path:
    """The workdir of the tiny recipe trained with the TINY_RUN flags (6 steps, checkpoints 2, 4
    and 6, an EMA, one evaluation at the end; its batch log is ``batches.log`` beside it), made
    once for the session by compile_cache's warm-up. Shared: read it, copy it, never write into it."""
    return _tiny_run_dir(tmp_path_factory) / 'run'


def train_env(cache: str, devices: int = 1, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
    env.update(JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache, TF_CPP_MIN_LOG_LEVEL='2',
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
               PYTHONPATH=str(REPO) + os.pathsep + env.get('PYTHONPATH', ''))
    if devices > 1:
        env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_command(tmp_path: pathlib.Path, workdir, *overrides: str, config: str = TINY) -> List[str]:
    harness = tmp_path / 'harness.py'
    if not harness.exists():
        harness.write_text(HARNESS)
    return [sys.executable, str(harness), f'--config={config}', f'--workdir={workdir}', *overrides]


def run_training(tmp_path, workdir, *overrides, cache, devices=1, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(tmp_path, workdir, *overrides), env=train_env(cache, devices, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))


def start_training(tmp_path, workdir, *overrides, cache, **env) -> subprocess.Popen:
    return subprocess.Popen(train_command(tmp_path, workdir, *overrides), env=train_env(cache, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = 'condition') -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f'training exited ({proc.returncode}) before {what}:\n{out}\n{err[-3000:]}')
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.2)


def committed_steps(workdir) -> List[int]:
    """Checkpoint steps orbax has finished (temporary directories carry a suffix)."""
    root = pathlib.Path(workdir) / 'checkpoints'
    return sorted(int(p.name) for p in root.glob('*') if p.name.isdigit()) if root.exists() else []


def load_state(workdir, step: int) -> dict:
    """A saved train state as plain numpy, read without knowing its structure in advance."""
    import orbax.checkpoint as ocp
    # fallback_sharding: the checkpoint may come from another device count (8 fake devices).
    args = ocp.args.StandardRestore(fallback_sharding=jax.sharding.make_single_device_sharding(jax.devices()[0]))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        state = checkpointer.restore(pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state', args=args)
    return jax.tree.map(np.asarray, state)


def load_meta(workdir, step: int) -> dict:
    return json.loads((pathlib.Path(workdir) / 'checkpoints' / str(step) / 'meta' / 'metadata').read_text())


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f'exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}'


def read_jsonl(path) -> List[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- tests
def test_train_and_evaluate_end_to_end(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    result = run_training(tmp_path, workdir, cache=compile_cache)
    assert_ok(result)
    out = result.stdout
    assert 'final validation top-1' in out and str(workdir / 'tb') in out and str(workdir / 'checkpoints') in out
    assert 'img/s' in out and 'ETA' in out

    records = read_jsonl(workdir / 'metrics.jsonl')
    train = [r for r in records if 'train/loss' in r]
    evals = [r for r in records if 'eval/top1' in r]
    assert [r['step'] for r in train] == [1, 4, 8]
    for r in train:
        assert np.isfinite(r['train/loss']) and r['train/lr'] > 0
    assert 'train/img_per_s' not in train[0]                # step 1 is mostly compilation
    assert all(r['train/img_per_s'] > 0 for r in train[1:])
    assert len(evals) == 1 and evals[0]['step'] == 8
    for key in ('eval/top1', 'eval/top5', 'eval/ema_top1', 'eval/ema_top5'):
        assert 0.0 <= evals[0][key] <= 100.0
    assert evals[0]['eval/top5'] >= evals[0]['eval/top1']
    assert list((workdir / 'tb').glob('events.out.tfevents.*'))
    assert committed_steps(workdir) == [8]
    meta = load_meta(workdir, 8)
    assert (meta['model'], meta['num_classes'], meta['step'], meta['data_step']) == ('ghostnetv2_100', 10, 8, 8)
    assert json.loads((workdir / 'config.json').read_text())['model'] == 'ghostnetv2_100'

    state = load_state(workdir, 8)
    assert int(state['step']) == 8
    assert set(state) >= {'params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng'}

    # The evaluate command on the workdir reproduces the training's final numbers.
    # (through the command's main in this process; tests/test_train_cli.py runs it as python -m)
    from ghostnetv2_jax.cli import main
    assert main(['evaluate', f'--checkpoint={workdir}', f'--json={tmp_path / "eval.json"}', '--batch_size=64']) == 0
    got = json.loads((tmp_path / 'eval.json').read_text())
    assert got['count'] == 359 and got['dataset'] == 'digits'
    assert got['top1'] == pytest.approx(evals[0]['eval/top1'], abs=1e-6)
    assert got['top5'] == pytest.approx(evals[0]['eval/top5'], abs=1e-6)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    # The batch at position 4 is consumed by step 5; checkpoints every 2 steps.
    result = run_training(tmp_path, workdir, '--config.checkpoint_every_steps=2', cache=compile_cache, NAN_AT=4)
    assert result.returncode == 1, result.stderr[-3000:]
    # NaN images: the gradient goes non-finite at step 5 (the loss may or may not, depending on how
    # XLA's max treats NaN); the error names the step, on one line.
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1 and re.match(r'error: non-finite (loss|gradient or weights) at step 5 ', error[0]), result.stderr
    assert 'last good checkpoint is kept' in error[0] and 'Traceback' not in result.stderr
    assert committed_steps(workdir) == [2, 4]
    state = load_state(workdir, 4)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state['params']))


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, compile_cache):
    workdir = tmp_path / 'run'
    # lr 1e6: the loss stays finite (1e19 and more) but is far above the first step's.
    result = run_training(tmp_path, workdir, '--config.learning_rate=1e6', '--config.checkpoint_every_steps=1',
                          cache=compile_cache)
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1, result.stderr[-3000:]
    match = re.match(r'error: training diverged at step (\d+): loss (\S+) is more than 1000 times the first '
                     r'loss (\S+) \(.*config.divergence_factor=0.*\); stopped without saving, the last good '
                     r'checkpoint is kept$', error[0])
    assert match, error[0]
    step, loss, first = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert np.isfinite(loss) and loss > 1000 * first and 2 <= step <= 8
    assert 'Traceback' not in result.stderr and 'final validation' not in result.stdout
    assert committed_steps(workdir) and max(committed_steps(workdir)) < step   # the diverged state is not saved
    assert load_meta(workdir, max(committed_steps(workdir)))['first_loss'] == pytest.approx(first, rel=1e-3)


def test_the_divergence_check_can_be_turned_off_and_is_checked(monkeypatch):
    from ghostnetv2_jax.train import trainer
    metrics = lambda loss: {'loss': np.float32(loss), 'grad_norm': np.float32(1.0), 'param_norm': np.float32(1.0)}
    watch = trainer._StepMetrics(divergence_factor=1e3)
    for step, loss in enumerate([2.3, 50.0, 2000.0], start=1):
        watch.add(step, metrics(loss))
    assert watch.flush()['loss'] == pytest.approx((2.3 + 50 + 2000) / 3)   # 2000 < 1000 * 2.3
    watch.add(4, metrics(3e19))
    with pytest.raises(trainer.TrainingError, match=r'training diverged at step 4: loss 3e\+19 .* first loss 2\.3 '):
        watch.flush()
    off = trainer._StepMetrics(divergence_factor=0.0, first_loss=2.3)   # first_loss: from a checkpoint
    off.add(5, metrics(3e19))
    assert off.flush()['loss'] == pytest.approx(3e19)
    config = load_tiny()
    config.divergence_factor = -1.0
    with pytest.raises(ValueError, match='divergence_factor must be >= 0'):
        trainer.validate_config(config)


class _Toy(nn.Module):
    """Dense classifier with a batch_stats counter (the train step's contract, without BatchNorm,
    whose per-micro-batch statistics would make accumulation differ from one big batch)."""
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        seen = self.variable('batch_stats', 'seen', lambda: jnp.zeros((), jnp.float32))
        if train and not self.is_initializing():
            seen.value += x.shape[0]
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _toy_setup(grad_accum_steps: int, ema_decay: float = 0.5, ema_schedule: str = 'fixed'):
    import optax
    from ghostnetv2_jax.train import trainer
    from ghostnetv2_jax.train.state import create_state
    config = load_tiny()
    config.grad_accum_steps, config.ema_decay, config.ema_schedule = grad_accum_steps, ema_decay, ema_schedule
    model = _Toy()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
    tx = optax.sgd(0.1)
    state = create_state(variables, tx, jax.random.PRNGKey(1), use_ema=ema_decay > 0)
    step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(0.1), config))
    return state, step


def load_tiny():
    import importlib.util
    spec = importlib.util.spec_from_file_location('tiny_config', TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_grad_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(8, 4, 4, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=8), jnp.int32)
    big, step1 = _toy_setup(1)
    acc, step4 = _toy_setup(4)
    big, m1 = step1(big, {'images': images, 'labels': labels})
    acc, m4 = step4(acc, {'images': images.reshape(4, 2, 4, 4, 3), 'labels': labels.reshape(4, 2)})
    chex.assert_trees_all_close(acc.params, big.params, rtol=1e-6, atol=1e-7)
    assert float(acc.batch_stats['seen']) == float(big.batch_stats['seen']) == 8.0   # every micro-batch ran
    assert int(acc.step) == int(big.step) == 1                                        # one optimizer update
    assert float(m4['loss']) == pytest.approx(float(m1['loss']), rel=1e-6)


def test_ema_is_updated_once_per_step_with_the_decay():
    state, step = _toy_setup(1, ema_decay=0.5)
    before = state.ema_params
    batch = {'images': jnp.ones((2, 4, 4, 3)), 'labels': jnp.zeros((2,), jnp.int32)}
    new, _ = step(jax.tree.map(jnp.copy, state), batch)
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, before, new.params)
    chex.assert_trees_all_close(new.ema_params, expected, rtol=1e-6)
    assert float(new.ema_batch_stats['seen']) == pytest.approx(0.5 * 0 + 0.5 * 2)


def test_trainer_step_is_the_public_one():
    from ghostnetv2_jax.train import steps, trainer
    assert trainer.make_train_step is steps.make_train_step and trainer.make_eval_step is steps.make_eval_step
    assert trainer.cross_entropy is steps.cross_entropy
