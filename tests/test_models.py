"""Registry, parameter/MAC counts, the entry points (timm's), feature maps and the architecture switches."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from conftest import rel_err
from ghostnetv2_jax import convert, create_model, get_spec, list_models, parity, summary
from ghostnetv2_jax.models.ghostnet import GHOSTNET_CFGS, GhostNet, feature_info

# Pinned like vision_transformer does: a new registered model without an entry fails here.
PARAMS = {'ghostnet_050': 2_587_292, 'ghostnet_100': 5_182_508, 'ghostnet_130': 7_358_820,
          'ghostnetv2_100': 6_156_908, 'ghostnetv2_130': 8_960_404, 'ghostnetv2_160': 12_392_698,
          # GhostNetV3: the re-parameterisable training form (its deploy form is V2's network)
          'ghostnetv3_050': 3_395_384, 'ghostnetv3_100': 8_129_028, 'ghostnetv3_130': 12_217_720,
          'ghostnetv3_160': 17_275_700}
# Published MACs at 224 (GhostNet paper Table 7, GhostNetV2 paper Table 2, GhostNetV3 paper: 0.17
# and 0.27 G, two digits; it gives none for 0.5x and 1.6x), in millions.
PAPER_MMACS = {'ghostnet_050': 42, 'ghostnet_100': 141, 'ghostnet_130': 226,
               'ghostnetv2_100': 167, 'ghostnetv2_130': 269, 'ghostnetv2_160': 399,
               'ghostnetv3_100': 170, 'ghostnetv3_130': 270}


# LLVM -O0 for the programs here that are compiled for one or two calls (as xla_options.run_once
# compiles a model's initialisation): the same operations, within float32 rounding of the
# default's numbers (measured 1e-7 relative), a fraction of the compile (the RNG-heavy init most).
# The bf16 tolerance test keeps XLA's defaults: its figure is documented for what users compile.
O0 = {'xla_backend_optimization_level': 0}


def timm_hook_macs(name):
    """MACs of timm's model counted by forward hooks on every Conv2d and Linear (thop's rule), and
    its parameter count. GhostNetV3's MACs are its deploy form's (timm's reparameterize_model), the
    network that runs at inference; its parameters are the training form's, the one timm builds."""
    from timm.utils.model import reparameterize_model
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    if name.startswith('ghostnetv3'):
        model = reparameterize_model(model)
    total = [0]

    def hook(mod, _inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features
    for m in model.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    return total[0], params


def test_registry_lists_every_model_and_every_one_is_pinned():
    assert list_models() == sorted(PARAMS)
    assert list_models('ghostnetv2_*') == ['ghostnetv2_100', 'ghostnetv2_130', 'ghostnetv2_160']
    assert list_models('ghostnetv3_*') == ['ghostnetv3_050', 'ghostnetv3_100', 'ghostnetv3_130', 'ghostnetv3_160']


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_params_and_macs_match_timm_and_the_paper(name):
    s = summary.summarize(name)
    timm_macs, timm_params = timm_hook_macs(name)
    assert s['params'] == PARAMS[name] == timm_params
    assert s['macs'] == timm_macs
    if name in PAPER_MMACS:
        assert abs(s['macs'] / 1e6 - PAPER_MMACS[name]) <= 0.02 * PAPER_MMACS[name]


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_eval_preprocessing_matches_timm_pretrained_cfg(name):
    ours = get_spec(name).pretrained
    cfg = timm.create_model(name).pretrained_cfg
    assert ours.input_size == tuple(cfg['input_size'][1:])
    assert ours.crop_pct == cfg['crop_pct'] and ours.interpolation == cfg['interpolation']
    assert ours.mean == tuple(cfg['mean']) and ours.std == tuple(cfg['std'])


def test_create_model_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match='unknown model'):
        create_model('ghostnetv4_100')
    with pytest.raises(TypeError, match='unknown overrides'):
        create_model('ghostnetv2_100', widht=2.0)


def test_forward_intermediates_gives_timms_features_only_maps():
    ref = parity.timm_model('ghostnetv2_100', seed=4)
    feats_ref = timm.create_model('ghostnetv2_100', features_only=True)
    # timm's feature wrapper flattens 'blocks.N' to 'blocks_N' and drops the head.
    sd = {k.replace('blocks.', 'blocks_', 1): v for k, v in ref.state_dict().items()}
    feats_ref.load_state_dict({k: v for k, v in sd.items() if k in feats_ref.state_dict()}, strict=True)
    feats_ref.eval()
    model = create_model('ghostnetv2_100')
    v = convert.torch_to_flax(ref.state_dict(), 'ghostnetv2_100')
    x = np.random.default_rng(0).standard_normal((2, 96, 80, 3)).astype(np.float32)
    ours = jax.jit(lambda v, x: model.apply(v, x, method='forward_intermediates', intermediates_only=True),
                   compiler_options=O0)(v, x)
    with torch.no_grad():
        theirs = feats_ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert [f['num_chs'] for f in feature_info(model)] == feats_ref.feature_info.channels()
    assert [f['reduction'] for f in feature_info(model)] == feats_ref.feature_info.reduction()
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert a.shape == b.permute(0, 2, 3, 1).shape
        assert rel_err(a, b.permute(0, 2, 3, 1).numpy()) < 1e-5


# The first four stages of the table (stride-2 stages 1 and 3, so 3 feature maps; SE and DFC
# attention): timm's entry points on a network that compiles in seconds.
SMALL = tuple(GHOSTNET_CFGS[:4])


@pytest.fixture(scope='module')
def small_v2():
    """(timm's GhostNetV2 on SMALL with randomised BN, its Flax conversion, the Flax model, images)."""
    from timm.models.ghostnet import GhostNet
    torch.manual_seed(6)
    ref = GhostNet([[list(r) for r in rows] for rows in SMALL], version='v2')
    parity.randomize_(ref, 6)
    ref.eval()
    v = convert.torch_to_flax(ref.state_dict(), 'ghostnetv2_100', cfgs=SMALL)
    x = np.random.default_rng(2).standard_normal((2, 56, 48, 3)).astype(np.float32)
    return ref, v, create_model('ghostnetv2_100', cfgs=SMALL), x


def _nchw(x_nhwc):
    return torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.numpy()


@pytest.mark.parametrize('indices,stop_early', [(None, False), (2, False), ([0, -1], True), ([1], True),
                                                ([0], True), ((2, 0, 2), False)])
def test_forward_intermediates_matches_timm_for_indices_and_stop_early(small_v2, indices, stop_early):
    ref, v, model, x = small_v2
    final, maps = jax.jit(lambda v, x: model.apply(v, x, method='forward_intermediates', indices=indices,
                                                    stop_early=stop_early), compiler_options=O0)(v, x)
    with torch.no_grad():
        final_ref, maps_ref = ref.forward_intermediates(_nchw(x), indices=indices, stop_early=stop_early)
        only_ref = ref.forward_intermediates(_nchw(x), indices=indices, stop_early=stop_early,
                                             intermediates_only=True)
    assert len(maps) == len(maps_ref) == len(only_ref)
    for a, b in zip([final, *maps], [final_ref, *maps_ref]):
        assert a.shape == _nhwc(b).shape
        assert rel_err(a, _nhwc(b)) < 1e-5
    only = jax.jit(lambda v, x: model.apply(v, x, method='forward_intermediates', indices=indices,
                                            stop_early=stop_early, intermediates_only=True),
                   compiler_options=O0)(v, x)
    chex.assert_trees_all_equal(only, maps)


def test_forward_features_and_forward_head_match_timm(small_v2):
    ref, v, model, x = small_v2
    with torch.no_grad():
        feats_ref = ref.forward_features(_nchw(x))
        pre_ref, logits_ref = ref.forward_head(feats_ref, pre_logits=True), ref(_nchw(x))
    feats = jax.jit(lambda v, x: model.apply(v, x, method='forward_features'), compiler_options=O0)(v, x)
    assert feats.shape == _nhwc(feats_ref).shape and feats.shape[-1] == 72   # SMALL's last expansion width
    assert rel_err(feats, _nhwc(feats_ref)) < 1e-5
    head = jax.jit(lambda v, f, pre: model.apply(v, f, method=GhostNet.forward_head, pre_logits=pre),
                   static_argnums=2, compiler_options=O0)
    pre = head(v, feats, True)
    assert pre.shape == (2, 1280) and pre.dtype == jnp.float32
    assert rel_err(pre, pre_ref.numpy()) < 1e-5
    assert rel_err(head(v, feats, False), logits_ref.numpy()) < 1e-5
    assert rel_err(jax.jit(model.apply, compiler_options=O0)(v, x), logits_ref.numpy()) < 1e-5


def test_forward_intermediates_refuses_bad_indices_and_layouts(small_v2):
    _, v, model, x = small_v2
    shapes = lambda **kw: jax.eval_shape(lambda: model.apply(v, x, method='forward_intermediates', **kw))
    with pytest.raises(ValueError, match='out of range'):
        shapes(indices=4)
    with pytest.raises(ValueError, match='out of range'):
        shapes(indices=[3])
    with pytest.raises(ValueError, match='out of range'):
        shapes(indices=[-4])
    with pytest.raises(ValueError, match="output_fmt must be 'NHWC'"):
        shapes(output_fmt='NCHW')
    assert len(shapes(indices=[-1], intermediates_only=True)) == 1


def _leaf_shapes(tree):
    return {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', ['ghostnet_050', 'ghostnetv2_100', 'ghostnetv3_050'])
def test_param_tree_is_timms_state_dict_and_the_entry_points_share_it(name):
    """The one compact method names the modules as timm does: the init tree maps onto timm's
    state_dict key for key and size; forward_features (= forward_intermediates) and forward_head
    build the two parts of that same tree. One model per version: every registered model's tree
    is timm's by the strict conversions of tests/test_parity.py."""
    model = create_model(name)
    x = jnp.zeros((1, 64, 64, 3))
    init = lambda inputs, method='__call__': jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0), inputs, method=method))
    logits, tree = init(x)
    ours = {convert.torch_name(c, tuple(k.key for k in path)): int(np.prod(leaf.shape))
            for c in tree for path, leaf in jax.tree_util.tree_flatten_with_path(tree[c])[0]}
    theirs = {k: t.numel() for k, t in timm.create_model(name).state_dict().items()
              if not k.endswith('num_batches_tracked')}
    assert ours == theirs
    features, body = init(x, 'forward_features')
    _, head = init(jnp.zeros(features.shape, features.dtype), 'forward_head')
    assert _leaf_shapes(init(x, 'forward_intermediates')[1]) == _leaf_shapes(body)
    assert not set(_leaf_shapes(body)) & set(_leaf_shapes(head))
    assert {**_leaf_shapes(body), **_leaf_shapes(head)} == _leaf_shapes(tree)
    assert logits.shape == (1, 1000) and set(head['params']) == {'conv_head', 'classifier'}


def _attention_sites(variables):
    """Module paths (block, ghost module) that hold an 'attn' submodule."""
    return sorted((b, g) for b, blk in variables['params'].items() if b.startswith('blocks_') and isinstance(blk, dict)
                  for g, mod in blk.items() if isinstance(mod, dict) and 'attn' in mod)


def _shapes(model, size=64):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def test_attention_goes_to_blocks_after_index_1_in_ghost1_by_default():
    sites = _attention_sites(_shapes(create_model('ghostnetv2_100')))
    assert len(sites) == 14 and all(g == 'ghost1' for _, g in sites)
    assert ('blocks_0_0', 'ghost1') not in sites and ('blocks_1_0', 'ghost1') not in sites
    assert _attention_sites(_shapes(create_model('ghostnet_100'))) == []


def test_attention_blocks_and_position_switches():
    v = _shapes(create_model('ghostnetv2_100', attention_blocks=(0, 15), attention_position='ghost2'))
    assert _attention_sites(v) == [('blocks_0_0', 'ghost2'), ('blocks_8_3', 'ghost2')]
    dfc = v['params']['blocks_8_3']['ghost2']['attn']
    assert dfc['conv']['kernel'].shape == (1, 1, 960, 160)   # from ghost2's input to its output width


@pytest.mark.parametrize('name', ['se', 'cbam', 'coord', 'none'])
def test_ghostnetv2_with_each_attention_variant_runs(name):
    full = create_model('ghostnetv2_100', attention=name, num_classes=7)
    assert (len(_attention_sites(_shapes(full))) == 14) == (name != 'none')
    # train-mode forward through the first four stages (blocks 2 and 3 hold attention): the whole
    # network compiles for tens of seconds and adds no other kind of site
    model = create_model('ghostnetv2_100', attention=name, num_classes=7, cfgs=GHOSTNET_CFGS[:4])
    x = jnp.ones((2, 64, 64, 3))
    v = jax.jit(model.init, compiler_options=O0)(jax.random.PRNGKey(0), x)
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                 rngs={'dropout': jax.random.PRNGKey(1)}), compiler_options=O0)(v, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert (len(_attention_sites(v)) == 2) == (name != 'none')


def test_dfc_kernel_switch_changes_the_fc_kernels():
    v = _shapes(create_model('ghostnetv2_100', attention_kwargs={'kernel': (7, 3)}))
    dfc = v['params']['blocks_3_0']['ghost1']['attn']
    assert dfc['fc_w']['kernel'].shape == (1, 3, 1, 72) and dfc['fc_h']['kernel'].shape == (7, 1, 1, 72)


BF16_TOLERANCE = 2e-2   # documented in the README: bf16 logits vs fp32, relative to max |logit|


def test_bf16_compute_stays_within_documented_tolerance_of_fp32():
    ref = parity.timm_model('ghostnetv2_100', seed=5)
    v = convert.torch_to_flax(ref.state_dict(), 'ghostnetv2_100')
    x = np.random.default_rng(1).standard_normal((4, 128, 128, 3)).astype(np.float32)
    fp32 = jax.jit(create_model('ghostnetv2_100').apply)(v, x)
    bf16 = jax.jit(create_model('ghostnetv2_100', dtype=jnp.bfloat16).apply)(v, x)
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, fp32) < BF16_TOLERANCE


def test_dropout_is_active_only_in_train_mode():
    model = create_model('ghostnet_050', drop_rate=0.5, num_classes=5, cfgs=GHOSTNET_CFGS[:2])
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))  # not constant: BN would zero it
    v = jax.jit(model.init, compiler_options=O0)(jax.random.PRNGKey(0), x)
    train = jax.jit(lambda v, r: model.apply(v, x, train=True, mutable=['batch_stats'], rngs={'dropout': r})[0],
                    compiler_options=O0)
    assert not np.allclose(train(v, jax.random.PRNGKey(1)), train(v, jax.random.PRNGKey(2)))
    ev = jax.jit(lambda v: model.apply(v, x), compiler_options=O0)
    np.testing.assert_array_equal(ev(v), ev(v))


def test_too_small_input_for_dfc_is_a_clear_error():
    with pytest.raises(ValueError, match='at least 33x33'):
        _shapes(create_model('ghostnetv2_100'), size=32)
    _shapes(create_model('ghostnetv2_100'), size=33)   # the smallest input whose last stage is 2x2
