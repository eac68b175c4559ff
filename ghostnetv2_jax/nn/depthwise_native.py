"""Depthwise convolution as XLA:CPU custom calls (``depthwise_cpu.cc``), built on first use.

The C++ source ships in the package. ``load()`` compiles it once per machine with the system C++
compiler against jaxlib's FFI headers (about 3 s), caches the library, and registers its three
handlers with XLA. The cache key covers the source, the flags, the jaxlib version and the CPU's
instruction-set flags (the library is built with ``-march=native``), so a cache directory shared
between different machines or jaxlib versions never serves a stale or illegal binary.

When there is no compiler, or the build fails, ``load()`` returns False with the reason in
``load_error()``, and ``impl='auto'`` falls back to the portable shift form.

Environment:
  GHOSTNETV2_NATIVE=0          never build or use the native kernels
  GHOSTNETV2_CACHE_DIR=DIR     where built libraries go (default: $XDG_CACHE_HOME or ~/.cache,
                               then ghostnetv2_jax/native)
  CXX                          the compiler (default: c++)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name('depthwise_cpu.cc')
CXXFLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
TARGETS = {  # XLA custom-call name -> exported handler symbol
    'gnv2_depthwise_forward': 'Gnv2DepthwiseForward',
    'gnv2_depthwise_grad_input': 'Gnv2DepthwiseGradInput',
    'gnv2_depthwise_grad_kernel': 'Gnv2DepthwiseGradKernel',
}

_lock = threading.Lock()
_state: dict = {}


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    info = ''
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith(('flags', 'model name', 'Features', 'CPU part')):
                info += line + '\n'
                if line.startswith(('flags', 'Features')):
                    break
    except OSError:
        pass
    return platform.machine() + '\n' + info


def _cache_dir() -> Path:
    if os.environ.get('GHOSTNETV2_CACHE_DIR'):
        return Path(os.environ['GHOSTNETV2_CACHE_DIR'])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'ghostnetv2_jax' / 'native'


def _compiler() -> Optional[str]:
    if os.environ.get('CXX'):   # an explicit choice is used or fails; never silently replaced
        return shutil.which(os.environ['CXX'])
    return shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')


def library_path() -> Path:
    """Where the library for this source, compiler flags, jaxlib and CPU lives (built or not)."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), ' '.join(CXXFLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_signature().encode(), (_compiler() or '').encode()):
        key.update(part)
    return _cache_dir() / f'depthwise_cpu-{key.hexdigest()[:16]}.so'


def build(path: Path) -> Path:
    """Compile the library to ``path`` (atomically: parallel builders never see half a file)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', '')!r}; install g++ or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, '-isystem', jax.ffi.include_dir(), str(SOURCE), '-o', tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'building {SOURCE.name} failed:\n{proc.stderr.strip()}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load_and_register():
    path = library_path()
    if not path.exists():
        build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
    return lib


def load() -> bool:
    """Build (once), load and register the kernels. False if disabled or unavailable."""
    with _lock:
        if 'ok' not in _state:
            if os.environ.get('GHOSTNETV2_NATIVE', '1') == '0':
                _state.update(ok=False, error='disabled by GHOSTNETV2_NATIVE=0')
            else:
                try:
                    _state['lib'] = _load_and_register()
                    _state.update(ok=True, error=None)
                except Exception as e:  # no compiler, failed build, unloadable library
                    _state.update(ok=False, error=f'{type(e).__name__}: {e}')
        return _state['ok']


def load_error() -> Optional[str]:
    """Why ``load()`` returned False (None if it has not, or has not been called)."""
    return _state.get('error')


# ----------------------------------------------------------------------------- the op
# Each custom call is independent per example (the kernel gradient is returned per example and
# summed outside), so under a batch-sharded jit every device runs it on its own examples: the
# sharding rule lets the batch factor ``n`` be sharded and keeps every other dimension whole.
_RULES = {
    'gnv2_depthwise_forward': 'n h w c, i j k c -> n p q c',
    'gnv2_depthwise_grad_input': 'n p q c, i j k c -> n h w c',
    'gnv2_depthwise_grad_kernel': 'n h w c, n p q c -> n i j k c',
}


def _attrs(strides, padding):
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return dict(stride_h=np.int64(sh), stride_w=np.int64(sw), pad_top=np.int64(pt), pad_left=np.int64(pl))


def _local_out_shape(target, a, b, geometry):
    """Output shape of ``target`` for operands ``a``, ``b`` (global or per-device shapes)."""
    strides, padding, in_hw, kernel_hw = geometry
    n, c = a.shape[0], a.shape[-1]
    if target == 'gnv2_depthwise_forward':
        return _out_shape(a.shape, b.shape[:2], strides, padding)
    if target == 'gnv2_depthwise_grad_input':
        return (n, *in_hw, c)
    return (n, *kernel_hw, 1, c)


def _ffi(target, geometry, a, b):
    strides, padding = geometry[:2]
    out = jax.ShapeDtypeStruct(_local_out_shape(target, a, b, geometry), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method='sequential')(a, b, **_attrs(strides, padding))


def _batch_sharding(mesh, sharding, rank):
    """``sharding``'s partitioning of the batch dimension alone (everything else whole)."""
    from jax.sharding import NamedSharding, PartitionSpec
    spec = getattr(sharding, 'spec', None)
    batch = spec[0] if spec else None
    return NamedSharding(mesh, PartitionSpec(batch, *([None] * (rank - 1))))


def _partitioned(target):
    from jax.experimental.custom_partitioning import custom_partitioning

    def call(geometry, a, b):
        return _ffi(target, geometry, a, b)

    call = custom_partitioning(call, static_argnums=(0,))

    def infer(geometry, mesh, arg_shapes, result_shape):
        return _batch_sharding(mesh, arg_shapes[0].sharding, len(result_shape.shape))

    def partition(geometry, mesh, arg_shapes, result_shape):
        batch = lambda shape, rank: _batch_sharding(mesh, arg_shapes[0].sharding, rank)
        from jax.sharding import NamedSharding, PartitionSpec
        args = tuple(batch(s, len(s.shape)) if target == 'gnv2_depthwise_grad_kernel' or i == 0
                     else NamedSharding(mesh, PartitionSpec()) for i, s in enumerate(arg_shapes))
        return mesh, (lambda a, b: _ffi(target, geometry, a, b)), batch(None, len(result_shape.shape)), args

    rule = _RULES[target]
    # Every factor but n and c must stay whole, listed in order of first appearance (Shardy
    # requires its special factors sorted).
    whole = tuple(dict.fromkeys(f for f in rule.replace(',', ' ').split() if f not in ('n', 'c', '->')))
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       need_replication_factors=whole)
    return call


@functools.lru_cache(maxsize=None)
def _op(target, geometry):
    """``target`` for one geometry, partitionable and vmappable. Under vmap the mapped axis is
    folded into the batch axis (the custom calls are per example), except over a mapped kernel,
    which gets one call per element."""
    partitioned = _partitioned(target)

    @jax.custom_batching.custom_vmap
    def op(a, b):
        return partitioned(geometry, a, b)

    @op.def_vmap
    def _rule(axis_size, in_batched, a, b):
        a_mapped, b_mapped = in_batched
        kernel_operand = target != 'gnv2_depthwise_grad_kernel'
        if kernel_operand and b_mapped:
            a = a if a_mapped else jnp.broadcast_to(a, (axis_size, *a.shape))
            return jax.lax.map(lambda ab: op(*ab), (a, b)), True
        fold = lambda v: v.reshape(-1, *v.shape[2:])
        a = fold(a if a_mapped else jnp.broadcast_to(a, (axis_size, *a.shape)))
        if not kernel_operand:
            b = fold(b if b_mapped else jnp.broadcast_to(b, (axis_size, *b.shape)))
        out = op(a, b)
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return op


def _call(target, geometry, a, b):
    if not load():
        raise RuntimeError(f"depthwise impl 'native' is unavailable: {load_error()}")
    return _op(target, geometry)(a.astype(jnp.float32), b.astype(jnp.float32))


def _out_shape(x_shape, kernel_hw, strides, padding):
    n, h, w, c = x_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel_hw, strides, padding
    return n, (h + sum(ph) - kh) // sh + 1, (w + sum(pw) - kw) // sw + 1, c


def _geometry(x_shape, kernel_shape, strides, padding):
    return strides, padding, tuple(x_shape[1:3]), tuple(kernel_shape[:2])


def _forward(x, kernel, strides, padding):
    geometry = _geometry(x.shape, kernel.shape, strides, padding)
    return _call('gnv2_depthwise_forward', geometry, x, kernel).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    geometry = _geometry(x.shape, kernel.shape, strides, padding)
    dx = _call('gnv2_depthwise_grad_input', geometry, g, kernel)
    dk = jnp.sum(_call('gnv2_depthwise_grad_kernel', geometry, x, g), axis=0)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_native(x, kernel, strides: Sequence[int], padding: Sequence[Sequence[int]]):
    """Depthwise cross-correlation (NHWC ``x``, (kh, kw, 1, C) ``kernel``, explicit padding) on
    XLA:CPU custom calls. Computes in float32 (other dtypes are cast in and out)."""
    padding: Tuple = tuple(tuple(int(v) for v in p) for p in padding)
    if any(v < 0 for p in padding for v in p):
        raise ValueError(f"depthwise impl 'native' needs non-negative padding, got {padding}")
    return _depthwise(x, kernel, tuple(int(v) for v in strides), padding)


def main() -> int:
    """Build now and say where, or why not (``make`` runs this after installing)."""
    if load():
        print(f'native depthwise kernels: {library_path()}')
        return 0
    print(f'native depthwise kernels unavailable ({load_error()}); CPU runs use the shift form')
    return 1
