"""Devices: multi-host start-up, the mesh, and how arrays are laid out on it.

One mesh axis, 'data', over every device of every host. The batch is split along it and the
train state is replicated, so ``jax.jit`` inserts the gradient all-reduce itself. BatchNorm
reduces over the batch axis of a globally sharded array, so its statistics are those of the
global batch with no extra code (tests/test_sharding.py checks it against one device).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

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

