"""Process-wide settings that make XLA:CPU steps fast: ``fast_cpu_defaults()`` (every command
of this package calls it first; a notebook or program of your own calls it once, before its
first computation) dispatches CPU computations synchronously and makes glibc keep freed memory.

The C allocator's policy, for the buffers XLA:CPU allocates on every step:

XLA:CPU allocates each executable's temporaries and outputs with ``malloc`` and frees them when
the step ends. glibc serves blocks of 128 KiB and more (its adaptive mmap threshold, up to 32
MiB) with a fresh ``mmap`` and returns them with ``munmap``, and trims the top of its heap when
more than the trim threshold is free there, so every step of a large program maps its buffers
anew, and the kernel zero-fills every page of them on first touch: a training step at batch 32,
224 px spends about half its time in those page faults (docs/benchmarks.md).

``retain_freed_memory()`` makes glibc keep freed memory for the next step instead: no mmap'd
chunks (``M_MMAP_MAX`` 0: every block comes from the heap) and no trimming (``M_TRIM_THRESHOLD``
-1). It is ``mallopt``, so it applies from the call on, in a process already running; it is
what ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` gives at start.
The cost: the process keeps its peak heap resident (``release_free_heap()`` gives back what is
free now, e.g. after compiling). It needs synchronous dispatch to act on a step's largest
buffer: a computation dispatched asynchronously runs on an XLA worker thread, whose glibc arena
serves a block larger than its 64 MiB heaps with ``mmap`` whatever ``M_MMAP_MAX`` says (the
trainer's recipe step at batch 16 allocates one 0.9 GiB temporary).
"""
from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.lru_cache(maxsize=None)
def _libc():
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    try:
        return ctypes.CDLL('libc.so.6')
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Keep memory that is freed mapped for reuse (glibc); False where the C library is not
    glibc (the call then changes nothing)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def fast_cpu_defaults() -> bool:
    """Synchronous CPU dispatch (``xla_options.dispatch_cpu_synchronously``: call before the first
    computation) and ``retain_freed_memory()``; True where the allocator policy applied (glibc)."""
    from ghostnetv2_jax import xla_options
    xla_options.dispatch_cpu_synchronously()
    return retain_freed_memory()


def release_free_heap() -> None:
    """Give the memory that is free now back to the operating system (glibc's ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
