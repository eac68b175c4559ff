"""The registered (linen) models used from Flax NNX through ``flax.nnx.bridge.ToNNX``, as the
README's "Using the models from NNX" shows: eval and train forward (BatchNorm statistics
updated), a few ``nnx.Optimizer`` steps, and converted weights loaded into the NNX module."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import bridge

from conftest import randomized_variables
from ghostnetv2_jax import create_model

# a two-stage GhostNetV2 with DFC attention and SE: every kind of submodule, compiled quickly
CFGS = (((3, 16, 16, 0.25, 1),), ((3, 48, 24, 0, 2),))


def _nnx_model(linen_model, images):
    model = bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, dropout=1))
    bridge.lazy_init(model, images)
    return model


def _load(model, variables):
    """Linen variables (converted weights, ghostnetv2_jax.weights) into the NNX module."""
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, variables['params'])
    nnx.replace_by_pure_dict(stats, variables['batch_stats'])
    nnx.update(model, params, stats)


def test_converted_weights_give_the_linen_models_logits_from_nnx():
    linen_model = create_model('ghostnetv2_100', cfgs=CFGS, num_classes=5, attention_blocks=(1,))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = randomized_variables(linen_model, images, seed=4)
    model = _nnx_model(linen_model, images)
    _load(model, variables)
    np.testing.assert_array_equal(model(images), linen_model.apply(variables, images))


def test_train_forward_updates_batch_statistics_and_the_optimizer_lowers_the_loss():
    linen_model = create_model('ghostnetv2_100', cfgs=CFGS, num_classes=4, attention_blocks=(1,), drop_rate=0.0)
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    labels = jnp.arange(8) % 4
    model = _nnx_model(linen_model, images)
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    model(images, train=True, mutable=['batch_stats'])
    assert any(not np.array_equal(a, b) for a, b in zip(stats, jax.tree.leaves(nnx.state(model, nnx.BatchStat))))

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images, train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, images, labels)) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
