"""``train_and_evaluate(config, workdir)``: the training loop, importable and testable.

One jitted step per optimizer update, over a mesh of every device: the batch is sharded on
'data', the state replicated and donated. With ``grad_accum_steps = k`` the step scans over k
micro-batches (summing gradients, updating BN statistics after each), then updates once. Evaluation
runs the raw and the EMA weights over the whole eval split (padding masked out). Checkpoints are
written at evaluations, every ``checkpoint_every_steps`` and on SIGTERM; a restart with the same
workdir resumes exactly: state, RNG and data position.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ghostnetv2_jax import runtime, xla_options
from ghostnetv2_jax.data.pipeline import create_split, num_classes_of
from ghostnetv2_jax.models.registry import create_model
from ghostnetv2_jax.train import checkpoint as ckpt_lib
from ghostnetv2_jax.train import metrics as metrics_lib
from ghostnetv2_jax.train import optim, sharding, steps
from ghostnetv2_jax import weights
from ghostnetv2_jax.train.state import (DTYPES, EMA_SCHEDULES, TrainState, abstract_state, architecture_overrides,
                                         build_model, create_state, init_variables, tuplify)

class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is left as it was."""


# ----------------------------------------------------------------------------- model and config
def identity(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
    """What a checkpoint and a config must agree on (the implementation of the depthwise conv
    does not change the weights, so a run may resume with another)."""
    overrides = {k: v for k, v in architecture_overrides(config).items() if k != 'depthwise_impl'}
    return {'model': config.model, 'model_overrides': overrides, 'num_classes': num_classes}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for settings that would otherwise fail deep inside JAX."""
    k = config.grad_accum_steps
    if k < 1 or config.batch_size % k:
        raise ValueError(f'batch_size={config.batch_size} must be divisible by grad_accum_steps={k} (>= 1)')
    sharding.check_batch(config.batch_size // k, 'batch_size / grad_accum_steps')
    sharding.check_batch(config.eval_batch_size, 'eval_batch_size')
    if config.optimizer not in optim.OPTIMIZERS:
        raise ValueError(f'unknown optimizer {config.optimizer!r}; expected one of {optim.OPTIMIZERS}')
    if config.schedule not in optim.SCHEDULES:
        raise ValueError(f'unknown schedule {config.schedule!r}; expected one of {optim.SCHEDULES}')
    if config.dtype not in DTYPES:
        raise ValueError(f'config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}')
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f'ema_decay must be in [0, 1), got {config.ema_decay}')
    if config.ema_schedule not in EMA_SCHEDULES:
        raise ValueError(f'ema_schedule must be one of {EMA_SCHEDULES}, got {config.ema_schedule!r}')
    if config.num_epochs <= 0 and config.num_train_steps <= 0:
        raise ValueError('set num_epochs or num_train_steps to a positive value')
    distill = config.distill
    if distill.teacher:
        if distill.loss not in steps.DISTILLATION_LOSSES:
            raise ValueError(f'config.distill.loss must be one of {steps.DISTILLATION_LOSSES}, got {distill.loss!r}')
        if distill.temperature <= 0:
            raise ValueError(f'config.distill.temperature must be > 0, got {distill.temperature}')
        if not distill.teacher_checkpoint:
            raise ValueError(f'config.distill.teacher {distill.teacher!r} needs its weights: set '
                             '--config.distill.teacher_checkpoint to a .safetensors (convert) or PyTorch file')


# ----------------------------------------------------------------------------- steps
# The steps live in train/steps.py (importable without the input pipeline); re-exported here.
cross_entropy, make_train_step, make_eval_step = steps.cross_entropy, steps.make_train_step, steps.make_eval_step


def evaluate(eval_fn: Callable, variables: Any, batches: Iterator, mesh) -> Dict[str, float]:
    """Loss, top-1 and top-5 (in %) over every batch of an eval split."""
    totals = None
    for batch in batches:
        out = eval_fn(variables, sharding.shard_batch(batch, mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
        raise ValueError('the eval split produced no batches')
    totals = jax.device_get(totals)
    n = max(float(totals['count']), 1.0)
    return {'loss': float(totals['loss']) / n, 'top1': 100.0 * float(totals['top1']) / n,
            'top5': 100.0 * float(totals['top5']) / n, 'count': int(totals['count'])}


# ----------------------------------------------------------------------------- the loop
def _splits_kwargs(config) -> Dict[str, Any]:
    return dict(seed=config.seed, host_index=jax.process_index(), host_count=jax.process_count())


_run_once = xla_options.run_once


def _initial_state(config, model, tx, image_size: int, state_sharding) -> TrainState:
    """Fresh (or ``init_from``) state, created directly with its sharding (no host copy)."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    use_ema = config.ema_decay > 0
    if config.init_from:
        fresh = _run_once(lambda r: init_variables(model, r, image_size), init_rng)
        variables = weights.load_into(config.init_from, config.model, architecture_overrides(config),
                                    jax.device_get(fresh))
        metrics_lib.log(f'initialised from {config.init_from}')
        return _run_once(lambda v: create_state(v, tx, state_rng, use_ema), variables,
                         out_shardings=state_sharding)
    return _run_once(lambda r: create_state(init_variables(model, r, image_size), tx, state_rng, use_ema),
                     init_rng, out_shardings=state_sharding)


def load_teacher(config, num_classes: int, image_size: int, placement) -> tuple:
    """(teacher model, its variables placed with ``placement``) for ``config.distill``, or
    (None, None) without a teacher. The teacher must have the student's classes."""
    distill = config.distill
    if not distill.teacher:
        return None, None
    overrides = {k: v for k, v in tuplify(dict(distill.teacher_overrides or {})).items() if v is not None}
    teacher = create_model(distill.teacher, num_classes=num_classes, dtype=DTYPES[config.dtype], **overrides)
    fresh = jax.device_get(_run_once(lambda r: init_variables(teacher, r, image_size), jax.random.PRNGKey(0)))
    variables = weights.load_into(distill.teacher_checkpoint, distill.teacher, overrides, fresh,
                                keep_fresh_head=False, role='distill.teacher_checkpoint')
    metrics_lib.log(f'distilling from {distill.teacher} ({distill.teacher_checkpoint}): {distill.loss} at '
                    f'temperature {distill.temperature}, weights CE {distill.ce_weight} / KD {distill.kd_weight}')
    return teacher, jax.device_put(variables, placement)


_BATCH_KEYS = ('images', 'labels', 'mask')   # mask 0: a row the input pipeline left out


def _next_batch(it: Iterator, k: int, mesh) -> Dict[str, jax.Array]:
    """One optimizer update's input: a (B, ...) batch, or k micro-batches stacked (k, B/k, ...)."""
    if k == 1:
        batch = next(it)
        return sharding.shard_batch({key: batch[key] for key in _BATCH_KEYS}, mesh)
    micro = [next(it) for _ in range(k)]
    stacked = {key: np.stack([m[key] for m in micro]) for key in _BATCH_KEYS}
    spec = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
    return {key: jax.make_array_from_process_local_data(spec, v) for key, v in stacked.items()}


class _StepMetrics:
    """Per-step metrics stay on device until a report, then are checked and averaged on the host.

    Syncing only at reports keeps the accelerators busy; a non-finite loss or gradient is still
    attributed to the exact step it appeared at. ``skipped`` (examples left out) is summed.
    """

    def __init__(self):
        self._pending: List[tuple] = []

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> Optional[Dict[str, float]]:
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        host = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, host):
            if not all(np.isfinite(m[name]) for name in ('loss', 'grad_norm', 'param_norm')):
                what = 'loss' if not np.isfinite(m['loss']) else 'gradient or weights'
                raise TrainingError(f'non-finite {what} at step {step} (loss {float(m["loss"])}, grad norm '
                                    f'{float(m["grad_norm"])}, param norm {float(m["param_norm"])}); stopped '
                                    'without saving, the last good checkpoint is kept')
        skipped = sum(float(m.pop('skipped', 0.0)) for m in host)
        return {**metrics_lib.mean_of(host), 'skipped': skipped}


def _log_every_process(message: str) -> None:
    """What each process must say for itself (its share of the data, its own exit)."""
    prefix = f'[process {jax.process_index()}] ' if jax.process_count() > 1 else ''
    print(prefix + message, flush=True)


def _data_log(line: str) -> None:
    _log_every_process(f'data: {line}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the final
    eval metrics (``top1``, ``top5``, ``loss`` and, with an EMA, ``ema_top1`` ...)."""
    validate_config(config)
    guard = ckpt_lib.PreemptionGuard()   # early: a SIGTERM during compilation still saves cleanly
    try:
        return _train_and_evaluate(config, epath.Path(workdir), guard)
    finally:
        guard.close()


def _train_and_evaluate(config, workdir: epath.Path, guard: ckpt_lib.PreemptionGuard) -> Dict[str, float]:
    num_classes = num_classes_of(config.data)   # a missing dataset fails here, before the workdir is touched
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.create_mesh()
    k = config.grad_accum_steps
    micro_batch = config.batch_size // k
    use_ema = config.ema_decay > 0
    best = config.best_metric
    if best.startswith('ema_') and not use_ema:
        best = best[len('ema_'):]

    checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=best)
    model = build_model(config, num_classes)
    image_size = config.data.image_size
    replicated = sharding.replicated(mesh)

    abstract = abstract_state(config, model, replicated)
    resumed = ckpt_lib.restore_newest(
        checkpoints, lambda step, meta: checkpoints.restore(step, abstract),
        check=lambda meta: ckpt_lib.check_identity(meta, identity(config, num_classes), str(workdir)),
        log=metrics_lib.log)
    latest, meta, state = resumed if resumed else (None, None, None)
    start_step = int(meta['step']) if meta else 0

    train = create_split(config.data, split=config.data.train_split, train=True, global_batch=micro_batch,
                         start_step=int(meta['data_step']) if meta else 0, on_skip=_data_log,
                         **_splits_kwargs(config))
    ckpt_lib.write_config(workdir, config.to_json_best_effort(indent=2))

    steps_per_epoch = train.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f'batch_size={config.batch_size} exceeds the {train.num_examples} training examples')
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(math.ceil(config.num_epochs * steps_per_epoch)))
    schedule_epochs = int(math.ceil(total_steps / steps_per_epoch))
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch, schedule_epochs)
    tx = optim.create_optimizer(config, schedule)
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    if meta:
        metrics_lib.log(f'resumed from {checkpoints.directory}/{latest} (step {start_step})')
    else:
        state = _initial_state(config, model, tx, image_size, state_sharding)

    teacher, teacher_variables = load_teacher(config, num_classes, image_size, replicated)
    jitted_step = steps.jit_train_step(make_train_step(model, tx, schedule, config, teacher),
                                       out_shardings=(state_sharding, replicated))
    train_step = jitted_step if teacher is None else (lambda s, b: jitted_step(s, b, teacher_variables))
    eval_step = xla_options.jit(make_eval_step(model, runtime.chunk_for(mesh)), train=False,
                                out_shardings=replicated)
    writer = metrics_lib.MetricWriter(workdir)
    progress = metrics_lib.Progress(total_steps, config.batch_size, start_step)
    pending = _StepMetrics()
    metrics_lib.log(f'{config.model}: {num_classes} classes, {train.num_examples} train examples, '
                    f'{steps_per_epoch} steps/epoch, {total_steps} steps, global batch {config.batch_size} '
                    f'({k} x {micro_batch}) on {jax.device_count()} devices; workdir {workdir}')

    # examples the input pipeline left out in the current epoch (kept across a resume)
    skipped = {'epoch': int(meta.get('skipped_in_epoch', 0)) if meta else 0}

    def meta_for(step: int) -> Dict[str, Any]:
        return {**identity(config, num_classes), 'step': step, 'data_step': step * k,
                'epoch': step / steps_per_epoch, 'skipped_in_epoch': skipped['epoch'],
                'config': json.loads(config.to_json_best_effort())}

    eval_split = create_split(config.data, split=config.data.eval_split, train=False,
                              global_batch=config.eval_batch_size, on_skip=_data_log, **_splits_kwargs(config))

    def run_eval(step: int) -> Dict[str, float]:
        results = {}
        for prefix, ema in (('', False), ('ema_', True))[: 2 if use_ema else 1]:
            batches = eval_split.fresh_iterator()
            for name, value in evaluate(eval_step, state.variables(ema), batches, mesh).items():
                results[prefix + name] = value
        writer.write(step, {f'eval/{name}': v for name, v in results.items() if name not in ('count', 'ema_count')})
        line = f'eval at step {step}: top-1 {results["top1"]:.2f}% top-5 {results["top5"]:.2f}%'
        if use_ema:
            line += f' | EMA top-1 {results["ema_top1"]:.2f}% top-5 {results["ema_top5"]:.2f}%'
        metrics_lib.log(line)
        return results

    def report(step: int) -> None:
        scalars = pending.flush()
        if scalars is None:
            return
        skipped['epoch'] += int(scalars.pop('skipped'))
        rates = progress.report(step)
        scalars = {f'train/{name}': v for name, v in scalars.items()}
        if step == start_step + 1:   # the first step's time is mostly compilation
            writer.write(step, scalars)
            metrics_lib.log(f'step {step}/{total_steps} loss {scalars["train/loss"]:.4f} '
                            f'(compilation and first step: {rates["elapsed_s"]:.0f}s)')
        else:
            writer.write(step, {**scalars, 'train/img_per_s': rates['img_per_s']})
            metrics_lib.log(progress.line(step, step / steps_per_epoch, scalars, rates))

    def end_epoch(step: int) -> None:
        """The epoch's count of examples left out (unreadable images), then a new count."""
        writer.write(step, {'train/skipped_images': skipped['epoch']})
        if skipped['epoch']:
            metrics_lib.log(f'epoch {step // steps_per_epoch}: {skipped["epoch"]} unreadable images '
                            'skipped (data.bad_images=skip)')
        skipped['epoch'] = 0

    def save(step: int, results: Optional[Dict[str, float]] = None) -> None:
        report(step)   # checks every pending step: a non-finite state is never saved
        metrics = None if results is None else {n: v for n, v in results.items() if 'top' in n}
        checkpoints.save(step, state, meta_for(step), metrics)

    eval_every = max(int(config.eval_every_epochs), 1) * steps_per_epoch
    results: Dict[str, float] = {}
    step = start_step
    iterator = train.iterator
    profiling_from = start_step + 5 if config.profile_steps > 0 else -1   # after compilation
    profiling = False
    failure: Optional[BaseException] = None
    try:
        while step < total_steps:
            if step == profiling_from:
                jax.profiler.start_trace(str(workdir / 'profile'))
                profiling = True
            batch = _next_batch(iterator, k, mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            pending.add(step, step_metrics)
            if profiling and step == profiling_from + config.profile_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                metrics_lib.log(f'profile of steps {profiling_from + 1}-{step} in {workdir / "profile"}')
            if step % config.log_every_steps == 0 or step == start_step + 1:
                report(step)
            if step % steps_per_epoch == 0:
                report(step)
                end_epoch(step)
            if guard.requested(step, checkpoints):
                report(step)
                save(step)
                checkpoints.wait()
                _log_every_process(f'preempted: saved step {step} in {checkpoints.directory}; rerun the '
                                   'same command to resume')
                return {'preempted': True, 'step': step, **results}
            if step % eval_every == 0 or step == total_steps:
                report(step)
                results = run_eval(step)
                save(step, results)
                progress.reset(step)
            elif config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0:
                save(step)
        if not results:   # resumed at the very end: evaluate what is there
            results = run_eval(step)
        checkpoints.wait()   # success only once the final checkpoint is on disk
    except BaseException as error:
        failure = error
        raise
    finally:
        if profiling:
            jax.profiler.stop_trace()
        writer.close()
        try:
            checkpoints.wait()
        except ckpt_lib.CheckpointSaveError as save_error:
            if failure is None:
                raise
            metrics_lib.log(f'also: {save_error}')   # the error that stopped training is the one raised
        checkpoints.close()
    metrics_lib.log(f'final validation top-1 {results["top1"]:.2f}%'
                    + (f' (EMA {results["ema_top1"]:.2f}%)' if use_ema else '')
                    + f'; TensorBoard logs: {writer.logdir}; checkpoints: {checkpoints.directory}')
    return results
