"""Shared test set-up: quiet, single-threaded torch so two pytest-xdist workers share 2 cores."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
import pytest

try:  # timm (torch, torchvision, triton) first: triton's extension segfaults on import once
    import timm  # noqa: F401   # the trainer's libraries (TF, orbax) are loaded
except ImportError:  # runtime-only installs have no torch
    pass


@pytest.fixture(scope='session', autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # runtime-only installs have no torch
        return
    torch.set_num_threads(1)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the project's parity measure."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def randomized_variables(model, images, seed: int = 0):
    """Variables of ``model`` filled on the host with random kernels and random BatchNorm
    statistics and affine parameters (a fresh init hides conversion and folding bugs), without
    compiling ``model.init``."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], 'key', str(path[-1]))
        if name == 'kernel':
            value = rng.standard_normal(leaf.shape) / np.sqrt(max(int(np.prod(leaf.shape[:-1])), 1))
        elif name in ('scale', 'var'):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:   # biases, running means
            value = 0.2 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), images)
    return jax.tree_util.tree_map_with_path(fill, shapes)
