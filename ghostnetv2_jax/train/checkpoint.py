"""Checkpoints in the workdir (orbax), preemption, and the workdir's identity.

Layout of a workdir (local or ``gs://``)::

  WORKDIR/config.json           the config of the latest launch (model name included)
  WORKDIR/checkpoints/<step>/   orbax: 'state' (the TrainState pytree) + 'meta' (JSON: model,
                                overrides, num_classes, step, data position, epoch, config)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact. What a restore reads is checked: orbax's own
checks (metadata, shapes, dtypes), then each array against the fingerprint saved in 'meta' (a
sum of its bits per leaf), so garbled bytes are never trained on. ``restore_newest`` falls back
from a damaged step to the newest one that restores and moves the damaged ones aside to
``WORKDIR/damaged_checkpoints/``. Kept: the latest ``keep`` steps plus the best one
by the eval metric. SIGTERM (a preemption notice) only sets a flag; the loop saves at the next
step boundary and exits 0. On several hosts the flag comes from JAX's preemption sync point, which
every host reaches at the same step.
"""
from __future__ import annotations

import json
import logging as logging_std
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class WorkdirMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model than the config asks for."""


class CheckpointDamagedError(ValueError):
    """A checkpoint step that cannot be restored, or whose arrays differ from their fingerprint."""


class NoIntactCheckpointError(ValueError):
    """Every checkpoint of a workdir is damaged."""


class CheckpointSaveError(OSError):
    """A checkpoint step could not be written; the steps saved before it are untouched."""


class _QuietBackgroundSaveFailures(logging_std.Filter):
    """Drops the ERROR records (each with a traceback) that orbax's background save threads log
    when a save fails, e.g. four for one full disk: the same failure reaches ``Checkpoints.wait``
    (or ``save``), which raises it as one ``CheckpointSaveError`` line. Other orbax records pass,
    and all of them do at debug verbosity (``--verbosity=1``). Also dropped: the warning that a
    directory opened read-only (reading a workdir's weights) is read-only."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if logging.get_verbosity() >= logging.DEBUG or f'{os.sep}orbax{os.sep}checkpoint{os.sep}' not in record.pathname:
            return True
        if record.levelno == logging_std.WARNING:
            return not record.getMessage().startswith('Given directory is read only')
        if record.levelno < logging_std.ERROR:
            return True
        return not (record.exc_info or 'fail' in record.getMessage().lower())


class _QuietUnretrievedSaveTasks(logging_std.Filter):
    """Drops the asyncio records whose traceback runs through orbax's checkpoint code: when a
    save fails (a full disk), orbax's write tasks left unawaited log "Task exception was never
    retrieved" with a traceback once the garbage collector reaches them, at a moment that depends
    on the collector. The failure itself is raised by ``Checkpoints.wait`` as one
    ``CheckpointSaveError`` line. Every other asyncio record passes, and all of them do at debug
    verbosity."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if logging.get_verbosity() >= logging.DEBUG or not record.exc_info:
            return True
        tb = record.exc_info[2]
        while tb is not None:
            if f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


_QUIET = _QuietBackgroundSaveFailures()
_QUIET_TASKS = _QuietUnretrievedSaveTasks()


def _quiet_closed_loop_callbacks(unraisable) -> None:
    """``sys.unraisablehook`` that drops what the storage layer's pending callbacks raise once a
    failed save has closed orbax's event loop (tensorstore calls ``call_soon_threadsafe`` on it:
    asyncio's ``_check_closed`` raises, over a hundred times for one full disk); everything else,
    and everything at debug verbosity, goes to the previous hook."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    closed_loop = (unraisable.exc_type is RuntimeError and tb is not None
                   and tb.tb_frame.f_code.co_name == '_check_closed'
                   and tb.tb_frame.f_code.co_filename.endswith(os.path.join('asyncio', 'base_events.py')))
    if not closed_loop or logging.get_verbosity() >= logging.DEBUG:
        _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


# What must agree between a checkpoint and the model a config builds.
IDENTITY_KEYS = ('model', 'model_overrides', 'num_classes')


class Checkpoints:
    """Orbax ``CheckpointManager`` over ``workdir/checkpoints``: keep-last-N plus best-by-metric."""

    def __init__(self, workdir: epath.PathLike, keep: int = 3, best_metric: Optional[str] = 'ema_top1',
                 read_only: bool = False):
        self.directory = epath.Path(workdir) / 'checkpoints'
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
        best_fn = None
        if best_metric:
            # Checkpoints saved between evaluations carry empty metrics and never rank as best.
            best_fn = lambda metrics: float(metrics.get(best_metric, float('-inf')))
            policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, n=1,
                                                          keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn, best_mode='max', read_only=read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        logging.get_absl_logger().addFilter(_QUIET)   # a failed save is one line (CheckpointSaveError)
        logging_std.getLogger('asyncio').addFilter(_QUIET_TASKS)
        self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'), options=options)
        self._pending: List[int] = []   # saved steps not yet checked on disk (see wait)
        sys.unraisablehook = _quiet_closed_loop_callbacks

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self):
        return self.manager.all_steps()

    def save(self, step: int, state: Any, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None) -> None:
        """Write (asynchronously after the device->host copy) unless ``step`` is already saved.
        The previous save is finished and checked first (``wait``); a save that cannot be made
        raises ``CheckpointSaveError`` naming the step."""
        self.wait()
        path = self.directory / str(step)
        if path.exists() and not path.is_dir():   # orbax would list it as a step and skip the save
            raise CheckpointSaveError(f'cannot save step {step}: {path} exists and is not a checkpoint '
                                      'directory; the earlier checkpoints are intact')
        if step in self.manager.all_steps():
            return
        meta = {**meta, 'fingerprint': fingerprint(state)}   # checked by restore_newest
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)),
                              metrics=dict(metrics or {}), force=True)
        except Exception as error:
            raise CheckpointSaveError(f'saving step {step} in {self.directory} failed: {_why(error)}; '
                                      'the earlier checkpoints are intact') from error
        self._pending.append(step)

    def restore_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state saved at ``step``, laid out as ``abstract_state`` (ShapeDtypeStructs with
        shardings) says."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored['state']

    def set_aside(self, step: int) -> epath.Path:
        """Move a damaged step out of the manager's directory (to ``WORKDIR/damaged_checkpoints/``,
        never deleted), so that a new save of the same step does not meet it; returns where."""
        source = self.directory / str(step)
        dest_dir = self.directory.parent / 'damaged_checkpoints'
        dest = dest_dir / str(step)
        if jax.process_index() == 0:
            dest_dir.mkdir(parents=True, exist_ok=True)
            n = 1
            while dest.exists():
                n += 1
                dest = dest_dir / f'{step}.{n}'
            source.rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f'set_aside_{step}')
        self.manager.reload()
        return dest

    def wait(self) -> None:
        """Finish the saves under way and check that each step is on disk with both items:
        ``CheckpointSaveError`` naming the step otherwise."""
        pending, self._pending = self._pending, []
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise CheckpointSaveError(f'saving step {", ".join(map(str, pending)) or "?"} in {self.directory} '
                                      f'failed: {_why(error)}; the earlier checkpoints are intact') from error
        for step in pending:
            missing = [item for item in ('state', 'meta') if not (self.directory / str(step) / item).is_dir()]
            if missing:
                raise CheckpointSaveError(f'checkpoint step {step} was not written: {self.directory / str(step)} '
                                          f'lacks {" and ".join(missing)}; the earlier checkpoints are intact')

    def close(self) -> None:
        self.manager.close()


def fingerprint(tree: Any) -> List[int]:
    """Per leaf of ``tree``, the sum of its elements' bits as uint32 (wrapping): cheap to compute
    on the devices, and any change of a stored byte changes it (but for a 2^-32 chance)."""
    return [int(x) for x in jax.device_get(_fingerprints(jax.tree.leaves(tree)))]


@jax.jit
def _fingerprints(leaves: Sequence[jax.Array]) -> List[jax.Array]:
    def bits(x: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            return x.astype(jnp.uint32)
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    return [jnp.sum(bits(x), dtype=jnp.uint32) for x in leaves]


def verify(state: Any, meta: Dict[str, Any], step: int) -> None:
    """Raise ``CheckpointDamagedError`` when a restored leaf's fingerprint differs from the saved
    one (checkpoints written without fingerprints pass)."""
    saved = meta.get('fingerprint')
    if saved is None:
        return
    got = fingerprint(state)
    if len(got) != len(saved):
        raise CheckpointDamagedError(f'step {step}: {len(got)} arrays restored, {len(saved)} saved')
    bad = [jax.tree_util.keystr(path) for (path, _), a, b in
           zip(jax.tree_util.tree_flatten_with_path(state)[0], got, saved) if a != b]
    if bad:
        raise CheckpointDamagedError(f'step {step}: {len(bad)} array(s) differ from what was saved, '
                                     f'first {bad[0]}')


def _why(error: BaseException) -> str:
    """The error on one short line: its start and its end, then the operating system's reason
    ('No space left on device') where the storage layer reports an errno (an ``OSError`` in the
    chain of causes, or tensorstore's ``os_error_code``), which a long message would cut."""
    text = ' '.join(str(error).split()) or type(error).__name__
    short = text if len(text) <= 200 else text[:110] + ' ... ' + text[-85:]
    code = _errno(error)
    reason = os.strerror(code) if code else None
    return short if reason is None or reason in short else f'{short} ({reason})'


def _errno(error: Optional[BaseException]) -> Optional[int]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        found = re.search(r"os_error_code='?(\d+)", str(error))   # tensorstore's structured field
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def restore_newest(checkpoints: Checkpoints, restore: Callable[[int, Dict[str, Any]], Any], *,
                   check: Optional[Callable[[Dict[str, Any]], None]] = None,
                   steps: Optional[Sequence[int]] = None, set_aside: bool = True,
                   log: Callable[[str], None] = logging.warning) -> Optional[Tuple[int, Dict[str, Any], Any]]:
    """(step, meta, state) of the newest of ``steps`` (default: every saved step) that restores:
    its meta reads, ``restore(step, meta)`` succeeds and the state matches its fingerprint. ``check(meta)``
    may raise to stop at once (another model's workdir is not damage). Each damaged step is one
    ``log`` line naming it and why; once an intact step is found, the damaged newer ones are moved
    aside (``set_aside``), so the run goes on from there and saves those steps again. None when
    there are no checkpoints; ``NoIntactCheckpointError`` when none restores (nothing is moved)."""
    candidates = sorted(checkpoints.all_steps() if steps is None else steps, reverse=True)
    damaged: List[int] = []
    for step in candidates:
        try:
            meta = checkpoints.restore_meta(step)
        except Exception as error:   # orbax and tensorstore raise many types for bad bytes
            damaged.append(step)
            log(f'checkpoint {checkpoints.directory}/{step} cannot be restored: metadata: {_why(error)}')
            continue
        if check is not None:
            check(meta)
        try:
            state = restore(step, meta)
            verify(state, meta, step)
        except Exception as error:
            damaged.append(step)
            log(f'checkpoint {checkpoints.directory}/{step} cannot be restored: {_why(error)}')
            continue
        for bad in damaged:
            where = checkpoints.set_aside(bad) if set_aside else None
            log(f'checkpoint step {bad} is damaged; ' + (f'moved to {where}; ' if where else '')
                + f'going on from step {step}')
        return step, meta, state
    if not candidates:
        return None
    raise NoIntactCheckpointError(
        f'no checkpoint in {checkpoints.directory} restores (steps {", ".join(map(str, candidates))}: '
        'see the lines above); nothing was moved or deleted. Train in a fresh --workdir, optionally '
        'starting from weights with --config.init_from')


def check_identity(meta: Dict[str, Any], expected: Dict[str, Any], where: str) -> None:
    """Raise ``WorkdirMismatchError`` naming what differs between a checkpoint and the config."""
    diffs = [f'{k}: checkpoint has {meta.get(k)!r}, config gives {expected.get(k)!r}'
             for k in IDENTITY_KEYS if _canonical(meta.get(k)) != _canonical(expected.get(k))]
    if diffs:
        raise WorkdirMismatchError(f'{where} holds a checkpoint of another model ({"; ".join(diffs)}); '
                                   'use a fresh --workdir')


def _canonical(value: Any) -> str:
    """JSON text with tuples as lists, so a value read back from JSON compares equal."""
    return json.dumps(value, sort_keys=True, default=str)


def write_config(workdir: epath.PathLike, config_json: str) -> None:
    """Record the launch config in the workdir (process 0 only); written whole, then renamed."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / 'config.json'
    tmp = path.parent / f'{path.name}.tmp'
    tmp.write_text(config_json)
    tmp.replace(path)


class PreemptionGuard:
    """Turns SIGTERM into a flag the training loop polls between steps.

    Single process: a Python signal handler (restored on ``close``). Several processes: JAX's
    preemption sync point (set up by ``jax.distributed.initialize``), which all hosts agree on, so
    every host saves the same step.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        logging.warning('SIGTERM received: saving a checkpoint at the next step boundary, then exiting')
        self._event.set()

    def requested(self, step: int, checkpoints: Optional[Checkpoints] = None) -> bool:
        if self._event.is_set():
            return True
        return checkpoints is not None and jax.process_count() > 1 and checkpoints.manager.reached_preemption(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
