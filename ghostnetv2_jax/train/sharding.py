"""Devices: multi-host start-up, the mesh, and how arrays are laid out on it.

One mesh axis, 'data', over every device of every host. The batch is split along it and the
train state is replicated, so ``jax.jit`` inserts the gradient all-reduce itself. BatchNorm
reduces over the batch axis of a globally sharded array, so its statistics are those of the
global batch with no extra code (tests/test_sharding.py checks it against one device).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# Environment variables that mean "this process is one of several" to jax.distributed.
_MULTIHOST_ENV = {
    'JAX_COORDINATOR_ADDRESS': lambda v: bool(v),
    'JAX_NUM_PROCESSES': lambda v: int(v or 1) > 1,
    'SLURM_NTASKS': lambda v: int(v or 1) > 1,
    'OMPI_COMM_WORLD_SIZE': lambda v: int(v or 1) > 1,
    'TPU_WORKER_HOSTNAMES': lambda v: len([h for h in v.split(',') if h]) > 1,
    'MEGASCALE_COORDINATOR_ADDRESS': lambda v: bool(v),
}
# Cluster managers whose environment jax.distributed reads the process count and id from.
_CLUSTER_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                'MEGASCALE_COORDINATOR_ADDRESS')


def multihost_requested(mode: str = 'auto', environ: Mapping[str, str] = os.environ,
                        num_processes: int = 0) -> bool:
    """Whether to call ``jax.distributed.initialize()``: 'yes', 'no', or 'auto' (several
    processes are asked for: ``num_processes`` > 1, or the environment of a TPU pod slice,
    SLURM, Open MPI, or an explicit ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES``)."""
    if mode not in ('auto', 'yes', 'no'):
        raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode != 'auto':
        return mode == 'yes'
    if num_processes > 1:
        return True
    for name, test in _MULTIHOST_ENV.items():
        try:
            if name in environ and test(environ[name]):
                return True
        except ValueError:
            continue
    return False


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, '').strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'{name}={value!r} is not an integer') from None


def distributed_args(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
                     environ: Mapping[str, str] = os.environ) -> Dict[str, Any]:
    """``jax.distributed.initialize``'s arguments: each config value when set, else its
    environment variable (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``), else left to jax's cluster detection. Without a cluster manager the
    three must come together; a clear error otherwise."""
    args = {'coordinator_address': coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None,
            'num_processes': num_processes if num_processes > 0 else _env_int(environ, 'JAX_NUM_PROCESSES'),
            'process_id': process_id if process_id >= 0 else _env_int(environ, 'JAX_PROCESS_ID')}
    given = {name for name, value in args.items() if value is not None}
    managed = any(environ.get(name) for name in _CLUSTER_ENV)
    if given and len(given) < 3 and not managed:
        raise ValueError(
            'a multi-process launch without a cluster manager needs the coordinator address, the '
            'process count and this process\'s id together (JAX_COORDINATOR_ADDRESS, '
            'JAX_NUM_PROCESSES and JAX_PROCESS_ID, or --config.coordinator_address, '
            f'--config.num_processes and --config.process_id); missing: '
            f'{", ".join(sorted(set(args) - given))}')
    if len(given) == 3 and not 0 <= args['process_id'] < args['num_processes']:
        raise ValueError(f'process id {args["process_id"]} is not in [0, {args["num_processes"]})')
    return {name: value for name, value in args.items() if value is not None}


def initialize_distributed(mode: str = 'auto', coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Join the other processes (must run before anything touches a JAX backend). The launch
    is given by the arguments (the config) or the environment (``distributed_args``)."""
    if multihost_requested(mode, num_processes=num_processes):
        jax.distributed.initialize(**distributed_args(coordinator_address, num_processes, process_id))
        logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def create_mesh() -> Mesh:
    """A 1-D mesh over all devices (of all hosts). Auto axes: the model stays sharding-agnostic and
    XLA propagates the batch sharding (explicit axes would make every reshape in the model name
    its output sharding)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch(global_batch: int, what: str = 'batch_size') -> int:
    """The per-host share of ``global_batch``; a clear error when devices cannot split it."""
    n = jax.device_count()
    if global_batch <= 0 or global_batch % n:
        raise ValueError(f'{what}={global_batch} must be a positive multiple of the device count ({n})')
    return global_batch // jax.process_count()


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays sharded over 'data' (every host passes its part)."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}



# ----------------------------------------------------------------------------- lost peers
PEER_TIMEOUT_ENV = 'GHOSTNETV2_PEER_TIMEOUT_S'
DEFAULT_PEER_TIMEOUT_S = 30.0   # under jax.distributed's 100 s heartbeat timeout, which aborts


def peer_lost_message(why: str, resume_step: Optional[int]) -> str:
    where = (f'resumes from step {resume_step}' if resume_step is not None else 'starts from step 0 '
             '(no checkpoint was saved)')
    return f'a peer process was lost ({why}); rerunning the same command on every process {where}'


def exit_on_lost_peer() -> None:
    """After a lost peer, leaving normally would wait in jax.distributed's shutdown barrier for the
    dead process (minutes), then abort with a C++ stack dump: once the error is printed and the
    interpreter starts to exit, leave at once with status 1 (atexit runs this before jax's own
    handler, registered earlier)."""
    import atexit

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    atexit.register(leave)


class PeerWatchdog:
    """Notices a lost peer process: each process beats once a second through the coordination
    service's key-value store and watches the others' beats.

    jax.distributed's own heartbeat check cannot be hooked from Python: when it notices a dead
    process (after 100 s) it aborts this one with a C++ stack dump (its ``missed_heartbeat_callback``
    cannot take a Python function in jaxlib 0.10). Here, a peer silent for ``timeout`` seconds
    after its first beat (``GHOSTNETV2_PEER_TIMEOUT_S``, default 30, under jax's 100), or a
    coordination service that cannot be reached (process 0 is gone), ends this process with one
    line on stderr (``error: a peer process was lost ...; ... resumes from step N``) and exit status
    1; ``resume_step()`` says which step a rerun resumes from. A collective whose peer died fails at
    once: ``lost_peer()`` then tells, from the beats, whether that was the cause. A process that
    finishes says so (``stop``), so its peers do not take its silence for a loss. A no-op on one
    process.
    """

    def __init__(self, resume_step: Callable[[], Optional[int]], timeout: Optional[float] = None,
                 run_id: str = 'train'):
        self.resume_step = resume_step
        self.timeout = float(os.environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S) if timeout is None else timeout)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._beats: Dict[int, tuple] = {}       # peer -> (its last beat, when it last changed)
        self._unreachable: Optional[str] = None  # why the coordination service cannot be read
        self._thread = None
        self._client = None
        self._prefix = f'ghostnetv2/{run_id}/beat/'
        if jax.process_count() > 1 and self.timeout > 0:
            from jax._src import distributed   # the client jax.distributed.initialize made
            self._client = distributed.global_state.client
        if self._client is not None:
            self._thread = threading.Thread(target=self._watch, name='peer-watchdog', daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        me, beat = jax.process_index(), 0
        with self._lock:
            self._beats = {p: (None, time.monotonic()) for p in range(jax.process_count()) if p != me}
        while not self._stop.wait(1.0):
            beat += 1
            try:
                self._client.key_value_set(f'{self._prefix}{me}', str(beat), allow_overwrite=True)
                values = {int(key.rsplit('/', 1)[-1]): value
                          for key, value in self._client.key_value_dir_get(self._prefix)}
            except Exception as error:   # noqa: BLE001  the service (on process 0) is unreachable
                with self._lock:
                    self._unreachable = ('the coordination service on process 0 cannot be reached: '
                                         + ' '.join(str(error).split())[:160])
                self._lost(self._unreachable)
                return
            now = time.monotonic()
            with self._lock:
                for p in list(self._beats):
                    value = values.get(p)
                    if value == 'done':
                        del self._beats[p]
                    elif value != self._beats[p][0]:
                        self._beats[p] = (value, now)
            why = self._silent(self.timeout)
            if why:
                self._lost(why)

    def _silent(self, seconds: float) -> Optional[str]:
        """Why a peer counts as lost when silence of ``seconds`` is enough; None if none is.
        (A peer is timed from its first beat: one still setting up has not beaten yet.)"""
        now = time.monotonic()
        with self._lock:
            if self._unreachable:
                return self._unreachable
            for p, (value, since) in sorted(self._beats.items()):
                if value is not None and now - since > seconds:
                    return f'process {p} sent no heartbeat for {now - since:.0f} s'
        return None

    def lost_peer(self, within: float = 3.0) -> Optional[str]:
        """After a failed collective: why a peer is gone, if one is (its beats stopped for more
        than ``within`` seconds, waited for here), else None (the failure has another cause)."""
        if self._thread is None:
            return None
        deadline = time.monotonic() + within + 1.5   # a beat a second, and the watcher's own turn
        while time.monotonic() < deadline:
            why = self._silent(within)
            if why:
                return why
            time.sleep(0.25)
        return None

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return
        try:
            step = self.resume_step()
        except Exception:   # noqa: BLE001
            step = None
        sys.stdout.flush()
        print(f'error: {peer_lost_message(why, step)}', file=sys.stderr, flush=True)
        os._exit(1)

    def stop(self, finished: bool = True) -> None:
        """Stop watching; with ``finished`` tell the peers this process is done, not lost."""
        if self._client is None or self._stop.is_set():
            return
        self._stop.set()
        if finished:
            try:
                self._client.key_value_set(f'{self._prefix}/{jax.process_index()}', 'done', allow_overwrite=True)
            except Exception:   # noqa: BLE001
                pass
