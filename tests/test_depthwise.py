"""Depthwise conv: the 'shift' form (hand-written backward) and the 'native' XLA:CPU custom calls
against XLA's grouped conv.

Forward values and the gradients with respect to the input and the kernel must agree to 1e-5
(relative to the largest magnitude), over strides 1 and 2 (and 3), odd spatial sizes, square
and 1-D kernels, non-default padding and a channel multiplier.

bf16 tolerance: with bfloat16 compute the inputs and kernel are rounded to 8 significant bits
(relative step 2**-8 ~ 0.4%) and sums are formed in float32, so a bf16 result is expected within
BF16_TOLERANCE = 2e-2 (relative, max-norm) of the float32 one; measured 2e-3 to 5e-3 here.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ghostnetv2_jax import kernels
from ghostnetv2_jax.layers.depthwise import DepthwiseConv, check_impl, cpu_impl, depthwise_conv

TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2

CASES = [  # (input shape NHWC, kernel (kh, kw), stride, padding or None for k // 2)
    ((2, 9, 11, 5), (3, 3), 1, None),
    ((2, 9, 11, 5), (3, 3), 2, None),
    ((2, 10, 7, 4), (5, 5), 1, None),
    ((1, 13, 9, 3), (5, 5), 2, None),
    ((2, 7, 9, 6), (1, 5), 1, None),
    ((2, 9, 8, 3), (1, 5), 2, None),
    ((2, 8, 9, 3), (5, 1), 1, None),
    ((2, 11, 7, 3), (5, 1), 2, None),
    ((1, 10, 12, 4), (3, 3), 3, None),
    ((2, 8, 7, 3), (3, 3), 2, (0, 2)),       # asymmetric-in-effect padding
    ((1, 4, 5, 2), (5, 5), 1, (2, 2)),       # kernel larger than the input
    ((8, 9, 7, 20), (3, 3), 2, None),        # 'native': whole examples per worker, 16 + 4 channels
    ((2, 10, 11, 8), (3, 3), 1, None),       # 'native' blocked rows: multiples of 8 channels ...
    ((2, 9, 8, 12), (5, 5), 2, None),        # ... and a remainder, for every compiled kernel size
    ((1, 7, 9, 16), (1, 5), 1, None),
    ((1, 9, 7, 16), (5, 1), 1, None),
    ((1, 6, 5, 8), (5, 5), 1, (2, 2)),       # kernel wider than the interior: edges only
    ((2, 9, 7, 28), (5, 1), 2, None),        # 8-channel blocks, a 4-channel block, no scalar rest
]
IMPLS = ['shift', 'native']


def _pad(kernel, padding):
    ph, pw = (kernel[0] // 2, kernel[1] // 2) if padding is None else padding
    return ((ph, ph), (pw, pw))


def _forward_and_grads(impl, x, k, stride, padding, dtype=jnp.float32):
    """(y, dL/dx, dL/dk) for L = <y, g> with a fixed random cotangent g, all in float32."""
    def f(x, k):
        return depthwise_conv(x.astype(dtype), k.astype(dtype), (stride, stride), padding, impl)

    @jax.jit
    def run(x, k, g):
        y, vjp = jax.vjp(f, x, k)
        gx, gk = vjp(g.astype(y.dtype))
        return y.astype(jnp.float32), gx.astype(jnp.float32), gk.astype(jnp.float32)

    out_shape = jax.eval_shape(f, x, k).shape
    g = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)
    return run(x, k, g)


def _inputs(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal((*kernel, 1, shape[-1])), jnp.float32)
    return x, k


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('shape,kernel,stride,padding', CASES)
def test_impl_matches_xla_forward_and_gradients(impl, shape, kernel, stride, padding):
    x, k = _inputs(shape, kernel)
    pad = _pad(kernel, padding)
    ref = _forward_and_grads('xla', x, k, stride, pad)
    got = _forward_and_grads(impl, x, k, stride, pad)
    for name, a, b in zip(('forward', 'grad input', 'grad kernel'), got, ref):
        chex.assert_shape(a, b.shape)
        assert rel_err(a, b) <= TOLERANCE, f'{name}: {rel_err(a, b):.2e}'


@pytest.mark.parametrize('stride', [1, 2])
def test_channel_multiplier_module_gradients_agree(stride):
    """DepthwiseConv(multiplier=2): output channel o reads input channel o // 2, both impls."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 7, 3)), jnp.float32)
    results = {}
    for impl in ('xla', *IMPLS):
        module = DepthwiseConv(3, stride=stride, multiplier=2, impl=impl)
        variables = module.init(jax.random.PRNGKey(0), x)
        chex.assert_shape(variables['params']['kernel'], (3, 3, 1, 6))
        loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
        results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)
    l_ref, (gv_ref, gx_ref) = results['xla']
    for impl in IMPLS:
        l_got, (gv_got, gx_got) = results[impl]
        assert rel_err(l_got, l_ref) <= TOLERANCE, impl
        assert rel_err(gx_got, gx_ref) <= TOLERANCE, impl
        assert rel_err(gv_got['params']['kernel'], gv_ref['params']['kernel']) <= TOLERANCE, impl


@pytest.mark.parametrize('impl', ['shift', 'native', 'xla'])
def test_bf16_compute_within_documented_tolerance_of_fp32(impl):
    x, k = _inputs((2, 12, 10, 16), (3, 3))
    pad = _pad((3, 3), None)
    ref = _forward_and_grads(impl, x, k, 2, pad)
    got = _forward_and_grads(impl, x, k, 2, pad, dtype=jnp.bfloat16)
    for name, a, b in zip(('forward', 'grad input', 'grad kernel'), got, ref):
        err = rel_err(a, b)
        assert 0 < err <= BF16_TOLERANCE, f'{name}: {err:.2e}'   # > 0: bf16 really was used


def test_auto_is_native_where_lowered_for_cpu_and_xla_elsewhere_and_bad_impl_is_rejected():
    assert kernels.load(), kernels.load_error()   # the dev set-up has a compiler
    assert cpu_impl() == 'native'
    x, k = _inputs((1, 8, 8, 4), (3, 3))
    f = jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise_conv(x, k, (1, 1), ((1, 1), (1, 1))) ** 2), argnums=(0, 1)))
    assert 'gnv2_depthwise_grad_kernel' in f.lower(x, k).as_text()
    for platform in ('cuda', 'tpu'):
        text = jax.export.export(f, platforms=[platform])(x, k).mlir_module()
        assert 'gnv2_' not in text and 'convolution' in text, platform
    with pytest.raises(ValueError, match='depthwise impl must be one of'):
        check_impl('winograd')
    with pytest.raises(ValueError, match='depthwise impl must be one of'):
        depthwise_conv(x, k, impl='winograd')


@pytest.mark.parametrize('impl', IMPLS)
def test_fast_paths_have_no_grouped_convolution(impl):
    """The fast paths stay fast: no direction of 'shift' or 'native' lowers to a (grouped) conv."""
    x, k = _inputs((1, 8, 8, 4), (3, 3))
    f = lambda x, k: jnp.sum(depthwise_conv(x, k, (2, 2), ((1, 1), (1, 1)), impl) ** 2)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, k).as_text()
    assert 'convolution' not in hlo
