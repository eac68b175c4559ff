"""Compiling this package's C++ sources once per machine, for the JAX kernels
(``kernels/build.py``) and the input pipeline's TensorFlow ops (``data/native.py``).

A library is built with the system C++ compiler the first time it is needed (a few seconds) and
cached. Its file name hashes the sources, the flags, the versions its caller names (jaxlib's or
TensorFlow's), the compiler and the CPU's instruction-set flags (libraries are built with
``-march=native``), so a cache shared between machines or versions never serves a stale or
illegal binary.

Environment:
  GHOSTNETV2_NATIVE=0          never build or use native code (the portable forms run)
  GHOSTNETV2_CACHE_DIR=DIR     where built libraries go (default: $XDG_CACHE_HOME or ~/.cache,
                               then ghostnetv2_jax/native; a per-user directory under the system
                               temporary directory when that is not writable)
  CXX                          the compiler (default: c++)
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence


def enabled() -> bool:
    """False when the user turned native code off (GHOSTNETV2_NATIVE=0)."""
    return os.environ.get('GHOSTNETV2_NATIVE', '1') != '0'


def cpu_signature() -> str:
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


def cache_dir() -> Path:
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


def compiler() -> Optional[str]:
    if os.environ.get('CXX'):   # an explicit choice is used or fails; never silently replaced
        return shutil.which(os.environ['CXX'])
    return shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')


def library_path(name: str, files: Iterable[Path], flags: Sequence[str], *versions: str) -> Path:
    """Where the library ``name`` built from ``files`` (sources and headers) with ``flags`` for
    ``versions``, this compiler and this CPU lives (built or not)."""
    key = hashlib.sha256()
    for path in sorted(files):
        key.update(path.name.encode() + b'\0' + path.read_bytes())
    for part in (' '.join(flags), *versions, cpu_signature(), compiler() or ''):
        key.update(part.encode())
    return cache_dir() / f'{name}-{key.hexdigest()[:16]}.so'


def build(path: Path, sources: Sequence[Path], flags: Sequence[str], what: str) -> Path:
    """Compile ``sources`` with ``flags`` to ``path``, atomically (parallel builders never see
    half a file); ``what`` names the library in errors."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler found (CXX={os.environ.get('CXX', '')!r}; install g++ or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
    os.close(fd)
    cmd = [cxx, *map(str, sources), *flags, '-o', tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'building {what} failed:\n{proc.stderr.strip()}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Loader:
    """One native library's state in this process: ``ok()`` builds (if needed) and loads it the
    first time, through ``load`` (returns the loaded library); False when native code is off or
    the build or load failed, with the reason in ``error()``; ``library`` once loaded."""

    def __init__(self, load: Callable[[], Any]):
        self._load, self._lock, self._state = load, threading.Lock(), {}

    def ok(self) -> bool:
        with self._lock:
            if 'ok' not in self._state:
                if not enabled():
                    self._state.update(ok=False, error='disabled by GHOSTNETV2_NATIVE=0')
                else:
                    try:
                        self._state.update(library=self._load(), ok=True, error=None)
                    except Exception as e:   # no compiler, failed build, unloadable library
                        self._state.update(ok=False, error=f'{type(e).__name__}: {e}')
            return self._state['ok']

    def error(self) -> Optional[str]:
        """Why ``ok()`` returned False (None if it has not, or has not been called)."""
        return self._state.get('error')

    @property
    def library(self) -> Any:
        return self._state['library']
