"""Build, cache and load the C++ kernel library (``csrc/*.cc``) and register its XLA handlers.

The sources ship in the package. ``load()`` compiles them once per machine with the system C++
compiler against jaxlib's FFI headers (a few seconds), caches the library, and registers its
handlers with XLA for the CPU platform. The cache key covers the sources, the flags, the jaxlib
version, the compiler and the CPU's instruction-set flags (the library is built with
``-march=native``), so a cache directory shared between machines or jaxlib versions never serves
a stale or illegal binary.

When there is no compiler, or the build fails, ``load()`` returns False with the reason in
``load_error()``; the layers then use their portable forms.

Environment:
  GHOSTNETV2_NATIVE=0          never build or use the native kernels
  GHOSTNETV2_CACHE_DIR=DIR     where built libraries go (default: $XDG_CACHE_HOME or ~/.cache,
                               then ghostnetv2_jax/native; a per-user directory under the system
                               temporary directory when that is not writable)
  CXX                          the compiler (default: c++)
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional

import jax
import jaxlib

SOURCE_DIR = Path(__file__).with_name('csrc')
CXXFLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
HANDLERS = {  # XLA custom-call target -> exported handler symbol
    'gnv2_depthwise_forward': 'Gnv2DepthwiseForward',
    'gnv2_depthwise_grad_input': 'Gnv2DepthwiseGradInput',
    'gnv2_depthwise_grad_kernel': 'Gnv2DepthwiseGradKernel',
    'gnv2_ghost_module_after_primary': 'Gnv2GhostModuleAfterPrimary',
    'gnv2_ghost_module_after_primary_gated': 'Gnv2GhostModuleAfterPrimaryGated',
    'gnv2_ghost_module': 'Gnv2GhostModule',
    'gnv2_ghost_module_gated': 'Gnv2GhostModuleGated',
    'gnv2_ghost_module_strided': 'Gnv2GhostModuleStrided',
    'gnv2_ghost_module_strided_gated': 'Gnv2GhostModuleStridedGated',
    'gnv2_stem_conv': 'Gnv2StemConv',
    'gnv2_batchnorm_moments': 'Gnv2BatchNormMoments',
    'gnv2_batchnorm_grad_sums': 'Gnv2BatchNormGradSums',
}

_lock = threading.Lock()
_state: dict = {}


def sources() -> List[Path]:
    """The library's translation units (compiled together) and headers (part of the cache key)."""
    return sorted(SOURCE_DIR.glob('*.cc'))


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
    path = Path(base) / 'ghostnetv2_jax' / 'native'
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    # a read-only or missing home (some CI and batch systems): a per-user temporary directory
    return Path(tempfile.gettempdir()) / f'ghostnetv2_jax-{os.getuid()}' / 'native'


def _compiler() -> Optional[str]:
    if os.environ.get('CXX'):   # an explicit choice is used or fails; never silently replaced
        return shutil.which(os.environ['CXX'])
    return shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')


def library_path() -> Path:
    """Where the library for these sources, flags, jaxlib, compiler and CPU lives (built or not)."""
    key = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob('*.cc')) + sorted(SOURCE_DIR.glob('*.h')):
        key.update(path.name.encode() + b'\0' + path.read_bytes())
    for part in (' '.join(CXXFLAGS), jaxlib.__version__, _cpu_signature(), _compiler() or ''):
        key.update(part.encode())
    return _cache_dir() / f'gnv2_kernels-{key.hexdigest()[:16]}.so'


def build(path: Path) -> Path:
    """Compile the library to ``path`` (atomically: parallel builders never see half a file)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', '')!r}; install g++ or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
    os.close(fd)
    cmd = [cxx, *CXXFLAGS, '-isystem', jax.ffi.include_dir(), *map(str, sources()), '-o', tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'building the kernels in {SOURCE_DIR} failed:\n{proc.stderr.strip()}')
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
    for target, symbol in HANDLERS.items():
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


def main() -> int:
    """Build now and say where, or why not (``make`` runs this after installing)."""
    if load():
        print(f'native CPU kernels: {library_path()}')
        return 0
    print(f'native CPU kernels unavailable ({load_error()}); CPU runs use the portable forms')
    return 1


if __name__ == '__main__':
    raise SystemExit(main())
