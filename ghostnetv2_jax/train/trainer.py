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
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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
    """Training cannot go on (non-finite or diverging loss, a lost peer process); the last good
    checkpoint is left as it was."""


class PeerLostError(TrainingError):
    """Another process of a multi-process job is gone; a rerun resumes from the last checkpoint."""


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
    if config.get('divergence_factor', 0.0) < 0:
        raise ValueError(f'divergence_factor must be >= 0 (0: no divergence check), got {config.divergence_factor}')
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
                             '--config.distill.teacher_checkpoint to a .safetensors (convert), a PyTorch '
                             "file, a workdir or published weights ('pretrained:NAME')")
    for field, source, model, step in (('init_from', config.init_from, config.model, config.init_from_step),
                                       ('distill.teacher_checkpoint', distill.teacher_checkpoint,
                                        distill.teacher, distill.teacher_step)):
        if source and weights.is_pretrained(source):   # a wrong published name fails before any data is read
            problem = weights.check_source(source, model or None, str(step))
            if problem:
                raise ValueError(f'config.{field}: {problem}')


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
                                      jax.device_get(fresh), step=str(config.init_from_step),
                                      ema=config.init_from_ema)
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
                                  step=str(distill.teacher_step), ema=distill.teacher_ema,
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

    Syncing only at reports keeps the accelerators busy; a non-finite or diverging loss is still
    attributed to the exact step it appeared at. ``skipped`` (examples left out) is summed.

    The divergence check: a loss that is finite but more than ``divergence_factor`` times the
    first loss of the run (``first_loss``, step 1's, kept in the checkpoints across a resume) means
    training has diverged (a learning rate far too high gives a finite 1e19 long before a NaN, and
    would otherwise train on to chance accuracy and report success). It stops like a non-finite
    loss: a ``TrainingError`` naming the step and both losses, before anything of that step is
    saved, so the last good checkpoint is kept. ``divergence_factor`` 0 turns the check off. A
    cross-entropy starts at about log(classes) and only falls, so 1e3 times it is never training.
    """

    def __init__(self, divergence_factor: float = 0.0, first_loss: Optional[float] = None):
        self._pending: List[tuple] = []
        self.divergence_factor = divergence_factor
        self.first_loss = first_loss

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> Optional[Dict[str, float]]:
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        host = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, host):
            self._check(step, m)
        skipped = sum(float(m.pop('skipped', 0.0)) for m in host)
        return {**metrics_lib.mean_of(host), 'skipped': skipped}

    def _check(self, step: int, m: Dict[str, Any]) -> None:
        loss = float(m['loss'])
        if not all(np.isfinite(m[name]) for name in ('loss', 'grad_norm', 'param_norm')):
            what = 'loss' if not np.isfinite(loss) else 'gradient or weights'
            raise TrainingError(f'non-finite {what} at step {step} (loss {loss}, grad norm '
                                f'{float(m["grad_norm"])}, param norm {float(m["param_norm"])}); stopped '
                                'without saving, the last good checkpoint is kept')
        if self.first_loss is None:
            self.first_loss = loss
        elif self.divergence_factor > 0 and loss > self.divergence_factor * abs(self.first_loss):
            raise TrainingError(f'training diverged at step {step}: loss {loss:.4g} is more than '
                                f'{self.divergence_factor:g} times the first loss {self.first_loss:.4g} '
                                '(lower the learning rate; config.divergence_factor=0 turns this check off); '
                                'stopped without saving, the last good checkpoint is kept')


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
        return _Run(config, epath.Path(workdir), guard).run()
    finally:
        guard.close()


class _Run:
    """One launch of training in a workdir, read top to bottom: ``__init__`` builds everything
    (resuming from the newest intact checkpoint), ``run`` is the loop, and each thing the loop
    does at a step boundary is a method. What changes as training goes is on ``self``: ``state``,
    ``step``, ``skipped_in_epoch`` (examples the input pipeline left out this epoch, kept across a
    resume), ``results`` (the latest evaluation) and ``pending`` (step metrics not yet reported)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path, guard: ckpt_lib.PreemptionGuard):
        self.config, self.workdir, self.guard = config, workdir, guard
        self.num_classes = num_classes_of(config.data)   # a missing dataset fails here, before the workdir is touched
        workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = sharding.create_mesh()
        self.k = config.grad_accum_steps
        self.use_ema = config.ema_decay > 0
        best = config.best_metric
        if best.startswith('ema_') and not self.use_ema:
            best = best[len('ema_'):]
        self.checkpoints = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=best)
        self.model = build_model(config, self.num_classes)
        replicated = sharding.replicated(self.mesh)

        # Where to start: the newest intact checkpoint, or step 0.
        abstract = abstract_state(config, self.model, replicated)
        resumed = ckpt_lib.restore_newest(
            self.checkpoints, lambda step, meta: self.checkpoints.restore(step, abstract),
            check=lambda meta: ckpt_lib.check_identity(meta, self._identity(), str(workdir)),
            log=metrics_lib.log)
        latest, meta, self.state = resumed if resumed else (None, {}, None)
        self.start_step = self.step = int(meta.get('step', 0))
        self.skipped_in_epoch = int(meta.get('skipped_in_epoch', 0))

        # Data and length.
        micro_batch = config.batch_size // self.k
        self.train = create_split(config.data, split=config.data.train_split, train=True, global_batch=micro_batch,
                                  start_step=int(meta.get('data_step', 0)), on_skip=_data_log,
                                  **_splits_kwargs(config))
        ckpt_lib.write_config(workdir, config.to_json_best_effort(indent=2))
        self.steps_per_epoch = self.train.num_examples // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f'batch_size={config.batch_size} exceeds the {self.train.num_examples} training examples')
        self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                            else int(math.ceil(config.num_epochs * self.steps_per_epoch)))
        self.eval_every = max(int(config.eval_every_epochs), 1) * self.steps_per_epoch

        # Optimizer and state.
        schedule = optim.create_learning_rate_schedule(config, self.steps_per_epoch,
                                                       int(math.ceil(self.total_steps / self.steps_per_epoch)))
        tx = optim.create_optimizer(config, schedule)
        state_sharding = jax.tree.map(lambda _: replicated, abstract)
        if resumed:
            metrics_lib.log(f'resumed from {self.checkpoints.directory}/{latest} (step {self.start_step})')
        else:
            self.state = _initial_state(config, self.model, tx, config.data.image_size, state_sharding)

        # The compiled steps.
        teacher, teacher_variables = load_teacher(config, self.num_classes, config.data.image_size, replicated)
        jitted = steps.jit_train_step(make_train_step(self.model, tx, schedule, config, teacher),
                                      out_shardings=(state_sharding, replicated))
        self.train_step = jitted if teacher is None else (lambda s, b: jitted(s, b, teacher_variables))
        self.eval_step = xla_options.jit(make_eval_step(self.model, runtime.chunk_for(self.mesh)), train=False,
                                         out_shardings=replicated)
        self.eval_split = create_split(config.data, split=config.data.eval_split, train=False,
                                       global_batch=config.eval_batch_size, on_skip=_data_log,
                                       **_splits_kwargs(config))

        # Where numbers go.
        self.writer = metrics_lib.MetricWriter(workdir)
        self.progress = metrics_lib.Progress(self.total_steps, config.batch_size, self.start_step)
        self.pending = _StepMetrics(config.get('divergence_factor', 0.0), meta.get('first_loss'))
        self.results: Dict[str, float] = {}
        self.profiling_from = self.start_step + 5 if config.profile_steps > 0 else -1   # after compilation
        self.profiling = False
        metrics_lib.log(f'{config.model}: {self.num_classes} classes, {self.train.num_examples} train examples, '
                        f'{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, global batch '
                        f'{config.batch_size} ({self.k} x {micro_batch}) on {jax.device_count()} devices; '
                        f'workdir {workdir}')

    def _identity(self) -> Dict[str, Any]:
        return identity(self.config, self.num_classes)

    # ------------------------------------------------------------------------- the loop
    def run(self) -> Dict[str, float]:
        failure: Optional[BaseException] = None
        self.watchdog = sharding.PeerWatchdog(self.resume_step)
        try:
            while self.step < self.total_steps:
                self.train_one_step()
                step = self.step
                if step % self.config.log_every_steps == 0 or step == self.start_step + 1:
                    self.report()
                if step % self.steps_per_epoch == 0:
                    self.end_epoch()
                if self.guard.requested(step, self.checkpoints):
                    return self.preempted()
                if step % self.eval_every == 0 or step == self.total_steps:
                    self.evaluate()
                    self.save(with_results=True)
                    self.progress.reset(step)
                elif self.config.checkpoint_every_steps > 0 and step % self.config.checkpoint_every_steps == 0:
                    self.save()
            if not self.results:   # resumed at the very end: evaluate what is there
                self.evaluate()
            self.checkpoints.wait()   # success only once the final checkpoint is on disk
        except BaseException as error:
            failure = error
            why = None if isinstance(error, (TrainingError, KeyboardInterrupt)) else self.watchdog.lost_peer()
            if why:   # a collective failed because a peer is gone (its heartbeats stopped)
                failure = PeerLostError(sharding.peer_lost_message(why, self.resume_step()))
                raise failure from error
            raise
        finally:
            self.close(failure)
        metrics_lib.log(f'final validation top-1 {self.results["top1"]:.2f}%'
                        + (f' (EMA {self.results["ema_top1"]:.2f}%)' if self.use_ema else '')
                        + f'; TensorBoard logs: {self.writer.logdir}; checkpoints: {self.checkpoints.directory}')
        return self.results

    def train_one_step(self) -> None:
        """One optimizer update (its metrics left on the device), traced when profiling."""
        if self.step == self.profiling_from:
            jax.profiler.start_trace(str(self.workdir / 'profile'))
            self.profiling = True
        batch = _next_batch(self.train.iterator, self.k, self.mesh)
        self.state, metrics = self.train_step(self.state, batch)
        self.step += 1
        self.pending.add(self.step, metrics)
        if self.profiling and self.step == self.profiling_from + self.config.profile_steps:
            jax.block_until_ready(self.state)
            jax.profiler.stop_trace()
            self.profiling = False
            metrics_lib.log(f'profile of steps {self.profiling_from + 1}-{self.step} in {self.workdir / "profile"}')

    def report(self) -> None:
        """Check and log the steps since the last report (``TrainingError`` if one went wrong)."""
        scalars = self.pending.flush()
        if scalars is None:
            return
        step = self.step
        self.skipped_in_epoch += int(scalars.pop('skipped'))
        rates = self.progress.report(step)
        scalars = {f'train/{name}': v for name, v in scalars.items()}
        if step == self.start_step + 1:   # the first step's time is mostly compilation
            self.writer.write(step, scalars)
            metrics_lib.log(f'step {step}/{self.total_steps} loss {scalars["train/loss"]:.4f} '
                            f'(compilation and first step: {rates["elapsed_s"]:.0f}s)')
        else:
            self.writer.write(step, {**scalars, 'train/img_per_s': rates['img_per_s']})
            metrics_lib.log(self.progress.line(step, step / self.steps_per_epoch, scalars, rates))

    def end_epoch(self) -> None:
        """The epoch's count of examples left out (unreadable images), then a new count."""
        self.report()
        self.writer.write(self.step, {'train/skipped_images': self.skipped_in_epoch})
        if self.skipped_in_epoch:
            metrics_lib.log(f'epoch {self.step // self.steps_per_epoch}: {self.skipped_in_epoch} unreadable '
                            'images skipped (data.bad_images=skip)')
        self.skipped_in_epoch = 0

    def evaluate(self) -> None:
        """The raw (and EMA) weights over the whole eval split, into ``self.results``."""
        self.report()
        results = {}
        for prefix, ema in (('', False), ('ema_', True))[: 2 if self.use_ema else 1]:
            batches = self.eval_split.fresh_iterator()
            for name, value in evaluate(self.eval_step, self.state.variables(ema), batches, self.mesh).items():
                results[prefix + name] = value
        self.writer.write(self.step, {f'eval/{name}': v for name, v in results.items()
                                      if name not in ('count', 'ema_count')})
        line = f'eval at step {self.step}: top-1 {results["top1"]:.2f}% top-5 {results["top5"]:.2f}%'
        if self.use_ema:
            line += f' | EMA top-1 {results["ema_top1"]:.2f}% top-5 {results["ema_top5"]:.2f}%'
        metrics_lib.log(line)
        self.results = results

    def save(self, with_results: bool = False) -> None:
        """Checkpoint the current step (asynchronously), ranked by the latest evaluation when
        ``with_results``. Every pending step is checked first: a bad state is never saved."""
        self.report()
        metrics = {n: v for n, v in self.results.items() if 'top' in n} if with_results else None
        meta = {**self._identity(), 'step': self.step, 'data_step': self.step * self.k,
                'epoch': self.step / self.steps_per_epoch, 'skipped_in_epoch': self.skipped_in_epoch,
                'first_loss': self.pending.first_loss, 'config': json.loads(self.config.to_json_best_effort())}
        self.checkpoints.save(self.step, self.state, meta, metrics)

    def preempted(self) -> Dict[str, Any]:
        """SIGTERM: save this step, wait for it, say so on every process."""
        self.save()
        self.checkpoints.wait()
        _log_every_process(f'preempted: saved step {self.step} in {self.checkpoints.directory}; rerun the '
                           'same command to resume')
        return {'preempted': True, 'step': self.step, **self.results}

    def resume_step(self) -> Optional[int]:
        """The newest checkpoint step on disk: where a rerun resumes (None: no checkpoint yet)."""
        steps_on_disk = [int(p.name) for p in self.checkpoints.directory.iterdir() if p.name.isdigit()] \
            if self.checkpoints.directory.exists() else []
        return max(steps_on_disk, default=None)

    def close(self, failure: Optional[BaseException]) -> None:
        """Stop a trace, close the writer, finish the saves under way. A save that fails while
        another error is stopping training is logged; the first error is the one raised."""
        if self.profiling:
            jax.profiler.stop_trace()
        self.writer.close()
        if isinstance(failure, PeerLostError):   # the saves' barriers would wait for the dead process
            self.watchdog.stop(finished=False)
            sharding.exit_on_lost_peer()
            return
        self.watchdog.stop()
        try:
            self.checkpoints.wait()
        except ckpt_lib.CheckpointSaveError as save_error:
            if failure is None:
                raise
            metrics_lib.log(f'also: {save_error}')
        self.checkpoints.close()
