"""runtime.fold_batchnorm: the BN-folded inference model gives the eval model's logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomized_variables, rel_err
from ghostnetv2_jax import create_model
from ghostnetv2_jax.runtime import deploy

# fp32: folding reorders one multiply per conv output (conv(x, k) * m vs conv(x, k * m)), so the
# logits move by a few float32 ulps of the accumulations; measured ~6e-7 relative.
TOLERANCE = 1e-5

# A small architecture with every kind of conv -> BN pair: stem, ghost modules, a stride-2
# depthwise, a projection shortcut with 5x5 depthwise, SE, attention, the final 1x1 stage.
TINY = (((3, 16, 16, 0, 1),), ((5, 48, 24, 0.25, 2),), ((3, 72, 24, 0, 1),))


def _randomised(model, images, seed=0):
    """Variables with random BN statistics and affine parameters: zero means and unit variances
    would make folding trivially exact."""
    return randomized_variables(model, images, seed)


def _logits(model, variables, images):
    """Compiled for one call: at LLVM -O0 (the same numbers, a fraction of the compile)."""
    return jax.jit(lambda v, x: model.apply(v, x), compiler_options={'xla_backend_optimization_level': 0})(
        variables, images)


def _images(shape=(2, 64, 72, 3)):
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


def test_released_v2_model_folded_logits_match_eval_logits():
    model = create_model('ghostnetv2_100')
    images = _images()
    variables = _randomised(model, images)
    dmodel, dvars = deploy.fold_batchnorm(model, variables)
    ref, got = _logits(model, variables, images), _logits(dmodel, dvars, images)
    assert float(jnp.abs(ref).max()) > 0.1   # not a degenerate, all-zero comparison
    assert rel_err(got, ref) <= TOLERANCE


@pytest.mark.parametrize('attention', ['dfc', 'coord', 'cbam', 'se'])
def test_every_attention_variant_folds_and_keeps_logits(attention):
    model = create_model('ghostnet_100', cfgs=TINY, attention=attention, attention_blocks=(1, 2))
    images = _images()
    variables = _randomised(model, images)
    dmodel, dvars = deploy.fold_batchnorm(model, variables)
    assert rel_err(_logits(dmodel, dvars, images), _logits(model, variables, images)) <= TOLERANCE


def test_deploy_tree_is_what_the_deploy_model_declares_and_the_original_is_untouched():
    model = create_model('ghostnet_100', cfgs=TINY, attention='dfc', attention_blocks=(1, 2))
    images = _images()
    variables = _randomised(model, images)
    before = jax.tree_util.tree_map(np.array, variables)
    dmodel, dvars = deploy.fold_batchnorm(model, variables)
    declared = jax.eval_shape(dmodel.init, jax.random.PRNGKey(0), images)
    chex.assert_trees_all_equal_shapes_and_dtypes(declared, dvars)
    assert set(dvars) == {'params'}                                  # no batch_stats left
    assert set(dvars['params']['bn1']) == {'bias'}
    assert set(dvars['params']['blocks_1_0']['ghost1']['attn']['bn_w']) == {'bias'}
    chex.assert_trees_all_equal(variables, before)                  # the input was not modified
    assert model.fold_bn is False and dmodel.fold_bn is True


def test_deploy_model_is_inference_only_and_bad_input_is_refused():
    model = create_model('ghostnet_100', cfgs=TINY, attention='none')
    images = _images()
    variables = _randomised(model, images)
    dmodel, dvars = deploy.fold_batchnorm(model, variables)
    with pytest.raises(ValueError, match='inference-only'):
        dmodel.apply(dvars, images, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
    with pytest.raises(ValueError, match='before bn1'):   # forward_intermediates' stride-2 map
        dmodel.apply(dvars, images, method='forward_intermediates')
    later = lambda m, v: m.apply(v, images, method='forward_intermediates', indices=[1], intermediates_only=True)
    assert rel_err(later(dmodel, dvars)[0], later(model, variables)[0]) <= TOLERANCE
    with pytest.raises(ValueError, match='already folded'):
        deploy.fold_batchnorm(dmodel, dvars)
    with pytest.raises(ValueError, match="'params' and 'batch_stats'"):
        deploy.fold_batchnorm(model, {'params': variables['params']})
