"""The compiler options the trainer, evaluator and benchmark compile with."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax import create_model, xla_options


def test_options_are_per_backend_and_kind_of_step():
    assert xla_options.compiler_options(train=True, backend='cpu') == xla_options.TRAIN_CPU_OPTIONS
    assert xla_options.compiler_options(train=True, backend='cpu') is not xla_options.TRAIN_CPU_OPTIONS
    assert xla_options.compiler_options(train=False, backend='cpu') is None    # inference: XLA's defaults
    for backend in ('gpu', 'tpu'):
        assert xla_options.compiler_options(train=True, backend=backend) is None


def test_this_jaxlib_accepts_every_cpu_option():
    # XLA rejects unknown option names ("No such compile option"): a jaxlib upgrade that drops one
    # must fail here, not in the first training step.
    compiled = jax.jit(lambda x: x * 2, compiler_options=xla_options.TRAIN_CPU_OPTIONS).lower(jnp.ones(3)).compile()
    np.testing.assert_array_equal(compiled(jnp.ones(3)), 2 * np.ones(3))


def test_train_jit_computes_what_plain_jit_computes():
    model = create_model('ghostnetv2_100', cfgs=(((3, 16, 16, 0, 1),), ((3, 48, 24, 0, 2),)), num_classes=10)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    variables = xla_options.run_once(model.init, jax.random.PRNGKey(0), x)   # LLVM -O0: compiled for one call

    def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.PRNGKey(1)})
        return jnp.sum(logits ** 2)
    ours = xla_options.jit(jax.grad(loss), train=True)(variables['params'])
    plain = jax.jit(jax.grad(loss))(variables['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours, plain)


_DISPATCH_PROBE = """
import sys, jax, jax.numpy as jnp
from ghostnetv2_jax import xla_options
if sys.argv[1] == 'sync':
    xla_options.dispatch_cpu_synchronously()
f = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ y), x))
x = jnp.ones((512, 512)) / 512
f(x).block_until_ready()                 # compiled; the next call only runs
y = f(x)
print(y.is_ready())
"""


def test_dispatch_cpu_synchronously_returns_after_the_computation_ran():
    import subprocess
    import sys
    run = lambda mode: subprocess.run([sys.executable, '-c', _DISPATCH_PROBE, mode], capture_output=True,
                                      text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    sync, default = run('sync'), run('async')
    assert sync.returncode == 0 and default.returncode == 0, sync.stderr + default.stderr
    assert sync.stdout.split()[-1] == 'True'       # the call returned once the computation had run
    assert default.stdout.split()[-1] == 'False'   # JAX's default: the call returns at dispatch
