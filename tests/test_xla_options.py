"""The compiler options the trainer, evaluator and benchmark compile with."""
import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax import create_model, xla_options


def test_options_are_per_backend_kind_of_step_and_depthwise_impl():
    opts = xla_options.compiler_options
    assert opts(train=True, backend='cpu', depthwise='native') == xla_options.TRAIN_CPU_OPTIONS
    assert opts(train=True, backend='cpu', depthwise='native') is not xla_options.TRAIN_CPU_OPTIONS
    assert opts(train=True, backend='cpu', depthwise='shift') == xla_options.SHIFT_TRAIN_CPU_OPTIONS
    assert xla_options.SHIFT_TRAIN_CPU_OPTIONS['xla_cpu_use_fusion_emitters'] is False
    assert opts(train=True, backend='cpu') == xla_options.TRAIN_CPU_OPTIONS   # 'auto' is native here
    assert opts(train=False, backend='cpu') is None    # inference: XLA's defaults
    for backend in ('gpu', 'tpu'):
        assert opts(train=True, backend=backend) is None


def test_this_jaxlib_accepts_every_cpu_option():
    # XLA rejects unknown option names ("No such compile option"): a jaxlib upgrade that drops one
    # must fail here, not in the first training step.
    for options in (xla_options.TRAIN_CPU_OPTIONS, xla_options.SHIFT_TRAIN_CPU_OPTIONS):
        compiled = jax.jit(lambda x: x * 2, compiler_options=options).lower(jnp.ones(3)).compile()
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
