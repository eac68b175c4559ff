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
