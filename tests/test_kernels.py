"""The native CPU kernels (ghostnetv2_jax.kernels): build, cache, fallback, partitioning, vmap,
and each op against its reference (the depthwise conv's numerics also in test_depthwise.py, and
in the whole network against timm in test_parity.py, where impl 'auto' is 'native' on CPU)."""
import json
import os
import shlex
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ghostnetv2_jax import kernels
from ghostnetv2_jax.kernels import batchnorm as kbn
from ghostnetv2_jax.kernels import depthwise as kdw
from ghostnetv2_jax.kernels import ghost_module as kgm
from ghostnetv2_jax.kernels import pointwise as kpw
from ghostnetv2_jax.kernels import stem as kstem
from ghostnetv2_jax.layers.depthwise import depthwise_conv
from ghostnetv2_jax.layers.helpers import resize

PAD = ((1, 1), (1, 1))


def _run(code, **env):
    """Run ``code`` in a fresh interpreter (the native library and device count are per process);
    returns its last stdout line, parsed as JSON."""
    full_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


FALLBACK = '''
    import json
    from ghostnetv2_jax import kernels
    from ghostnetv2_jax.layers.depthwise import cpu_impl
    print(json.dumps({'auto': cpu_impl(), 'error': kernels.load_error()}))
'''


def test_disabled_by_environment_falls_back_to_shift():
    out = _run(FALLBACK, GHOSTNETV2_NATIVE='0')
    assert out == {'auto': 'shift', 'error': 'disabled by GHOSTNETV2_NATIVE=0'}


def test_failed_build_falls_back_to_shift_with_the_reason(tmp_path):
    out = _run(FALLBACK, CXX='false', GHOSTNETV2_CACHE_DIR=str(tmp_path))
    assert out['auto'] == 'shift'
    assert 'building the kernels in' in out['error'] and 'failed' in out['error']
    assert list(tmp_path.iterdir()) == []          # no half-built library left behind
    out = _run(FALLBACK, CXX='no-such-compiler', GHOSTNETV2_CACHE_DIR=str(tmp_path))
    assert out['auto'] == 'shift' and 'no C++ compiler found' in out['error']


def test_explicit_native_when_unavailable_is_a_clear_error():
    code = '''
        import json, jax.numpy as jnp
        from ghostnetv2_jax.layers.depthwise import depthwise_conv
        try:
            depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), impl='native')
        except RuntimeError as e:
            print(json.dumps(str(e)))
    '''
    msg = _run(code, GHOSTNETV2_NATIVE='0')
    assert msg == "depthwise impl 'native' is unavailable: disabled by GHOSTNETV2_NATIVE=0"


def test_library_is_built_once_and_reused(tmp_path):
    code = '''
        import json, os
        from ghostnetv2_jax import kernels
        assert kernels.load(), kernels.load_error()
        p = kernels.library_path()
        print(json.dumps([str(p), os.stat(p).st_mtime_ns]))
    '''
    # The compiler, an explicit CXX choice the build honours: the one it would find, with
    # optimisation off, half the build's time (what is checked is that the first process builds
    # and the second reuses).
    from ghostnetv2_jax import native_build
    real = native_build.compiler()
    assert real, 'no C++ compiler'
    cxx = tmp_path / 'bin' / 'cxx-O0'
    cxx.parent.mkdir()
    cxx.write_text(f'#!/bin/sh\nexec {shlex.quote(real)} "$@" -O0\n')
    cxx.chmod(0o755)
    cache = tmp_path / 'cache'
    first = _run(code, GHOSTNETV2_CACHE_DIR=str(cache), CXX=str(cxx))
    second = _run(code, GHOSTNETV2_CACHE_DIR=str(cache), CXX=str(cxx))
    assert first == second
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first[0])]


@pytest.mark.parametrize('impl', ['native', 'auto'])
def test_batch_sharded_program_runs_per_device_without_gathering(impl):
    """Under a batch-sharded jit each device convolves its own examples (no all-gather), and
    the values and gradients equal the single-device ones; 'auto' (the kernel inside a
    per-platform choice) partitions the same way."""
    code = '''
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from ghostnetv2_jax.layers.depthwise import depthwise_conv
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 10, 9, 6)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, 1, 6)), jnp.float32)
        loss = lambda x, k: jnp.sum(jnp.sin(depthwise_conv(x, k, (2, 2), ((1, 1), (1, 1)), IMPL)))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        mesh = Mesh(np.array(jax.devices()), ('data',))
        xs = jax.device_put(x, NamedSharding(mesh, P('data')))
        (l1, (gx1, gk1)), (l4, (gx4, gk4)) = step(x, k), step(xs, k)
        hlo = step.lower(xs, k).compile().as_text()
        err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        print(json.dumps({'devices': jax.device_count(), 'all_gather': 'all-gather' in hlo,
                          'gx_spec': list(gx4.sharding.spec), 'loss': err(l4, l1),
                          'gx': err(gx4, gx1), 'gk': err(gk4, gk1),
                          'native': 'gnv2_depthwise_grad_kernel' in hlo}))
    '''.replace('IMPL', repr(impl))
    out = _run(code, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    assert out['devices'] == 4 and not out['all_gather'] and out['native']
    assert out['gx_spec'] == ['data']
    assert max(out['loss'], out['gx'], out['gk']) <= 1e-5, out


def test_vmap_over_an_extra_batch_axis():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 5, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
    f = lambda impl: jax.vmap(lambda x: depthwise_conv(x, k, (1, 1), PAD, impl))(xs)
    assert rel_err(f('native'), f('xla')) <= 1e-5


def test_negative_padding_is_rejected():
    with pytest.raises(ValueError, match='non-negative padding'):
        kdw.depthwise(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), (1, 1),
                                          ((-1, 0), (0, 0)))


def test_vmap_of_gradients_and_over_kernels():
    """Per-example gradients (vmap of grad) and a vmapped kernel (an ensemble) match XLA's conv."""
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((3, 2, 7, 6, 4)), jnp.float32)
    ks = jnp.asarray(rng.standard_normal((3, 3, 3, 1, 4)), jnp.float32)
    loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(depthwise_conv(x, k, (2, 2), PAD, impl)))
    for in_axes in [(0, None), (0, 0), (None, 0)]:
        kk = ks if in_axes[1] == 0 else ks[0]
        xx = xs if in_axes[0] == 0 else xs[0]
        grads = lambda impl: jax.vmap(jax.grad(loss(impl), argnums=(0, 1)), in_axes)(xx, kk)
        for got, ref in zip(grads('native'), grads('xla')):
            assert rel_err(got, ref) <= 1e-5, in_axes


# ----------------------------------------------------------------------------- ghost_cheap
GHOST_CASES = [  # (p shape NHWC, kernel, features, relu)
    ((2, 9, 11, 20), (3, 3), 40, True),     # 16 + 4 channels: blocked and remainder
    ((2, 9, 11, 20), (3, 3), 37, False),    # odd features: x2 cut to 17 channels
    ((1, 5, 6, 5), (3, 3), 9, True),        # fewer channels than one vector
    ((3, 7, 8, 16), (5, 5), 30, True),
    ((1, 6, 7, 8), (1, 5), 16, False),
    ((1, 7, 6, 8), (5, 1), 9, True),
]


def _ghost_operands(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    shapes = [shape, (c,), (c,), (*kernel, 1, c), (c,), (c,)]
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


@pytest.mark.parametrize('shape,kernel,features,relu', GHOST_CASES)
def test_ghost_module_after_primary_matches_the_unfused_ops(shape, kernel, features, relu):
    ops = _ghost_operands(shape, kernel)
    got = jax.jit(lambda *o: kgm.ghost_module(*o, features, relu))(*ops)
    ref = jax.jit(lambda *o: kgm.ghost_module_reference(*o, features, relu))(*ops)
    assert got.shape == (*shape[:3], features)
    assert rel_err(got, ref) <= 1e-6
    # and against XLA's grouped conv, independently of the native depthwise forward
    c, (kh, kw) = shape[-1], kernel
    act = jax.nn.relu if relu else (lambda v: v)
    x1 = act(ops[0] * ops[1] + ops[2])
    x2 = act(depthwise_conv(x1, ops[3], (1, 1), ((kh // 2,) * 2, (kw // 2,) * 2), 'xla') * ops[4] + ops[5])
    assert rel_err(got, jnp.concatenate([x1, x2], -1)[..., :features]) <= 1e-5


def test_ghost_module_after_primary_gradients_flow_through_the_unfused_ops():
    ops = _ghost_operands((2, 6, 7, 12), (3, 3))
    loss = lambda f: lambda *o: jnp.sum(jnp.sin(f(*o, 20, True)))
    got = jax.grad(loss(kgm.ghost_module), argnums=tuple(range(6)))(*ops)
    ref = jax.grad(loss(kgm.ghost_module_reference), argnums=tuple(range(6)))(*ops)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-5


def test_ghost_module_after_primary_vmaps_and_rejects_what_it_does_not_fuse():
    ops = _ghost_operands((2, 6, 7, 12), (3, 3))
    stacked = jnp.stack([ops[0], ops[0] * 2])
    f = lambda fn: jax.vmap(lambda p: fn(p, *ops[1:], 24, True))(stacked)
    assert rel_err(f(kgm.ghost_module), f(kgm.ghost_module_reference)) <= 1e-6
    with pytest.raises(ValueError, match='features must be in'):
        kgm.ghost_module(*ops, 25, True)
    with pytest.raises(ValueError, match='is not one of'):
        kgm.ghost_module(ops[0], *ops[1:3], jnp.ones((7, 7, 1, 12)), *ops[4:], 24, True)


GATED_CASES = [  # (p shape NHWC, kernel, features, gate's spatial size)
    ((2, 8, 10, 20), (3, 3), 40, (4, 5)),    # DFC's 2x2 pooled gate, blocked + remainder channels
    ((1, 6, 9, 12), (5, 5), 23, (3, 3)),     # unequal factors (2, 3), odd features
    ((2, 5, 7, 8), (3, 3), 16, (5, 7)),      # factor 1 (DFC without down-sampling)
]


@pytest.mark.parametrize('shape,kernel,features,gate_hw', GATED_CASES)
def test_gated_ghost_module_after_primary_multiplies_by_the_nearest_upsampled_gate(shape, kernel, features, gate_hw):
    ops = _ghost_operands(shape, kernel)
    gate = jax.nn.sigmoid(jnp.asarray(np.random.default_rng(3).standard_normal((shape[0], *gate_hw, features)),
                                      jnp.float32))
    got = jax.jit(lambda *o: kgm.ghost_module(*o[:-1], features, True, gate=o[-1]))(*ops, gate)
    plain = kgm.ghost_module(*ops, features, True)
    # the DFC module's up-sampling (PyTorch's nearest interpolation) on the ungated op's output
    want = plain * resize(gate, shape[1:3], 'nearest')
    assert rel_err(got, want) <= 1e-6
    ref = kgm.ghost_module_reference(*ops, features, True, gate)
    assert rel_err(got, ref) <= 1e-6


def test_gated_ghost_module_after_primary_gradients_include_the_gate():
    ops = _ghost_operands((2, 6, 8, 12), (3, 3))
    gate = jax.nn.sigmoid(jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 4, 20)), jnp.float32))
    loss = lambda f: lambda *o: jnp.sum(jnp.sin(f(*o[:-1], 20, True, o[-1])))
    got = jax.grad(loss(kgm.ghost_module), argnums=tuple(range(7)))(*ops, gate)
    ref = jax.grad(loss(kgm.ghost_module_reference), argnums=tuple(range(7)))(*ops, gate)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-5


def test_gated_ghost_module_after_primary_rejects_a_gate_of_the_wrong_shape():
    ops = _ghost_operands((2, 6, 8, 12), (3, 3))
    for bad in ((2, 4, 4, 20), (2, 3, 4, 24), (1, 3, 4, 20)):
        with pytest.raises(ValueError, match='gate'):
            kgm.ghost_module(*ops, 20, True, gate=jnp.ones(bad))


# ----------------------------------------------------------------------------- ghost module form
MODULE_CASES = [  # (x shape NHWC, primary channels C, kernel, features, relu, gate's spatial size)
    ((2, 40, 11, 16), 24, (3, 3), 48, True, None),      # 3 vectors of 8; 2 row chunks per image
    ((1, 9, 7, 5), 7, (3, 3), 13, False, None),         # fewer channels than a vector, odd Cin
    ((2, 36, 10, 40), 60, (3, 3), 120, True, (18, 5)),  # 32 + 24 + 4 channels, gated
    ((1, 40, 6, 24), 36, (5, 5), 71, True, None),       # 2 chunks, 4 halo rows between them
    ((2, 12, 9, 8), 12, (1, 5), 20, False, (6, 3)),
]


def _module_operands(x_shape, c, kernel, features, gate_hw, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    primary = jnp.asarray(rng.standard_normal((1, 1, x_shape[-1], c)) / np.sqrt(x_shape[-1]), jnp.float32)
    rest = _ghost_operands((*x_shape[:3], c), kernel, seed + 1)[1:]
    gate = None if gate_hw is None else jax.nn.sigmoid(
        jnp.asarray(rng.standard_normal((x_shape[0], *gate_hw, features)), jnp.float32))
    return x, primary, rest, gate


@pytest.mark.parametrize('x_shape,c,kernel,features,relu,gate_hw', MODULE_CASES)
def test_ghost_module_form_runs_the_primary_conv_too(x_shape, c, kernel, features, relu, gate_hw):
    x, primary, rest, gate = _module_operands(x_shape, c, kernel, features, gate_hw)
    got = jax.jit(lambda x, w, *o: kgm.ghost_module(x, *o, features, relu, gate=gate, primary=w))(
        x, primary, *rest)
    assert got.shape == (*x_shape[:3], features)
    # the primary conv by XLA, then the cheap-half op
    p = jax.lax.conv_general_dilated(x, primary, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    want = kgm.ghost_module(p, *rest, features, relu, gate=gate)
    assert float(jnp.abs(want).max()) > 0.5
    assert rel_err(got, want) <= 1e-5
    ref = kgm.ghost_module_reference(x, *rest, features, relu, gate, primary)
    assert rel_err(got, ref) <= 1e-5


def test_ghost_module_form_gradients_reach_the_input_and_the_primary_kernel():
    x, primary, rest, gate = _module_operands((2, 6, 8, 12), 10, (3, 3), 20, (3, 4))
    loss = lambda f: lambda x, w, g, *o: jnp.sum(jnp.sin(f(x, *o, 20, True, g, w)))
    argnums = tuple(range(8))
    got = jax.grad(loss(lambda *a: kgm.ghost_module(*a[:8], gate=a[8], primary=a[9])),
                   argnums)(x, primary, gate, *rest)
    ref = jax.grad(loss(kgm.ghost_module_reference), argnums)(x, primary, gate, *rest)
    for g, r in zip(got, ref):
        assert float(jnp.abs(r).max()) > 0
        assert rel_err(g, r) <= 1e-5


def test_ghost_module_form_rejects_a_primary_kernel_of_the_wrong_shape():
    x, primary, rest, _ = _module_operands((1, 6, 8, 12), 10, (3, 3), 20, None)
    for bad in (jnp.ones((1, 1, 13, 10)), jnp.ones((3, 3, 12, 10)), jnp.ones((12, 10)), jnp.ones((1, 1, 12, 11))):
        with pytest.raises(ValueError, match='primary kernel|is not one of'):
            kgm.ghost_module(x, *rest, 20, True, primary=bad)


STRIDED_CASES = [  # (x shape, C, features, gate's spatial size, depthwise kernel, stride)
    ((2, 38, 11, 16), 24, 48, None, 3, 2),       # block 1's shape: several row chunks, odd width
    ((1, 12, 10, 24), 36, 72, (6, 5), 5, 2),     # block 3's: gated, 5x5
    ((2, 9, 7, 5), 7, 13, None, 3, 2),           # odd sizes, scalar channels
    ((2, 14, 14, 40), 60, 120, (7, 7), 3, 2),    # block 5's
    ((2, 41, 7, 16), 24, 48, (41, 7), 5, 2),     # 5x5, gated, 3 chunks of output rows, odd sizes
    ((1, 10, 9, 8), 12, 20, None, 5, 1),         # stride 1
]


@pytest.mark.parametrize('x_shape,c,features,gate_hw,dk,stride', STRIDED_CASES)
def test_strided_form_stores_only_the_depthwise_conv_after_the_module(x_shape, c, features, gate_hw, dk, stride):
    x, primary, rest, gate = _module_operands(x_shape, c, (3, 3), features, gate_hw)
    rng = np.random.default_rng(5)
    k3, s3, b3 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((dk, dk, 1, features), (features,),
                                                                             (features,)))
    strided = kgm.StridedDepthwise(k3, s3, b3, (stride, stride), ((dk // 2,) * 2,) * 2)
    got = jax.jit(lambda x: kgm.ghost_module(x, *rest, features, True, gate=gate, primary=primary,
                                                         strided=strided))(x)
    module = kgm.ghost_module(x, *rest, features, True, gate=gate, primary=primary)
    want = depthwise_conv(module, k3, (stride, stride), strided.padding, 'xla') * s3 + b3
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5
    # a linear loss: the cotangent does not depend on the forward's rounding (sin's would, at |y| ~ 100)
    weights = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)
    # every differentiable operand, the gate and the strided conv's included
    loss = lambda f: lambda x, w, g, k3, s3, b3: jnp.sum(
        weights * f(x, *rest, features, True, g, w, strided._replace(kernel=k3, scale=s3, bias=b3)))
    fused = lambda *a: kgm.ghost_module(*a[:8], gate=a[8], primary=a[9], strided=a[10])
    args = (x, primary, gate, k3, s3, b3)
    argnums = (0, 1, 3, 4, 5) if gate is None else tuple(range(6))
    for g, r in zip(jax.grad(loss(fused), argnums)(*args),
                    jax.grad(loss(kgm.ghost_module_reference), argnums)(*args)):
        assert float(jnp.abs(r).max()) > 0
        assert rel_err(g, r) <= 1e-5


def test_module_and_strided_forms_shard_over_the_batch_and_vmap():
    """The fused inference ops with their extra operands (primary kernel, gate, the strided
    conv's kernel and affine) and the pointwise conv also run per device under a batch-sharded
    jit, and under vmap."""
    code = '''
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from ghostnetv2_jax.kernels import ghost_module as dn
        from ghostnetv2_jax.kernels.pointwise import pointwise
        rng = np.random.default_rng(0)
        f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
        x, w, s1, b1, k, s2, b2 = f(8, 12, 10, 16), f(1, 1, 16, 12), f(12), f(12), f(3, 3, 1, 12), f(12), f(12)
        gate = jax.nn.sigmoid(f(8, 6, 5, 24))
        strided = dn.StridedDepthwise(f(3, 3, 1, 24), f(24), f(24), (2, 2), ((1, 1), (1, 1)))
        run = jax.jit(lambda x, g: (dn.ghost_module(x, s1, b1, k, s2, b2, 24, True, gate=g, primary=w),
                                    dn.ghost_module(x, s1, b1, k, s2, b2, 24, True, gate=g, primary=w,
                                                   strided=strided),
                                    pointwise(x, w[0, 0], b1, True)))
        mesh = Mesh(np.array(jax.devices()), ('data',))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))
        one, four = run(x, gate), run(put(x), put(gate))
        hlo = run.lower(put(x), put(gate)).compile().as_text()
        err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        mapped = jax.vmap(run)(x.reshape(2, 4, 12, 10, 16), gate.reshape(2, 4, 6, 5, 24))
        print(json.dumps({'devices': jax.device_count(), 'all_gather': 'all-gather' in hlo,
                          'spec': [list(o.sharding.spec) for o in four],
                          'sharded': max(err(a, b) for a, b in zip(four, one)),
                          'vmap': max(err(m.reshape(o.shape), o) for m, o in zip(mapped, one))}))
    '''
    out = _run(code, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    assert out['devices'] == 4 and not out['all_gather']
    assert out['spec'] == [['data'], ['data'], ['data']]
    assert out['sharded'] <= 1e-6 and out['vmap'] <= 1e-6, out


def test_strided_form_rejects_what_it_does_not_fuse():
    x, primary, rest, _ = _module_operands((1, 8, 8, 12), 10, (3, 3), 20, None)
    good = kgm.StridedDepthwise(jnp.ones((3, 3, 1, 20)), jnp.ones(20), jnp.ones(20), (2, 2),
                                             ((1, 1), (1, 1)))
    p = jax.lax.conv_general_dilated(x, primary, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    bad = {'module form': dict(p=p, primary=None, strided=good),
           'is not one of': dict(strided=good._replace(kernel=jnp.ones((7, 7, 1, 20)))),
           'scale and bias': dict(strided=good._replace(bias=jnp.ones(19))),
           'symmetric padding': dict(strided=good._replace(padding=((0, 1), (1, 1)))),
           'smaller than the kernel': dict(strided=good._replace(padding=((3, 3), (1, 1))))}
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message):
            kgm.ghost_module(kwargs.pop('p', x), *rest, 20, True,
                                         primary=kwargs.pop('primary', primary), **kwargs)


# ----------------------------------------------------------------------------- stem_conv
STEM_CASES = [  # (x shape NHWC, kernel HWIO, stride, padding)
    ((2, 15, 17, 3), (3, 3, 3, 16), 2, ((1, 1), (1, 1))),    # the GhostNet stem: 2 blocks of 8
    ((1, 12, 10, 3), (3, 3, 3, 24), 2, ((1, 1), (1, 1))),    # 3 blocks, even size
    ((2, 9, 11, 4), (3, 3, 4, 32), 1, ((1, 1), (1, 1))),     # 4 blocks, stride 1
    ((1, 8, 9, 3), (3, 3, 3, 8), 2, ((0, 2), (2, 0))),       # uneven padding
    ((2, 7, 6, 3), (5, 5, 3, 12), 1, ((2, 2), (2, 2))),      # a width with no blocked version
    ((1, 6, 7, 2), (3, 3, 2, 16), 3, ((1, 1), (1, 1))),
]


def _stem_operands(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    cout = k_shape[-1]
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, k_shape, (cout,), (cout,))]


@pytest.mark.parametrize('x_shape,k_shape,stride,padding', STEM_CASES)
@pytest.mark.parametrize('relu', [True, False])
def test_stem_conv_matches_xla_conv_with_affine_and_relu(x_shape, k_shape, stride, padding, relu):
    ops = _stem_operands(x_shape, k_shape)
    strides = (stride, stride)
    got = jax.jit(lambda *o: kstem.stem_conv(*o, strides, padding, relu))(*ops)
    want = kstem.stem_conv_reference(*ops, strides, padding, relu)
    assert got.shape == want.shape
    assert float(jnp.abs(want).max()) > 0.1
    assert rel_err(got, want) <= 1e-6


def test_stem_conv_gradients_and_bad_operands():
    ops = _stem_operands((2, 9, 10, 3), (3, 3, 3, 16))
    args = ((2, 2), ((1, 1), (1, 1)), True)
    loss = lambda f: lambda *o: jnp.sum(jnp.sin(f(*o, *args)))
    got = jax.grad(loss(kstem.stem_conv), argnums=(0, 1, 2, 3))(*ops)
    ref = jax.grad(loss(kstem.stem_conv_reference), argnums=(0, 1, 2, 3))(*ops)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-5
    with pytest.raises(ValueError, match='do not fit'):
        kstem.stem_conv(ops[0], jnp.ones((3, 3, 4, 16)), *ops[2:], *args)
    with pytest.raises(ValueError, match='non-negative padding'):
        kstem.stem_conv(*ops, (2, 2), ((-1, 1), (1, 1)))


# ----------------------------------------------------------------------------- pointwise conv
def _pointwise_operands(x_shape, cout, seed=0):
    rng = np.random.default_rng(seed)
    cin = x_shape[-1]
    x = np.maximum(rng.standard_normal(x_shape), 0).astype(np.float32)   # a ReLU's output
    return x, (rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32), \
        rng.standard_normal(cout).astype(np.float32)


# Every tile the op has: 48-channel tiles, then 32, 16, 8 and 4 channels and single ones; 7-row
# tiles and single rows (maps of 1x1 to 13x11 pixels, one and three images); Cin below, at and
# past one 64-channel block.
POINTWISE_CASES = [((1, 7, 7, 160), 480), ((3, 13, 11, 24), 36), ((1, 1, 1, 96), 1000),
                   ((2, 5, 3, 64), 101), ((1, 2, 3, 65), 7), ((1, 4, 4, 5), 20), ((1, 3, 4, 3), 1)]


@pytest.mark.parametrize('x_shape,cout', POINTWISE_CASES)
@pytest.mark.parametrize('relu,with_bias', [(True, True), (False, True), (False, False)])
def test_pointwise_matches_the_matmul_with_bias_and_relu(x_shape, cout, relu, with_bias):
    x, k, b = _pointwise_operands(x_shape, cout)
    b = b if with_bias else None
    got = jax.jit(lambda x, k: kpw.pointwise(x, k, b, relu))(x, k)
    want = kpw.pointwise_reference(x, k, np.zeros(cout, np.float32) if b is None else b, relu)
    assert got.shape == want.shape == (*x_shape[:3], cout)
    assert float(jnp.abs(want).max()) > 0.1
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize('x_shape,cout', [
    ((1, 7, 7, 960), 160),     # a 7x7 stage's ghost2 primary conv at 224: 960 terms per output
    ((1, 1, 1, 960), 1280),    # conv_head
    ((1, 1, 1, 1280), 1000),   # the classifier
    ((4, 14, 14, 480), 112),   # a 14x14 stage's ghost2, four images
])
def test_pointwise_is_float32_noise_at_imagenet_reduction_lengths(x_shape, cout):
    """Within 2x of XLA's matmul's distance from float64. Summed in one float accumulator over
    960 input channels it was 3x XLA's; the sum is taken in blocks of 64 channels."""
    x, k, b = _pointwise_operands(x_shape, cout)
    exact = np.einsum('nhwc,cd->nhwd', x.astype(np.float64), k.astype(np.float64)) + b
    got = jax.jit(kpw.pointwise)(x, k, b)
    ref = jax.jit(lambda *o: kpw.pointwise_reference(*o, False))(x, k, b)
    assert _l2(got, exact) <= 2 * _l2(ref, exact), (_l2(got, exact), _l2(ref, exact))


def test_pointwise_on_one_image_gives_the_same_bits_every_call():
    """One image's tiles go to the spinning helper threads, several images' to XLA's pool;
    whichever thread takes a tile, every output is summed in the same order."""
    x, k, b = _pointwise_operands((3, 14, 14, 112), 336)
    f = jax.jit(lambda x: kpw.pointwise(x, k, b, True))
    one = {np.asarray(f(x[:1])).tobytes() for _ in range(50)}
    three = np.asarray(f(x))
    assert len(one) == 1
    assert np.frombuffer(one.pop(), np.float32).tobytes() == three[:1].tobytes()


def test_pointwise_gradients_and_bad_operands():
    x, k, b = _pointwise_operands((2, 3, 5, 12), 20)
    loss = lambda f: lambda *o: jnp.sum(jnp.sin(f(*o, True)))
    got = jax.grad(loss(kpw.pointwise), argnums=(0, 1, 2))(x, k, b)
    ref = jax.grad(loss(kpw.pointwise_reference), argnums=(0, 1, 2))(x, k, b)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= 1e-5
    with pytest.raises(ValueError, match='does not fit NHWC input'):
        kpw.pointwise(x, jnp.ones((13, 20)), b)
    with pytest.raises(ValueError, match='does not fit NHWC input'):
        kpw.pointwise(x[0], k, b)
    with pytest.raises(ValueError, match='bias'):
        kpw.pointwise(x, k, jnp.ones((21,)))


# ----------------------------------------------------------------------------- BatchNorm sums
@pytest.mark.parametrize('shape', [(40, 9, 9, 20), (3, 5, 7, 6), (1, 33, 17, 12), (2, 1, 1, 5)])
def test_batch_norm_moments_are_the_float64_mean_and_biased_variance(shape):
    """Whole examples per worker (40), rows of one example split over workers (1, 2, 3); a
    channel mean 15 times its spread must not cost the variance its digits (shifted sums)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, shape[-1]) + 30).astype(np.float32)
    mean, var = jax.jit(kbn.batch_norm_moments)(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(40, 9, 9, 20), (1, 33, 17, 12)])
def test_batch_norm_grad_sums_are_sum_g_and_sum_g_times_centred_x(shape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 30).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    mean = x.astype(np.float64).mean((0, 1, 2)).astype(np.float32)
    sg, sgc = jax.jit(kbn.batch_norm_grad_sums)(g, x, mean)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(sg, g64.sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    centred = x - mean.astype(np.float64)
    np.testing.assert_allclose(sgc, (g64 * centred).sum((0, 1, 2)), rtol=1e-5, atol=1e-4)


def test_batch_norm_train_with_native_sums_equals_autodiff_of_the_xla_reductions():
    """Output, statistics and every gradient (input, scale, bias) of the training-mode op, which
    on CPU runs the native sums, against autodiff of BatchNorm written with XLA's reductions."""
    from ghostnetv2_jax.layers.batchnorm import batch_norm_train
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 12, 10, 8)) * 3 + 5, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)

    def plain(x, s, b, eps):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + eps) * s + b, mean, var

    def run(bn):
        loss = lambda x, s, b: jnp.sum(jnp.sin(bn(x, s, b, 1e-5)[0]))
        fn = jax.jit(lambda x, s, b: (bn(x, s, b, 1e-5), jax.grad(loss, argnums=(0, 1, 2))(x, s, b)))
        return fn, fn(x, scale, bias)
    fn, (out_n, grads_n) = run(batch_norm_train)
    _, (out_x, grads_x) = run(plain)
    hlo = fn.lower(x, scale, bias).as_text()
    assert 'gnv2_batchnorm_moments' in hlo and 'gnv2_batchnorm_grad_sums' in hlo
    for a, b in zip((*out_n, *grads_n), (*out_x, *grads_x)):
        assert rel_err(a, b) <= 1e-5


def test_batch_norm_sums_shard_over_the_batch_and_vmap():
    """A batch-sharded BatchNorm train step keeps the batch sharded (no all-gather) and equals
    the single-device one: each device sums its examples, XLA adds the devices' sums."""
    code = '''
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from ghostnetv2_jax.layers.batchnorm import batch_norm_train
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((8, 6, 5, 4)) + 2, jnp.float32)
        s, b = jnp.full((4,), 1.5, jnp.float32), jnp.full((4,), 0.1, jnp.float32)
        loss = lambda x: jnp.sum(jnp.sin(batch_norm_train(x, s, b, 1e-5)[0]))
        step = jax.jit(jax.value_and_grad(loss))
        mesh = Mesh(np.array(jax.devices()), ('data',))
        xs = jax.device_put(x, NamedSharding(mesh, P('data')))
        (l1, g1), (l4, g4) = step(x), step(xs)
        hlo = step.lower(xs).compile().as_text()
        err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        print(json.dumps({'devices': jax.device_count(), 'all_gather': 'all-gather' in hlo,
                          'spec': list(g4.sharding.spec), 'loss': err(l4, l1), 'grad': err(g4, g1)}))
    '''
    out = _run(code, XLA_FLAGS='--xla_force_host_platform_device_count=4')
    assert out['devices'] == 4 and not out['all_gather'] and out['spec'] == ['data']
    assert max(out['loss'], out['grad']) <= 1e-5, out
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 5, 4)), jnp.float32)
    per_map = jax.vmap(kbn.batch_norm_moments)(xs)
    one_by_one = [kbn.batch_norm_moments(x) for x in xs]
    for i, (m, v) in enumerate(one_by_one):
        assert rel_err(per_map[0][i], m) <= 1e-6 and rel_err(per_map[1][i], v) <= 1e-6


def test_batch_norm_sums_reject_bad_operands():
    with pytest.raises(Exception, match='g and x must have one shape'):
        jax.jit(kbn.batch_norm_grad_sums)(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 4, 4)),
                                                       jnp.zeros((4,)))
    with pytest.raises(Exception, match=r'mean must be \(C\)'):
        jax.jit(kbn.batch_norm_grad_sums)(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4)),
                                                       jnp.zeros((5,)))


@pytest.mark.parametrize('impl', ['auto', 'shift', 'xla'])
def test_models_train_with_the_native_batch_norm_sums_where_lowered_for_cpu(impl):
    """Every BatchNorm of a train step (forward statistics, backward sums) uses the native
    reductions where the step is lowered for CPU, whatever the depthwise impl; lowered for TPU,
    none; eval mode uses none of them."""
    from ghostnetv2_jax import create_model
    model = create_model('ghostnetv2_100', cfgs=(((3, 16, 16, 0, 1),), ((3, 48, 24, 0, 2),)), num_classes=10,
                         depthwise_impl=impl)
    x = jnp.zeros((2, 64, 64, 3), jnp.float32)
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                             jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    n_bn = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
               if getattr(path[-1], 'key', None) == 'mean')

    def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.PRNGKey(1)})
        return jnp.sum(logits)
    train_hlo = jax.jit(jax.grad(loss)).lower(variables['params']).as_text()
    tpu_hlo = jax.export.export(jax.jit(jax.grad(loss)), platforms=['tpu'])(variables['params']).mlir_module()
    eval_hlo = jax.jit(model.apply).lower(variables, x).as_text()
    assert train_hlo.count('@gnv2_batchnorm_moments(') == n_bn
    assert train_hlo.count('@gnv2_batchnorm_grad_sums(') == n_bn
    assert 'gnv2_' not in tpu_hlo
    assert 'gnv2_batchnorm' not in eval_hlo


# ----------------------------------------------------------------------------- ImageNet-like reductions
# Each native op against float64 where its sums are as long as in ImageNet training (224x224 inputs,
# batch 32: 112x112 maps, 10^5-10^6 terms per channel), with the portable jnp form of the same op
# (what GHOSTNETV2_NATIVE=0 runs) as the yardstick: float32 noise is what that form shows, and the
# native op may be at most twice as far from float64. (XLA's grouped conv is no yardstick for the
# depthwise kernel gradient: it is 2-6e-6 from float64 at these sizes, the native op 1.5e-7.)
def _l2(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _depthwise64(x, k, g, stride, padding):
    """Float64 forward, input gradient and kernel gradient of the depthwise conv, with numpy."""
    (pt, pb), (pl, pr) = padding
    kh, kw = k.shape[:2]
    x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = g.shape[1:3]
    tap = lambda a, i, j: a[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    y, dxp, dk = np.zeros(g.shape), np.zeros(xp.shape), np.zeros(k.shape)
    for i in range(kh):
        for j in range(kw):
            y += tap(xp, i, j) * k[i, j, 0]
            tap(dxp, i, j)[...] += g * k[i, j, 0]
            dk[i, j, 0] = np.sum(tap(xp, i, j) * g, axis=(0, 1, 2))
    return y, dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2]], dk


@pytest.mark.parametrize('shape,kernel,stride', [
    ((32, 112, 112, 8), (3, 3), 1),    # block 0's cheap op at 224, batch 32: 401k terms per channel
    ((32, 112, 112, 16), (3, 3), 2),   # a stride-2 block's depthwise conv
    ((32, 28, 28, 72), (1, 5), 1),     # a DFC attention conv (1x5)
    ((2, 224, 224, 8), (3, 3), 1),     # two examples: one example's rows split over the workers
])
def test_depthwise_is_float32_noise_at_imagenet_reduction_lengths(shape, kernel, stride):
    """Forward, input and kernel gradient of the native depthwise conv within 2x of the portable
    form's distance from float64. The kernel gradient sums N*Ho*Wo products per tap and channel;
    summed in one float per example (12544 terms at 112x112) it was 1e-6 from float64, ten
    times the portable form's 1e-7 (the float partials are now flushed into double)."""
    kh, kw = kernel
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)   # a ReLU's output
    k = (rng.standard_normal((kh, kw, 1, shape[-1])) * 0.3).astype(np.float32)
    ho, wo = (shape[1] + 2 * (kh // 2) - kh) // stride + 1, (shape[2] + 2 * (kw // 2) - kw) // stride + 1
    g = rng.standard_normal((shape[0], ho, wo, shape[-1])).astype(np.float32)
    want = _depthwise64(x, k, g, stride, padding)

    def run(impl):
        f = lambda x, k: depthwise_conv(x, k, (stride, stride), padding, impl)
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(k))
        return (y, *vjp(jnp.asarray(g)))
    native, portable = jax.jit(lambda: run('native'))(), jax.jit(lambda: run('shift'))()
    for name, got, ref, exact in zip(('forward', 'grad input', 'grad kernel'), native, portable, want):
        err, yardstick = _l2(got, exact), _l2(ref, exact)
        assert err <= 2 * yardstick, (name, err, yardstick)


@pytest.mark.parametrize('shape', [(1, 112, 112, 16), (2, 56, 56, 72), (3, 64, 64, 8)])
def test_depthwise_kernel_gradient_is_deterministic_when_an_examples_rows_are_split(shape):
    """With fewer examples than twice the workers, one example's rows are split over the thread
    pool. The rows go in fixed chunks, each summed into its own slot, so the result does not
    depend on which thread claimed which chunk: every call returns the same bits."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.zeros((3, 3, 1, shape[-1]), jnp.float32)
    f = jax.jit(lambda x, g: kdw.depthwise_grads(x, k, g, (1, 1), PAD)[1])
    results = {np.asarray(f(x, g)).tobytes() for _ in range(50)}
    assert len(results) == 1


def test_batch_norm_sums_are_float32_noise_at_imagenet_reduction_lengths():
    """The moments and gradient sums over 64x56x56 = 200k pixels per channel (a stage-1
    BatchNorm at 224, batch 64), with channel means of up to 15 times their spread, within 2x of
    the jnp reductions' distance from float64 (``batch_norm_*_reference``: XLA's)."""
    rng = np.random.default_rng(0)
    shape = (64, 56, 56, 24)
    x = (rng.standard_normal(shape) * rng.uniform(0.2, 2, 24) + rng.uniform(-3, 3, 24)).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    mean64 = x64.mean((0, 1, 2))
    moments = jax.jit(kbn.batch_norm_moments)(x), jax.jit(kbn.batch_norm_moments_reference)(x)
    exact = (mean64, np.square(x64 - mean64).mean((0, 1, 2)))
    for name, got, ref, want in zip(('mean', 'variance'), *moments, exact):
        assert _l2(got, want) <= 2 * _l2(ref, want), (name, _l2(got, want), _l2(ref, want))
    mean = np.asarray(moments[0][0])
    sums = (jax.jit(kbn.batch_norm_grad_sums)(g, x, mean), jax.jit(kbn.batch_norm_grad_sums_reference)(g, x, mean))
    exact = (g64.sum((0, 1, 2)), (g64 * (x64 - mean.astype(np.float64))).sum((0, 1, 2)))
    for name, got, ref, want in zip(('sum g', 'sum g * (x - mean)'), *sums, exact):
        assert _l2(got, want) <= 2 * _l2(ref, want), (name, _l2(got, want), _l2(ref, want))
