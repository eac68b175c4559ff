"""Shared test set-up: quiet, single-threaded torch so two pytest-xdist workers share 2 cores;
tests that need PyTorch (torch, timm, the parity module) are marked ``torch`` and, where torch is
not installed (the newest-JAX environment of ``make test-latest``), not collected or run."""
import ast
import importlib.util
import inspect
import os
import pathlib
import re

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np
import pytest

try:  # timm (torch, torchvision, triton) first: triton's extension segfaults on import once
    import timm  # noqa: F401   # the trainer's libraries (TF, orbax) are loaded
except ImportError:  # runtime-only installs have no torch
    pass

HAVE_TORCH = importlib.util.find_spec('torch') is not None and importlib.util.find_spec('timm') is not None
_TORCH_NAMES = re.compile(r'\b(torch|timm|parity)\b')


def _imports_torch_at_module_level(path: pathlib.Path) -> bool:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split('.')[0])
            if node.module == 'ghostnetv2_jax':
                names |= {a.name for a in node.names}
            if node.module.startswith('test_'):   # another test module's helpers
                other = path.with_name(node.module + '.py')
                if other.exists() and _imports_torch_at_module_level(other):
                    names.add('torch')
    return bool(names & {'torch', 'timm', 'torchvision', 'parity'})


def pytest_configure(config):
    config.addinivalue_line('markers', 'torch: needs PyTorch and timm (the parity reference)')


def pytest_ignore_collect(collection_path, config):
    """Without torch, a test module that imports it at the top is not collected."""
    path = pathlib.Path(collection_path)
    return (not HAVE_TORCH and path.suffix == '.py' and path.name.startswith('test_')
            and _imports_torch_at_module_level(path)) or None


def pytest_collection_modifyitems(config, items):
    """Mark ``torch`` every test whose module imports torch, timm or the parity module at the top,
    or whose function or fixtures name them; skip them where torch is not installed."""
    module_level = {}
    for item in items:
        path = pathlib.Path(str(item.fspath))
        if path not in module_level:
            module_level[path] = _imports_torch_at_module_level(path)
        sources = [item.function] if hasattr(item, 'function') else []
        sources += [d.func for defs in getattr(item, '_fixtureinfo').name2fixturedefs.values() for d in defs
                    if getattr(d.func, '__module__', '') != __name__] if hasattr(item, '_fixtureinfo') else []
        uses = module_level[path] or any(_TORCH_NAMES.search(_source(f)) for f in sources)
        if uses or item.get_closest_marker('torch'):
            item.add_marker(pytest.mark.torch)
            if not HAVE_TORCH:
                item.add_marker(pytest.mark.skip(reason='needs torch and timm (make test runs it)'))


def _source(function) -> str:
    """A function's source from its ``def`` on (its decorators may name markers)."""
    try:
        text = inspect.getsource(function)
    except (OSError, TypeError):
        return ''
    start = re.search(r'^\s*(async\s+)?def\s', text, re.M)
    return text[start.start():] if start else text


def shared_compile_cache(tmp_path_factory) -> pathlib.Path:
    """One persistent XLA cache for the session's own processes (both xdist workers and the
    notebook kernels): tests compile the same models at the same sizes many times over."""
    return tmp_path_factory.getbasetemp().parent / 'ghostnetv2_test_xla_cache'


@pytest.fixture(scope='session', autouse=True)
def _compile_cache(tmp_path_factory):
    import jax
    jax.config.update('jax_compilation_cache_dir', str(shared_compile_cache(tmp_path_factory)))


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
