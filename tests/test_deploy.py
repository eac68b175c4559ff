"""deploy.fold_batchnorm: the BN-folded inference model gives the eval model's logits."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ghostnetv2_jax import create_model, deploy
from ghostnetv2_jax.bench import random_variables

# fp32: folding reorders one multiply per conv output (conv(x, k) * m vs conv(x, k * m)), so the
# logits move by a few float32 ulps of the accumulations; measured ~6e-7 relative.
TOLERANCE = 1e-5

# A small architecture with every kind of conv -> BN pair: stem, ghost modules, a stride-2
# depthwise, a projection shortcut with 5x5 depthwise, SE, attention, the final 1x1 stage.
TINY = (((3, 16, 16, 0, 1),), ((5, 48, 24, 0.25, 2),), ((3, 72, 24, 0, 1),))


def _randomised(model, images, seed=0):
    """Variables with random BN statistics and affine parameters: zero means and unit variances
    would make folding trivially exact."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], 'key', '')
        shape = leaf.shape
        value = {'var': lambda: rng.uniform(0.5, 2.0, shape), 'scale': lambda: rng.uniform(0.5, 1.5, shape),
                 'mean': lambda: rng.normal(0, 0.2, shape), 'bias': lambda: rng.normal(0, 0.2, shape)}.get(
            name, lambda: np.asarray(leaf))()
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, random_variables(model, images, seed))


def _logits(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x))(variables, images)


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
    with pytest.raises(ValueError, match='features_only'):
        dmodel.apply(dvars, images, features_only=True)
    with pytest.raises(ValueError, match='already folded'):
        deploy.fold_batchnorm(dmodel, dvars)
    with pytest.raises(ValueError, match="'params' and 'batch_stats'"):
        deploy.fold_batchnorm(model, {'params': variables['params']})


def test_stride2_block_with_a_kernel_the_fused_ops_lack_keeps_its_own_conv():
    """A 7x7 stride-2 block (no fused kernel of that size): ghost1 still fuses, conv_dw runs after."""
    from ghostnetv2_jax.models import ghostnet
    cfgs = (((3, 16, 16, 0, 1),), ((7, 48, 24, 0, 2),))
    model = create_model('ghostnetv2_100', cfgs=cfgs, depthwise_impl='native', attention_blocks=())
    images = _images((2, 32, 32, 3))
    variables = _randomised(model, images)
    fused = _logits(model, variables, images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ghostnet.GhostModule, '_fused_cheap_op', lambda self, train: False)
        mp.setattr(ghostnet.GhostNet, '_fused_stem', lambda self, train, features_only: False)
        unfused = _logits(model, variables, images)
    assert rel_err(fused, unfused) <= 1e-6


@pytest.mark.parametrize('folded,hw,gated', [(False, (64, 72), 1), (True, (64, 72), 1), (True, (60, 68), 0)])
def test_fused_ghost_op_gives_the_unfused_logits(monkeypatch, folded, hw, gated):
    """Inference on CPU fuses each ghost module's BN, activation, cheap conv and concatenation
    (nn.depthwise_native.ghost_cheap), and DFC's gate where the map's size is a whole multiple of
    the pooled one (at 60x68 the DFC block's 15x17 map is not), and the stem's conv, BN and ReLU
    (stem_conv), and the primary 1x1 conv of modules with narrow inputs
    (FUSED_PRIMARY_MAX_CHANNELS), with a stride-2 block's conv_dw and bn_dw after it: same logits
    as the separate ops, eval and BN-folded."""
    from ghostnetv2_jax.models import ghostnet
    model = create_model('ghostnetv2_100', cfgs=TINY, depthwise_impl='native')
    images = _images((2, *hw, 3))
    variables = _randomised(model, images)
    if folded:
        model, variables = deploy.fold_batchnorm(model, variables)
    hlo = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).as_text()
    # every ghost module of TINY fused; those with inputs of <= 40 channels with their primary conv
    calls = lambda name: len(re.findall(rf'custom_call @{name}\(', hlo))
    # (and the stride-2 block's ghost1 with its conv_dw and bn_dw)
    assert calls('gnv2_ghost_module') + calls('gnv2_ghost_module_gated') == 3
    assert calls('gnv2_ghost_module_strided') == 1
    assert calls('gnv2_depthwise_forward') == 3    # shortcut_dw and DFC's two 1-D convs; not conv_dw
    assert calls('gnv2_ghost_cheap') + calls('gnv2_ghost_cheap_gated') == 2
    assert calls('gnv2_ghost_module_gated') == gated   # the one DFC block's ghost1
    fused = _logits(model, variables, images)
    assert hlo.count('gnv2_stem_conv') == 1
    monkeypatch.setattr(ghostnet.GhostModule, '_fused_cheap_op', lambda self, train: False)
    monkeypatch.setattr(ghostnet.GhostNet, '_fused_stem', lambda self, train, features_only: False)
    unfused = _logits(model, variables, images)
    assert float(jnp.abs(unfused).max()) > 0.1
    assert rel_err(fused, unfused) <= 1e-6
