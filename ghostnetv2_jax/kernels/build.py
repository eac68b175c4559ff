"""Build, cache and load the C++ kernel library (``csrc/*.cc``) and register its XLA handlers.

The sources ship in the package. ``load()`` compiles them once per machine with the system C++
compiler against jaxlib's FFI headers (a few seconds; ``ghostnetv2_jax.native_build``: the
cache, its key and the environment variables GHOSTNETV2_NATIVE, GHOSTNETV2_CACHE_DIR and CXX),
caches the library, and registers its handlers with XLA for the CPU platform.

When there is no compiler, or the build fails, ``load()`` returns False with the reason in
``load_error()``; the layers then use their portable forms.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import List, Optional

import jax
import jaxlib

from ghostnetv2_jax import native_build

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
    'gnv2_pointwise': 'Gnv2Pointwise',
    'gnv2_batchnorm_moments': 'Gnv2BatchNormMoments',
    'gnv2_batchnorm_grad_sums': 'Gnv2BatchNormGradSums',
}

def sources() -> List[Path]:
    """The library's translation units (compiled together) and headers (part of the cache key)."""
    return sorted(SOURCE_DIR.glob('*.cc'))


def library_path() -> Path:
    """Where the library for these sources, flags, jaxlib, compiler and CPU lives (built or not)."""
    files = sorted(SOURCE_DIR.glob('*.cc')) + sorted(SOURCE_DIR.glob('*.h'))
    return native_build.library_path('gnv2_kernels', files, CXXFLAGS, jaxlib.__version__)


def build(path: Path) -> Path:
    """Compile the library to ``path``."""
    return native_build.build(path, sources(), [*CXXFLAGS, '-isystem', jax.ffi.include_dir()],
                              f'the kernels in {SOURCE_DIR}')


def _load_and_register():
    path = library_path()
    if not path.exists():
        build(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
    return lib


_loader = native_build.Loader(_load_and_register)


def load() -> bool:
    """Build (once), load and register the kernels. False if disabled or unavailable."""
    return _loader.ok()


def load_error() -> Optional[str]:
    """Why ``load()`` returned False (None if it has not, or has not been called)."""
    return _loader.error()


def main() -> int:
    """Build now and say where, or why not (``make`` runs this after installing)."""
    if load():
        print(f'native CPU kernels: {library_path()}')
        return 0
    print(f'native CPU kernels unavailable ({load_error()}); CPU runs use the portable forms')
    return 1


if __name__ == '__main__':
    raise SystemExit(main())
