"""Devices: multi-host start-up, the mesh, and how arrays are laid out on it.

One mesh axis, 'data', over every device of every host. The batch is split along it and the
train state is replicated, so ``jax.jit`` inserts the gradient all-reduce itself. BatchNorm
reduces over the batch axis of a globally sharded array, so its statistics are those of the
global batch with no extra code (tests/test_sharding.py checks it against one device).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# Environment variables that mean "this process is one of several" to jax.distributed.
_MULTIHOST_ENV = {
    'JAX_COORDINATOR_ADDRESS': lambda v: bool(v),
    'SLURM_NTASKS': lambda v: int(v or 1) > 1,
    'OMPI_COMM_WORLD_SIZE': lambda v: int(v or 1) > 1,
    'TPU_WORKER_HOSTNAMES': lambda v: len([h for h in v.split(',') if h]) > 1,
    'MEGASCALE_COORDINATOR_ADDRESS': lambda v: bool(v),
}


def multihost_requested(mode: str = 'auto', environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to call ``jax.distributed.initialize()``: 'yes', 'no', or 'auto' (the cluster
    environment says there are several processes: TPU pod slice, SLURM, Open MPI, or an
    explicit ``JAX_COORDINATOR_ADDRESS``)."""
    if mode not in ('auto', 'yes', 'no'):
        raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', got {mode!r}")
    if mode != 'auto':
        return mode == 'yes'
    for name, test in _MULTIHOST_ENV.items():
        try:
            if name in environ and test(environ[name]):
                return True
        except ValueError:
            continue
    return False


def initialize_distributed(mode: str = 'auto') -> None:
    """Join the other hosts (must run before anything touches a JAX backend)."""
    if multihost_requested(mode):
        jax.distributed.initialize()   # cluster auto-detection: TPU metadata, SLURM, MPI, env
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

