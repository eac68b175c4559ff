"""Checkpoints in the workdir (orbax), preemption, and the workdir's identity.

Layout of a workdir (local or ``gs://``)::

  WORKDIR/config.json           the config of the latest launch (model name included)
  WORKDIR/checkpoints/<step>/   orbax: 'state' (the TrainState pytree) + 'meta' (JSON: model,
                                overrides, num_classes, step, data position, epoch, config)

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact. Kept: the latest ``keep`` steps plus the best one
by the eval metric. SIGTERM (a preemption notice) only sets a flag; the loop saves at the next
step boundary and exits 0. On several hosts the flag comes from JAX's preemption sync point, which
every host reaches at the same step.
"""
from __future__ import annotations

import json
import signal
import threading
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class WorkdirMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model than the config asks for."""


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
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'meta'), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self):
        return self.manager.all_steps()

    def save(self, step: int, state: Any, meta: Dict[str, Any], metrics: Optional[Dict[str, float]] = None) -> None:
        """Write (asynchronously after the device->host copy) unless ``step`` is already saved."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=dict(metrics or {}), force=True)

    def restore_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state saved at ``step``, laid out as ``abstract_state`` (ShapeDtypeStructs with
        shardings) says."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
