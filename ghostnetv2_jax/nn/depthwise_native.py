"""Depthwise convolution as XLA:CPU custom calls (``depthwise_cpu.cc``), built on first use.

The library holds the depthwise conv (forward and both gradients), two inference-only fused
ops built on it: a ghost module's cheap half (``ghost_cheap``, optionally gated by DFC
attention) and the stem conv with its BatchNorm and ReLU (``stem_conv``), and training-mode
BatchNorm's reductions (``batch_norm_moments``, ``batch_norm_grad_sums``).

The C++ source ships in the package. ``load()`` compiles it once per machine with the system C++
compiler against jaxlib's FFI headers (about 3 s), caches the library, and registers its
handlers with XLA. The cache key covers the source, the flags, the jaxlib version and the CPU's
instruction-set flags (the library is built with ``-march=native``), so a cache directory shared
between different machines or jaxlib versions never serves a stale or illegal binary.

When there is no compiler, or the build fails, ``load()`` returns False with the reason in
``load_error()``, and ``impl='auto'`` falls back to the portable shift form.

Environment:
  GHOSTNETV2_NATIVE=0          never build or use the native kernels
  GHOSTNETV2_CACHE_DIR=DIR     where built libraries go (default: $XDG_CACHE_HOME or ~/.cache,
                               then ghostnetv2_jax/native; a per-user directory under the system
                               temporary directory when that is not writable)
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
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from ghostnetv2_jax.nn.layers import resize

SOURCE = Path(__file__).with_name('depthwise_cpu.cc')
CXXFLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
TARGETS = {  # XLA custom-call name -> exported handler symbol
    'gnv2_depthwise_forward': 'Gnv2DepthwiseForward',
    'gnv2_depthwise_grad_input': 'Gnv2DepthwiseGradInput',
    'gnv2_depthwise_grad_kernel': 'Gnv2DepthwiseGradKernel',
    'gnv2_ghost_cheap': 'Gnv2GhostCheap',
    'gnv2_ghost_cheap_gated': 'Gnv2GhostCheapGated',
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


# ----------------------------------------------------------------------------- the ops
# Every custom call is independent per example (the kernel gradient is returned per example and
# summed outside), so under a batch-sharded jit each device runs it on its own examples: the
# sharding rules let the batch factor ``n`` be sharded and keep every other dimension whole.
class _Target(NamedTuple):
    rule: str                   # Shardy sharding rule (einsum-like), operands -> result
    batched: Tuple[bool, ...]   # which operands carry the batch dimension first
    attrs: Tuple[str, ...]      # geometry attributes, in the order of ``static``

# A call is (target, static, out_tail): ``static`` the attribute values, ``out_tail`` the
# result's shape after its batch dimension, which is the first operand's (global or per device).


_TARGETS = {
    'gnv2_depthwise_forward': _Target('n h w c, i j k c -> n p q c', (True, False),
                                      ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_depthwise_grad_input': _Target('n p q c, i j k c -> n h w c', (True, False),
                                         ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_depthwise_grad_kernel': _Target('n h w c, n p q c -> n i j k c', (True, True),
                                          ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_ghost_cheap': _Target('n h w c, c, c, i j k c, c, c -> n h w d', (True,) + (False,) * 5,
                                ('pad_top', 'pad_left', 'relu')),
    'gnv2_ghost_cheap_gated': _Target('n h w c, c, c, i j k c, c, c, n a b d -> n h w d',
                                      (True,) + (False,) * 5 + (True,), ('pad_top', 'pad_left', 'relu')),
    'gnv2_ghost_module': _Target('n h w e, a b e c, c, c, i j k c, c, c -> n h w d', (True,) + (False,) * 6,
                                 ('pad_top', 'pad_left', 'relu')),
    'gnv2_ghost_module_gated': _Target('n h w e, a b e c, c, c, i j k c, c, c, n u v d -> n h w d',
                                       (True,) + (False,) * 6 + (True,), ('pad_top', 'pad_left', 'relu')),
    'gnv2_ghost_module_strided': _Target(
        'n h w e, a b e c, c, c, i j k c, c, c, f g l d, d, d -> n p q d', (True,) + (False,) * 9,
        ('pad_top', 'pad_left', 'relu', 'dw_stride_h', 'dw_stride_w', 'dw_pad_top', 'dw_pad_left')),
    'gnv2_ghost_module_strided_gated': _Target(
        'n h w e, a b e c, c, c, i j k c, c, c, n u v d, f g l d, d, d -> n p q d',
        (True,) + (False,) * 6 + (True,) + (False,) * 3,
        ('pad_top', 'pad_left', 'relu', 'dw_stride_h', 'dw_stride_w', 'dw_pad_top', 'dw_pad_left')),
    'gnv2_stem_conv': _Target('n h w c, i j c d, d, d -> n p q d', (True, False, False, False),
                              ('stride_h', 'stride_w', 'pad_top', 'pad_left', 'relu')),
    'gnv2_batchnorm_moments': _Target('n h w c -> n t c', (True,), ()),
    'gnv2_batchnorm_grad_sums': _Target('n h w c, n h w c, c -> n t c', (True, True, False), ()),
}


def _ffi(target, static, out_tail, *operands):
    out = jax.ShapeDtypeStruct((operands[0].shape[0], *out_tail), jnp.float32)
    attrs = {name: np.int64(v) for name, v in zip(_TARGETS[target].attrs, static)}
    return jax.ffi.ffi_call(target, out, vmap_method='sequential')(*operands, **attrs)


def _partitioned(target, static, out_tail):
    """The custom call under ``custom_partitioning``: per-device shapes, batch sharding only."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec
    spec = _TARGETS[target]
    run = functools.partial(_ffi, target, static, out_tail)

    def batch_only(mesh, like, rank):   # ``like``'s sharding of dim 0, everything else whole
        dims = getattr(like, 'spec', None)
        return NamedSharding(mesh, PartitionSpec(dims[0] if dims else None, *([None] * (rank - 1))))

    def infer(mesh, arg_shapes, result_shape):
        return batch_only(mesh, arg_shapes[0].sharding, len(result_shape.shape))

    def partition(mesh, arg_shapes, result_shape):
        like = arg_shapes[0].sharding
        args = tuple(batch_only(mesh, like, len(a.shape)) if batched else NamedSharding(mesh, PartitionSpec())
                     for a, batched in zip(arg_shapes, spec.batched))
        return mesh, run, batch_only(mesh, like, len(result_shape.shape)), args

    call = custom_partitioning(run)
    # Every factor but n stays whole (c too where it mixes with d), listed in order of first
    # appearance: Shardy requires its special factors sorted.
    factors = spec.rule.replace(',', ' ').replace('->', ' ').split()
    keep_whole = tuple(dict.fromkeys(f for f in factors if f != 'n' and (f != 'c' or 'd' in factors)))
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=spec.rule,
                       need_replication_factors=keep_whole)
    return call


@functools.lru_cache(maxsize=None)
def _op(target, static, out_tail):
    """``target`` for one geometry, partitionable and vmappable. Under vmap the mapped axis is
    folded into the batch axis when only batch-carrying operands are mapped (the custom calls are
    per example); otherwise (e.g. a mapped kernel) it runs once per element."""
    # One device has nothing to partition; without custom_partitioning's wrapper a batch-32
    # train step (~400 calls) compiled 1-2 s faster (17.8 / 20.5 against 19.8 / 21.4 s).
    partitioned = (_partitioned(target, static, out_tail) if jax.device_count() > 1 else
                   functools.partial(_ffi, target, static, out_tail))
    batched = _TARGETS[target].batched

    @jax.custom_batching.custom_vmap
    def op(*operands):
        return partitioned(*operands)

    @op.def_vmap
    def _rule(axis_size, in_mapped, *operands):
        lift = lambda v, mapped: v if mapped else jnp.broadcast_to(v, (axis_size, *v.shape))
        if any(m and not b for m, b in zip(in_mapped, batched)):
            return jax.lax.map(lambda ops: op(*ops), tuple(map(lift, operands, in_mapped))), True
        fold = lambda v: v.reshape(-1, *v.shape[2:])
        operands = [fold(lift(v, m)) if b else v for v, m, b in zip(operands, in_mapped, batched)]
        out = op(*operands)
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return op


def _call(target, static, out_tail, *operands):
    if not load():
        raise RuntimeError(f"depthwise impl 'native' is unavailable: {load_error()}")
    return _op(target, static, tuple(out_tail))(*(o.astype(jnp.float32) for o in operands))


def _conv_static(strides, padding):
    (sh, sw), ((pt, _), (pl, _)) = strides, padding
    return sh, sw, pt, pl


def _forward(x, kernel, strides, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel.shape[:2], strides, padding
    _, h, w, c = x.shape
    out_tail = ((h + sum(ph) - kh) // sh + 1, (w + sum(pw) - kw) // sw + 1, c)
    return _call('gnv2_depthwise_forward', _conv_static(strides, padding), out_tail, x, kernel).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding)


def _depthwise_fwd(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    static = _conv_static(strides, padding)
    dx = _call('gnv2_depthwise_grad_input', static, x.shape[1:], g, kernel)
    dk = jnp.sum(_call('gnv2_depthwise_grad_kernel', static, kernel.shape, x, g), axis=0)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _check_backend():
    if jax.default_backend() != 'cpu':
        raise ValueError(f"depthwise impl 'native' runs on CPU only (default backend: "
                         f"{jax.default_backend()}); use 'auto' or 'xla'")


def depthwise_native(x, kernel, strides: Sequence[int], padding: Sequence[Sequence[int]]):
    """Depthwise cross-correlation (NHWC ``x``, (kh, kw, 1, C) ``kernel``, explicit padding) on
    XLA:CPU custom calls. Computes in float32 (other dtypes are cast in and out)."""
    _check_backend()
    padding: Tuple = tuple(tuple(int(v) for v in p) for p in padding)
    if any(v < 0 for p in padding for v in p):
        raise ValueError(f"depthwise impl 'native' needs non-negative padding, got {padding}")
    return _depthwise(x, kernel, tuple(int(v) for v in strides), padding)


# ----------------------------------------------------------------------------- ghost module
GHOST_KERNEL_SIZES = ((3, 3), (5, 5), (1, 5), (5, 1))   # compiled in depthwise_cpu.cc


def ghost_cheap_reference(p, s1, b1, kernel, s2, b2, features: int, relu: bool, gate=None, primary=None,
                          strided=None):
    """What ``ghost_cheap`` computes, as separate ops (and its gradient, by autodiff)."""
    act = jax.nn.relu if relu else (lambda v: v)
    kh, kw = kernel.shape[:2]
    if primary is not None:
        p = jnp.einsum('nhwe,ec->nhwc', p, primary[0, 0], precision=jax.lax.Precision.HIGHEST)
    x1 = act(p * s1 + b1)
    x2 = act(depthwise_native(x1, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2))) * s2 + b2)
    out = jnp.concatenate([x1, x2], axis=-1)[..., :features]
    out = out if gate is None else out * resize(gate, out.shape[1:3], 'nearest')
    return out if strided is None else apply_strided(out, strided)


class StridedDepthwise(NamedTuple):
    """A depthwise conv and its BatchNorm's inference affine after a ghost module, ``dw(out, kernel)
    * scale + bias``: a stride-2 bottleneck's conv_dw and bn_dw, for ``ghost_cheap(strided=...)``."""
    kernel: jax.Array                          # (kh, kw, 1, C)
    scale: jax.Array                           # (C,)
    bias: jax.Array                            # (C,)
    strides: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]   # symmetric


def apply_strided(x, strided: StridedDepthwise):
    """``strided``'s depthwise conv and affine on ``x``, as separate ops."""
    return depthwise_native(x, strided.kernel, strided.strides, strided.padding) * strided.scale + strided.bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry):
    kh, kw = kernel.shape[:2]
    static = (kh // 2, kw // 2, int(relu))
    operands = (p,) if primary is None else (p, primary)
    operands += (s1, b1, kernel, s2, b2) + (() if gate is None else (gate,))
    target = 'gnv2_ghost_cheap' if primary is None else 'gnv2_ghost_module'
    out_hw = p.shape[1:3]
    if dw is not None:   # (kernel, scale, bias); dw_geometry (sh, sw, pt, pl)
        target += '_strided'
        static += dw_geometry
        operands += tuple(dw)
        (dkh, dkw), (sh, sw, pt, pl) = dw[0].shape[:2], dw_geometry
        out_hw = ((out_hw[0] + 2 * pt - dkh) // sh + 1, (out_hw[1] + 2 * pl - dkw) // sw + 1)
    target += '_gated' if gate is not None else ''
    return _call(target, static, (*out_hw, features), *operands).astype(p.dtype)


def _ghost_fwd(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry):
    out = _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, features, relu, dw_geometry)
    return out, (p, s1, b1, kernel, s2, b2, gate, primary, dw)


def _ghost_bwd(features, relu, dw_geometry, residuals, g):
    *ops, gate, primary, dw = residuals    # any of these may be None: no cotangent, no vjp input

    def reference(ops, gate, primary, dw):
        strided = None
        if dw is not None:
            sh, sw, pt, pl = dw_geometry
            strided = StridedDepthwise(*dw, (sh, sw), ((pt, pt), (pl, pl)))
        return ghost_cheap_reference(*ops, features, relu, gate, primary, strided)
    _, vjp = jax.vjp(reference, tuple(ops), gate, primary, dw)
    d_ops, d_gate, d_primary, d_dw = vjp(g)
    return (*d_ops, d_gate, d_primary, d_dw)


_ghost.defvjp(_ghost_fwd, _ghost_bwd)


def ghost_cheap(p, s1, b1, kernel, s2, b2, features: int, relu: bool, gate=None, primary=None,
                strided: Optional[StridedDepthwise] = None):
    """A ghost module's cheap half at inference, fused: ``concat([x1, act(dw(x1) * s2 + b2)])``
    cut to ``features`` channels, with ``x1 = act(p * s1 + b1)``; stride 1, 'same' padding, odd
    kernel sizes in GHOST_KERNEL_SIZES. With ``gate`` (N, H / fh, W / fw, features) for whole
    factors fh, fw, the result is also multiplied by the gate up-sampled by nearest neighbour
    (``nn.layers.resize``; GhostNetV2's DFC attention). One pass over memory instead of three
    (four with the gate). With ``primary``, the whole module: ``p`` is the module's input
    (N, H, W, Cin) and ``p @ primary`` (its 1x1 kernel, (1, 1, Cin, C)) is computed in the same
    pass and never stored. With ``primary`` and ``strided``, the depthwise conv after the module
    too: only its output is stored. Differentiable (through the unfused ops), so safe under
    ``jax.grad``."""
    _check_backend()
    n, h, w, c = p.shape
    if primary is not None:
        if primary.ndim != 4 or tuple(primary.shape[:3]) != (1, 1, c):
            raise ValueError(f'ghost_cheap: primary kernel {primary.shape} must be (1, 1, {c}, C)')
        c = primary.shape[-1]
    if tuple(kernel.shape) not in {(*k, 1, c) for k in GHOST_KERNEL_SIZES}:
        raise ValueError(f'ghost_cheap: kernel {kernel.shape} is not one of {GHOST_KERNEL_SIZES} x (1, {c})')
    if not c <= features <= 2 * c:
        raise ValueError(f'ghost_cheap: features must be in [{c}, {2 * c}], got {features}')
    if gate is not None:
        gn, gh, gw, gc = gate.shape
        if (gn, gc) != (n, features) or not (0 < gh and 0 < gw and h % gh == 0 and w % gw == 0):
            raise ValueError(f'ghost_cheap: gate {gate.shape} must be ({n}, {h}/fh, {w}/fw, {features}) '
                             'for whole factors fh, fw')
    dw = dw_geometry = None
    if strided is not None:
        (sh, sw), ((pt, pb), (pl, pr)) = strided.strides, strided.padding
        if primary is None:
            raise ValueError('ghost_cheap: strided needs the module form (primary)')
        if tuple(strided.kernel.shape) not in {(*k, 1, features) for k in GHOST_KERNEL_SIZES}:
            raise ValueError(f'ghost_cheap: strided kernel {strided.kernel.shape} is not one of '
                             f'{GHOST_KERNEL_SIZES} x (1, {features})')
        if (strided.scale.shape, strided.bias.shape) != ((features,), (features,)):
            raise ValueError(f'ghost_cheap: strided scale and bias must be ({features},)')
        kh3, kw3 = strided.kernel.shape[:2]
        if pt != pb or pl != pr or min(sh, sw) < 1 or not (0 <= pt < kh3 and 0 <= pl < kw3):
            raise ValueError(f'ghost_cheap: strided needs positive strides and symmetric padding '
                             f'smaller than the kernel, got {strided.strides}, {strided.padding}')
        dw = (strided.kernel, strided.scale, strided.bias)
        dw_geometry = tuple(int(v) for v in (sh, sw, pt, pl))
    return _ghost(p, s1, b1, kernel, s2, b2, gate, primary, dw, int(features), bool(relu), dw_geometry)


def _check_plain_conv(name, lhs_dilation, rhs_dilation, feature_group_count, kwargs):
    """What a fused op standing in for ``lax.conv_general_dilated`` in an ``nn.Conv`` supports."""
    one = lambda v: v is None or all(int(d) == 1 for d in v)
    if not (one(lhs_dilation) and one(rhs_dilation) and feature_group_count == 1 and not kwargs):
        raise ValueError(f'{name}: only plain (undilated, ungrouped) convolutions')


def ghost_module_fn(s1, b1, kernel, s2, b2, features: int, relu: bool, gate=None,
                    strided: Optional[StridedDepthwise] = None):
    """A ``conv_general_dilated`` for a ghost module's primary ``flax.linen.Conv`` (1x1, stride 1)
    that returns the whole module's output (or with ``strided``, the depthwise conv's after it),
    ``ghost_cheap(x, ..., primary=conv_kernel)``: the Conv keeps its variables and names, as with
    ``stem_conv_fn``."""
    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        _check_plain_conv('ghost_module_fn', lhs_dilation, rhs_dilation, feature_group_count, kwargs)
        if tuple(rhs.shape[:2]) != (1, 1) or tuple(window_strides) != (1, 1) \
                or any(tuple(p) != (0, 0) for p in padding):
            raise ValueError('ghost_module_fn: only a 1x1 stride-1 unpadded convolution')
        return ghost_cheap(lhs, s1, b1, kernel, s2, b2, features, relu, gate=gate, primary=rhs, strided=strided)
    return conv


# ----------------------------------------------------------------------------- stem
def stem_conv_reference(x, kernel, scale, bias, strides, padding, relu: bool):
    """What ``stem_conv`` computes, with XLA's convolution (and its gradient, by autodiff)."""
    y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    y = y * scale + bias
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _stem(x, kernel, scale, bias, strides, padding, relu):
    (kh, kw, _, cout), (sh, sw), ((pt, pb), (pl, pr)) = kernel.shape, strides, padding
    _, h, w, _ = x.shape
    out_tail = ((h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, cout)
    return _call('gnv2_stem_conv', (sh, sw, pt, pl, int(relu)), out_tail, x, kernel, scale, bias).astype(x.dtype)


def _stem_fwd(x, kernel, scale, bias, strides, padding, relu):
    return _stem(x, kernel, scale, bias, strides, padding, relu), (x, kernel, scale, bias)


def _stem_bwd(strides, padding, relu, residuals, g):
    _, vjp = jax.vjp(lambda *ops: stem_conv_reference(*ops, strides, padding, relu), *residuals)
    return vjp(g)


_stem.defvjp(_stem_fwd, _stem_bwd)


def stem_conv(x, kernel, scale, bias, strides: Sequence[int], padding: Sequence[Sequence[int]],
              relu: bool = True):
    """``act(conv(x, kernel) * scale + bias)`` in one pass: a dense conv (NHWC ``x``, HWIO
    ``kernel``, explicit padding) with its BatchNorm as a per-channel affine, for the few-input-
    channel stem at inference, where XLA runs patches, a concatenation and a matmul. Float32.
    Differentiable (through XLA's convolution)."""
    _check_backend()
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    kh, kw, cin, cout = kernel.shape
    if cin != x.shape[-1] or scale.shape != (cout,) or bias.shape != (cout,):
        raise ValueError(f'stem_conv: kernel {kernel.shape}, scale {scale.shape} and bias {bias.shape} '
                         f'do not fit input {x.shape}')
    if any(v < 0 for p in padding for v in p):
        raise ValueError(f'stem_conv needs non-negative padding, got {padding}')
    return _stem(x, kernel, scale, bias, tuple(int(v) for v in strides), padding, bool(relu))


def stem_conv_fn(scale, bias, relu: bool = True):
    """A ``conv_general_dilated`` for ``flax.linen.Conv`` that runs ``stem_conv`` with this
    affine and activation after the conv: the Conv keeps its variables and names."""
    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        _check_plain_conv('stem_conv_fn', lhs_dilation, rhs_dilation, feature_group_count, kwargs)
        return stem_conv(lhs, rhs, scale, bias, window_strides, padding, relu)
    return conv


def main() -> int:
    """Build now and say where, or why not (``make`` runs this after installing)."""
    if load():
        print(f'native depthwise kernels: {library_path()}')
        return 0
    print(f'native depthwise kernels unavailable ({load_error()}); CPU runs use the shift form')
    return 1


# ----------------------------------------------------------------------------- BatchNorm sums
def batch_norm_moments(x):
    """(mean, biased variance) over every axis of NHWC ``x`` but the channels, in one pass over
    ``x`` (float32). The kernel returns each example's mean and sum of squared deviations, shifted
    by its first pixel and summed in double; examples are combined here (Chan et al.)."""
    _check_backend()
    n, h, w, c = x.shape
    per = _call('gnv2_batchnorm_moments', (), (2, c), x)
    means, m2 = per[:, 0], per[:, 1]
    mean = jnp.mean(means, axis=0)
    m2 = jnp.sum(m2, axis=0) + (h * w) * jnp.sum(jnp.square(means - mean), axis=0)
    return mean, m2 / max(n * h * w, 1)


def batch_norm_grad_sums(g, x, mean):
    """(sum(g), sum(g * (x - mean))) over every axis of NHWC ``g`` and ``x`` but the channels,
    in one pass over both (float32; summed in double per example)."""
    _check_backend()
    per = jnp.sum(_call('gnv2_batchnorm_grad_sums', (), (2, x.shape[-1]), g, x, mean), axis=0)
    return per[0], per[1]
