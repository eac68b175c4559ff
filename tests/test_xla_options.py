"""The compiler options the trainer, evaluator and benchmark compile with."""
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
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

    def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.PRNGKey(1)})
        return jnp.sum(logits ** 2)
    ours = xla_options.jit(jax.grad(loss), train=True)(variables['params'])
    plain = jax.jit(jax.grad(loss))(variables['params'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours, plain)
