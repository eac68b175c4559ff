"""Where numbers go: TensorBoard event files, a JSON-lines log, and console progress.

Only process 0 writes files (every host computes the same global metrics). Both file writers go
through ``tf.io.gfile`` / ``tf.summary``, so a ``gs://`` workdir works as a local one does.
"""
from __future__ import annotations

import json
import math
import time
from typing import Dict, Mapping, Optional

import jax
import numpy as np
from etils import epath


def _tf():
    """TensorFlow for its file writers only: keep it off the accelerators JAX uses."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:   # already initialised by the input pipeline; it did the same
        pass
    return tf


class MetricWriter:
    """``write(step, {'train/loss': ..})`` -> TensorBoard scalars under ``workdir/tb`` and one
    JSON object per call appended to ``workdir/metrics.jsonl``."""

    def __init__(self, workdir: epath.PathLike, enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.logdir = epath.Path(workdir) / 'tb'
        self.jsonl = epath.Path(workdir) / 'metrics.jsonl'
        self._summary = None
        if self.enabled:
            tf = _tf()
            self._gfile = tf.io.gfile
            self._summary = tf.summary.create_file_writer(str(self.logdir))
            self._tf = tf

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        with self._summary.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=step)
        self._summary.flush()
        record = {'step': int(step), 'time': round(time.time(), 3), **scalars}
        with self._gfile.GFile(str(self.jsonl), 'a') as f:
            f.write(json.dumps(record, allow_nan=True) + '\n')

    def close(self) -> None:
        if self._summary is not None:
            self._summary.close()
            self._summary = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class Progress:
    """Throughput and ETA over the steps since the last report (compile time excluded once the
    first report is done)."""

    def __init__(self, total_steps: int, images_per_step: int, start_step: int = 0):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def report(self, step: int) -> Dict[str, float]:
        now = time.perf_counter()
        steps, elapsed = step - self._last_step, max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        steps_per_s = steps / elapsed
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float('inf')
        return {'img_per_s': steps_per_s * self.images_per_step, 'steps_per_s': steps_per_s, 'eta_s': eta,
                'elapsed_s': elapsed}

    def reset(self, step: int) -> None:
        """Restart the clock (after an evaluation, so it does not count as training time)."""
        self._last_step, self._last_time = step, time.perf_counter()

    def line(self, step: int, epoch: float, scalars: Mapping[str, float], rates: Mapping[str, float]) -> str:
        width = len(str(self.total_steps))
        return (f'step {step:>{width}}/{self.total_steps} epoch {epoch:.2f} '
                f'loss {scalars["train/loss"]:.4f} lr {scalars["train/lr"]:.3e} '
                f'{rates["img_per_s"]:.1f} img/s ETA {_duration(rates["eta_s"])}')


def mean_of(step_metrics) -> Dict[str, float]:
    """Average a list of per-step metric dicts (already on the host)."""
    keys = step_metrics[0].keys()
    return {k: float(np.mean([m[k] for m in step_metrics])) for k in keys}


def log(message: str) -> None:
    """Console progress, from process 0 only (the others would print the same numbers)."""
    if jax.process_index() == 0:
        print(message, flush=True)
