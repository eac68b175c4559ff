"""runtime: predict_fn computes the model's logits on every variant (fused native ops, chunks of
the batch, BN folded), and lowers without CPU custom calls for other platforms."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import randomized_variables, rel_err
from ghostnetv2_jax import create_model, get_spec, list_models, runtime
from ghostnetv2_jax.models.ghostnet import GhostNet
from ghostnetv2_jax.runtime import chunking, cpu_fusion
from ghostnetv2_jax.train.trainer import make_eval_step

# A V2 architecture small enough to compile quickly, with a stride-2 block, DFC attention and SE.
TINY = (((3, 16, 16, 0, 1),), ((5, 48, 24, 0.25, 2),), ((3, 72, 24, 0, 1),))
# Chunks change the M dimension of every 1x1-conv matmul, so XLA may block the float32
# accumulations differently: a few ulps, measured ~5e-7 relative on the full model.
TOLERANCE = 1e-5


# Parity of the fused runtime: the unchanged tolerance of the project's parity tests.
PARITY = 1e-4
O0 = {'xla_backend_optimization_level': 0}   # LLVM -O0: the same numbers, a fraction of the compile (every
# program here is compiled for one or two calls)


def _setup(batch=11, size=48):
    model = create_model('ghostnetv2_100', cfgs=TINY, num_classes=10, attention_blocks=(1, 2))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)
    return model, randomized_variables(model, images[:1]), images


def _images(batch, hw, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *hw, 3)), jnp.float32)


def _check_runtime(model, hw, batch=3, folded=True):
    """predict_fn of the eval and (``folded``) of the BN-folded model against the plain-XLA
    model's logits, and the fused ops were used."""
    images = _images(batch, hw)
    variables = randomized_variables(model, images[:1])
    xla_model = model.clone(depthwise_impl='xla')
    ref = jax.jit(lambda v, x: xla_model.apply(v, x), compiler_options=O0)(variables, images)
    assert float(jnp.abs(ref).max()) > 0.1
    predict = jax.jit(runtime.predict_fn(model), compiler_options=O0)
    assert 'gnv2_ghost_module' in predict.lower(variables, images).as_text()
    assert rel_err(predict(variables, images), ref) <= PARITY
    if folded:
        dmodel, dvars = runtime.fold_batchnorm(model, variables)
        got = jax.jit(runtime.predict_fn(dmodel), compiler_options=O0)(dvars, images)
        assert rel_err(got, ref) <= PARITY


SIZES = [(64, 96), (97, 71)]   # even, and odd non-square (DFC's gate is then not a whole up-sampling)


# GhostNetV3's training form has no fused ops: predict_fn runs its deploy form
# (runtime.reparameterize, a BN-folded V2 network), checked in tests/test_ghostnetv3.py.
FUSED_MODELS = [name for name in list_models() if get_spec(name).version != 'v3']


# Every model at one of the two sizes (in turn), the released V2 at both: a width changes channel
# counts, which each size exercises alike; the sizes' difference is DFC's gate path. The BN-folded
# form on the released V2 (both sizes): every variant below is checked folded too, on a table with
# every kind of block, V1 and another width among them, and modules narrower and wider than the
# fused primary conv's limit (cpu_fusion.FUSED_PRIMARY_MAX_CHANNELS).
MODEL_SIZES = [(name, SIZES[i % 2]) for i, name in enumerate(FUSED_MODELS)] + \
    [('ghostnetv2_100', hw) for hw in SIZES if ('ghostnetv2_100', hw) not in
     [(name, SIZES[i % 2]) for i, name in enumerate(FUSED_MODELS)]]


@pytest.mark.parametrize('name,hw', MODEL_SIZES, ids=[f'{n}-{h[0]}x{h[1]}' for n, h in MODEL_SIZES])
def test_predict_fn_equals_the_plain_xla_model_on_every_registered_model(name, hw):
    _check_runtime(create_model(name, num_classes=10), hw, folded=name == 'ghostnetv2_100')


# A short table with every kind of block (stride-2 blocks with 3x3 and 5x5 kernels, SE, identity
# and projection shortcuts; ghost modules narrower and wider than the fused primary conv's limit),
# so that each ablation variant compiles quickly.
SHORT = (((3, 16, 16, 0, 1),), ((3, 48, 24, 0, 2),), ((5, 72, 40, 0.25, 2),), ((3, 120, 40, 0, 1),))
VARIANTS = {
    'se': dict(attention='se'),
    'cbam': dict(attention='cbam'),
    'coord': dict(attention='coord'),
    'dfc_7x7': dict(attention_kwargs=dict(kernel=(7, 7))),
    'dfc_max_pool': dict(attention_kwargs=dict(downsample='max')),
    'dfc_hard_sigmoid': dict(attention_kwargs=dict(gate='hard_sigmoid')),
    'dfc_gate_after_bilinear': dict(attention_kwargs=dict(gate_before_upsample=False, upsample='bilinear')),
    'dfc_no_downsample': dict(attention_kwargs=dict(downsample='none')),
    'attention_on_ghost2': dict(attention_position='ghost2'),
    'width_075': dict(width=0.75),
    'v1': dict(attention='none'),
}


# Every variant of DFC (and attention on ghost2) at both sizes: their difference is DFC's gate
# path. SE, CBAM, Coordinate Attention and V1 have no DFC, and a width changes channel counts,
# which each size exercises alike: one size each (the odd one where the attention pools maps).
ONE_SIZE = {'se': SIZES[0], 'cbam': SIZES[1], 'coord': SIZES[1], 'v1': SIZES[0], 'width_075': SIZES[1]}
VARIANT_SIZES = [(v, hw) for v in sorted(VARIANTS) for hw in ([ONE_SIZE[v]] if v in ONE_SIZE else SIZES)]


@pytest.mark.parametrize('variant,hw', VARIANT_SIZES, ids=[f'{v}-{h[0]}x{h[1]}' for v, h in VARIANT_SIZES])
def test_predict_fn_equals_the_plain_xla_model_on_the_ablation_variants(variant, hw):
    model = create_model('ghostnetv2_100', cfgs=SHORT, num_classes=10, attention_blocks=(1, 2, 3),
                         **VARIANTS[variant])
    _check_runtime(model, hw)


def test_modules_the_ops_do_not_implement_run_as_written():
    """Another activation, ratio or dtype: no fused op replaces the module, the logits are the
    model's; fuse=False runs every module as written."""
    import flax.linen as nn
    from ghostnetv2_jax.models import ghostnet
    images = _images(2, (64, 64))
    model = create_model('ghostnetv2_100', cfgs=SHORT, num_classes=10)
    variables = randomized_variables(model, images[:1])
    hlo = lambda m, **kw: jax.jit(runtime.predict_fn(m, **kw)).lower(variables, images).as_text()
    fused, unfused = hlo(model), hlo(model, fuse=False)
    assert 'gnv2_ghost_module' in fused and 'gnv2_stem_conv' in fused
    assert 'gnv2_ghost_module' not in unfused and 'gnv2_stem_conv' not in unfused
    assert 'gnv2_ghost_module' not in hlo(model.clone(depthwise_impl='xla'))

    class GeluGhostModule(ghostnet.GhostModule):   # a researcher's edit, as a subclass
        act: object = nn.gelu
    original = ghostnet.GhostModule
    try:
        ghostnet.GhostModule = GeluGhostModule
        text = hlo(model)
        ref = jax.jit(lambda v, x: model.apply(v, x), compiler_options=O0)(variables, images)
        got = jax.jit(runtime.predict_fn(model), compiler_options=O0)(variables, images)
    finally:
        ghostnet.GhostModule = original
    assert 'gnv2_ghost_module' not in text
    assert rel_err(got, ref) <= PARITY


@pytest.mark.parametrize('folded,hw,gated', [(False, (64, 72), 1), (True, (64, 72), 1), (True, (60, 68), 0)])
def test_fused_ops_replace_the_modules_they_implement(folded, hw, gated):
    """On CPU each ghost module's BN, activation, cheap conv and concatenation run as one op, with
    DFC's gate where the map's size is a whole multiple of the pooled one (at 60x68 the DFC
    block's 15x17 map is not), the primary 1x1 conv of modules with narrow inputs, and a stride-2
    block's conv_dw and bn_dw; the stem conv too. Same logits as the modules run as written."""
    model = create_model('ghostnetv2_100', cfgs=TINY)
    images = _images(2, hw)
    variables = randomized_variables(model, images[:1])
    if folded:
        model, variables = runtime.fold_batchnorm(model, variables)
    predict = jax.jit(runtime.predict_fn(model, chunk=None), compiler_options=O0)
    hlo = predict.lower(variables, images).as_text()
    calls = lambda name: len(re.findall(rf'custom_call @{name}\(', hlo))
    assert calls('gnv2_ghost_module') + calls('gnv2_ghost_module_gated') == 3
    assert calls('gnv2_ghost_module_strided') == 1
    assert calls('gnv2_depthwise_forward') == 3    # shortcut_dw and DFC's two 1-D convs; not conv_dw
    assert calls('gnv2_ghost_module_after_primary') + calls('gnv2_ghost_module_after_primary_gated') == 2
    assert calls('gnv2_ghost_module_gated') == gated   # the one DFC block's ghost1
    assert calls('gnv2_stem_conv') == 1
    # The other 1x1 convs (DFC's, SE's two, the shortcut's, the two wide ghost2 primaries, the
    # last stage's), conv_head and the classifier: two images are at most NATIVE_POINTWISE_MAX_IMAGES.
    assert calls('gnv2_pointwise') == 9
    unfused = jax.jit(runtime.predict_fn(model, chunk=None, fuse=False), compiler_options=O0)(variables, images)
    assert float(jnp.abs(unfused).max()) > 0.1
    assert rel_err(predict(variables, images), unfused) <= 1e-6


def test_a_batch_of_more_images_keeps_xlas_matmul_for_the_1x1_convs():
    """Past NATIVE_POINTWISE_MAX_IMAGES images (a chunk of the batch, where XLA's matmul is as
    fast), the 1x1 convs and the classifier stay XLA's dots; the ghost modules still fuse."""
    model = create_model('ghostnetv2_100', cfgs=TINY)
    images = _images(cpu_fusion.NATIVE_POINTWISE_MAX_IMAGES + 1, (32, 32))
    variables = randomized_variables(model, images[:1])
    predict = jax.jit(runtime.predict_fn(model, chunk=None), compiler_options=O0)
    hlo = predict.lower(variables, images).as_text()
    assert 'gnv2_pointwise' not in hlo and 'gnv2_ghost_module' in hlo
    assert len(re.findall(r'dot_general', hlo)) == 9
    unfused = jax.jit(runtime.predict_fn(model, chunk=None, fuse=False), compiler_options=O0)(variables, images)
    assert rel_err(predict(variables, images), unfused) <= 1e-6


def test_only_unstrided_unpadded_1x1_convs_run_as_the_pointwise_op():
    """A 1x1 conv with stride 2, or padding, or a 3x3 kernel runs as written; a plain one (with or
    without its bias) runs as the op. The same outputs either way."""
    import flax.linen as nn

    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return (nn.Conv(8, (1, 1), strides=2)(x), nn.Conv(8, (1, 1), padding=1)(x), nn.Conv(8, (3, 3))(x),
                    nn.Conv(8, (1, 1))(x), nn.Conv(8, (1, 1), use_bias=False)(x))

    model, x = Convs(), _images(1, (6, 6))
    variables = randomized_variables(model, x)

    def fused(v, x):
        with cpu_fusion.fused():
            return model.apply(v, x)
    assert len(re.findall(r'custom_call @gnv2_pointwise\(', jax.jit(fused).lower(variables, x).as_text())) == 2
    for got, want in zip(jax.jit(fused)(variables, x), model.apply(variables, x)):
        assert rel_err(got, want) <= 1e-6


def test_stride2_block_with_a_kernel_the_fused_ops_lack_keeps_its_own_conv():
    """A 7x7 stride-2 block (no fused kernel of that size): ghost1 still fuses, conv_dw runs after."""
    cfgs = (((3, 16, 16, 0, 1),), ((7, 48, 24, 0, 2),))
    model = create_model('ghostnetv2_100', cfgs=cfgs, attention_blocks=())
    images = _images(2, (32, 32))
    variables = randomized_variables(model, images[:1])
    predict = jax.jit(runtime.predict_fn(model, chunk=None), compiler_options=O0)
    assert 'gnv2_ghost_module_strided' not in predict.lower(variables, images).as_text()
    unfused = jax.jit(runtime.predict_fn(model, chunk=None, fuse=False), compiler_options=O0)(variables, images)
    assert rel_err(predict(variables, images), unfused) <= 1e-6


# predict_fn of the released model exported for CUDA and TPU, without CPU custom calls and with
# XLA's convolutions: tests/test_export.py.


@pytest.fixture(scope='module')
def whole_batch():
    """_setup()'s model, variables and 11 images, and the model's logits over the whole batch."""
    model, variables, images = _setup()
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=O0)(variables, images)
    assert float(jnp.abs(ref).max()) > 0.1
    return model, variables, images, ref


@pytest.mark.parametrize('chunk', [4, 5, 11, 16, 0, None])
def test_chunked_logits_match_the_whole_batch_with_and_without_a_remainder(whole_batch, chunk):
    model, variables, images, ref = whole_batch
    got = jax.jit(runtime.predict_fn(model, chunk), compiler_options=O0)(variables, images)
    chex.assert_shape(got, ref.shape)
    assert rel_err(got, ref) <= TOLERANCE


def test_chunked_folded_model_and_feature_maps_match(whole_batch):
    model, variables, images, ref = whole_batch
    dmodel, dvars = runtime.fold_batchnorm(model, variables)
    assert rel_err(jax.jit(runtime.predict_fn(dmodel, 4), compiler_options=O0)(dvars, images), ref) <= TOLERANCE
    feats = jax.jit(runtime.predict_fn(model, 4, method='forward_intermediates'),
                    compiler_options=O0)(variables, images)
    ref_feats = jax.jit(lambda v, x: model.apply(v, x, train=False, method='forward_intermediates'),
                        compiler_options=O0)(variables, images)
    chex.assert_trees_all_equal_shapes(feats, ref_feats)
    assert len(feats[1]) == 2   # TINY's maps at strides 2 and 4
    for got, want in zip(jax.tree.leaves(feats), jax.tree.leaves(ref_feats)):
        assert rel_err(got, want) <= TOLERANCE


def test_forward_features_and_forward_head_compose_to_the_logits_and_the_old_flags_are_gone():
    model, variables, images = _setup(batch=3, size=64)
    apply = jax.jit(model.apply, static_argnames=('train', 'method'), compiler_options=O0)
    logits = apply(variables, images, train=False)
    maps = apply(variables, images, train=False, method='forward_features')
    chex.assert_shape(maps, (3, 16, 16, 72))   # TINY's last map before pooling (stride 4, 72 wide)
    assert rel_err(apply(variables, maps, train=False, method='forward_head'), logits) <= TOLERANCE
    head = jax.jit(runtime.predict_fn(model, 2, method='forward_head', pre_logits=True),
                   compiler_options=O0)(variables, maps)
    chex.assert_shape(head, (3, 1280))
    chunked_maps = jax.jit(runtime.predict_fn(model, 1, method=GhostNet.forward_features),
                           compiler_options=O0)(variables, images)
    assert rel_err(chunked_maps, maps) <= TOLERANCE
    for old_flag in ({'part': 'features'}, {'features_only': True}):
        with pytest.raises(TypeError, match='unexpected keyword'):
            model.apply(variables, images, **old_flag)


def test_the_head_runs_once_outside_the_chunk_loop():
    """Its 1280-wide conv and classifier read their weights once, not once per chunk."""
    model, variables, images = _setup(batch=16)
    jaxpr = jax.make_jaxpr(runtime.predict_fn(model, 4, fuse=False))(variables, images).jaxpr
    loop = next(e for e in jaxpr.eqns if e.primitive.name == 'scan')
    # conv_head's output, (images, 1, 1, 1280) or flattened; its kernel is a loop input either way
    head_out = lambda rows, text: re.search(rf'f32\[{rows},(1,1,)?1280\]', text) is not None
    assert not head_out(4, str(loop.params['jaxpr']))
    assert head_out(16, str(jaxpr))
    # the other entry points run whole in each chunk; forward_intermediates has no head
    feats = jax.make_jaxpr(runtime.predict_fn(model, 4, fuse=False, method='forward_intermediates',
                                              intermediates_only=True))(variables, images).jaxpr
    assert not head_out(16, str(feats))


def test_only_a_batch_of_at_least_one_loop_step_is_looped():
    fn = lambda x: x * 2.0
    step = 8 * chunking.CPU_STREAMS
    small = jax.make_jaxpr(runtime.chunked(fn, 8))(jnp.zeros((step - 1, 3)))
    large = jax.make_jaxpr(runtime.chunked(fn, 8))(jnp.zeros((step + 4, 3)))
    assert 'scan' not in str(small) and 'scan' in str(large)   # lax.map is a scan
    x = jnp.arange(step + 4.0)
    np.testing.assert_array_equal(runtime.chunked(fn, 8)(x), x * 2)


@pytest.mark.parametrize('streams', [1, 3])
def test_any_number_of_streams_gives_the_same_outputs(streams):
    fn = lambda x: {'double': x * 2.0, 'sum': jnp.sum(x, axis=1)}
    x = jnp.arange(3 * 29.0).reshape(29, 3)
    got = jax.jit(runtime.chunked(fn, 4, streams))(x)
    chex.assert_trees_all_equal(got, fn(x))
    with pytest.raises(ValueError, match='streams must be'):
        runtime.chunked(fn, 4, 0)


def test_auto_chunks_on_cpu_only_and_bad_chunks_are_refused():
    assert runtime.resolve_chunk('auto', 'cpu') == runtime.CPU_CHUNK
    assert runtime.resolve_chunk('auto', 'gpu') is None and runtime.resolve_chunk('auto', 'tpu') is None
    assert runtime.resolve_chunk(0, 'cpu') is None and runtime.resolve_chunk(None, 'tpu') is None
    assert runtime.resolve_chunk(3, 'cpu') == 3 and runtime.resolve_chunk(3, 'tpu') == 3
    for bad in (-1, 2.5, 'eight', True):
        with pytest.raises(ValueError, match='chunk must be'):
            runtime.resolve_chunk(bad, 'cpu')


def test_chunking_is_for_one_device_only():
    one = Mesh(np.array(jax.devices()[:1]), ('data',))
    assert runtime.chunk_for(one) == 'auto'
    several = Mesh(np.array(jax.devices()[:1] * 2), ('data',))   # only its size is read
    assert runtime.chunk_for(several) is None


def test_eval_step_sums_are_the_same_chunked():
    model, variables, images = _setup()
    batch = {'images': images, 'labels': jnp.arange(11) % 10, 'mask': jnp.ones(11).at[-2:].set(0)}
    ref = jax.jit(make_eval_step(model), compiler_options=O0)(variables, batch)
    got = jax.jit(make_eval_step(model, 4), compiler_options=O0)(variables, batch)
    assert float(got['count']) == 9.0
    chex.assert_trees_all_close(got, ref, rtol=TOLERANCE)


@pytest.mark.parametrize('folded', [False, True])
def test_bound_predict_fn_takes_only_the_images_and_gives_predict_fns_numbers(folded):
    """The weights are part of the compiled program: its one argument is the images. The numbers
    are predict_fn's (the eval model's BatchNorm affines, computed while compiling, within an ulp
    of XLA's at run time)."""
    model, variables, images = _setup(batch=3)
    if folded:
        model, variables = runtime.fold_batchnorm(model, variables)
    bound = jax.jit(runtime.bound_predict_fn(model, variables), compiler_options=O0)
    assert len(jax.tree.leaves(bound.lower(images).args_info)) == 1
    want = jax.jit(runtime.predict_fn(model), compiler_options=O0)(variables, images)
    assert float(jnp.abs(want).max()) > 0.1
    assert rel_err(bound(images), want) <= 1e-6
    features = runtime.bound_predict_fn(model, variables, method='forward_features')
    assert jax.jit(features)(images).shape == model.apply(variables, images, method='forward_features').shape
