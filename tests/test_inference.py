"""inference: the network run over chunks of the batch computes the whole batch's outputs."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import rel_err
from ghostnetv2_jax import create_model, deploy, inference
from ghostnetv2_jax.bench import random_variables
from ghostnetv2_jax.train.trainer import make_eval_step

# A V2 architecture small enough to compile quickly, with a stride-2 block, DFC attention and SE.
TINY = (((3, 16, 16, 0, 1),), ((5, 48, 24, 0.25, 2),), ((3, 72, 24, 0, 1),))
# Chunks change the M dimension of every 1x1-conv matmul, so XLA may block the float32
# accumulations differently: a few ulps, measured ~5e-7 relative on the full model.
TOLERANCE = 1e-5


def _setup(batch=11, size=48):
    model = create_model('ghostnetv2_100', cfgs=TINY, num_classes=10, attention_blocks=(1, 2))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)
    return model, random_variables(model, images[:1]), images


@pytest.mark.parametrize('chunk', [4, 5, 11, 16, 0, None])
def test_chunked_logits_match_the_whole_batch_with_and_without_a_remainder(chunk):
    model, variables, images = _setup()
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    got = jax.jit(inference.predict_fn(model, chunk))(variables, images)
    chex.assert_shape(got, ref.shape)
    assert float(jnp.abs(ref).max()) > 0.1
    assert rel_err(got, ref) <= TOLERANCE


def test_chunked_folded_model_and_feature_maps_match():
    model, variables, images = _setup()
    dmodel, dvars = deploy.fold_batchnorm(model, variables)
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert rel_err(jax.jit(inference.predict_fn(dmodel, 4))(dvars, images), ref) <= TOLERANCE
    feats = jax.jit(inference.predict_fn(model, 4, features_only=True))(variables, images)
    ref_feats = model.apply(variables, images, train=False, features_only=True)
    chex.assert_trees_all_equal_shapes(feats, ref_feats)
    for got, want in zip(feats, ref_feats):
        assert rel_err(got, want) <= TOLERANCE


def test_features_and_head_parts_compose_to_the_logits_and_bad_parts_are_refused():
    model, variables, images = _setup(batch=3, size=64)
    logits = model.apply(variables, images, train=False)
    maps = model.apply(variables, images, train=False, part='features')
    chex.assert_shape(maps, (3, 16, 16, 72))   # TINY's last map before pooling (stride 4, 72 wide)
    assert rel_err(model.apply(variables, maps, train=False, part='head'), logits) <= TOLERANCE
    with pytest.raises(ValueError, match='part must be'):
        model.apply(variables, images, part='neck')
    with pytest.raises(ValueError, match='features_only'):
        model.apply(variables, images, features_only=True, part='features')


def test_the_head_runs_once_outside_the_chunk_loop():
    """Its 1280-wide conv and classifier read their weights once, not once per chunk."""
    model, variables, images = _setup(batch=16)
    jaxpr = jax.make_jaxpr(inference.predict_fn(model, 4))(variables, images).jaxpr
    loop = next(e for e in jaxpr.eqns if e.primitive.name == 'scan')
    # conv_head's output, (images, 1, 1, 1280) or flattened; its kernel is a loop input either way
    head_out = lambda rows, text: re.search(rf'f32\[{rows},(1,1,)?1280\]', text) is not None
    assert not head_out(4, str(loop.params['jaxpr']))
    assert head_out(16, str(jaxpr))
    # features_only outputs are not split
    feats = jax.make_jaxpr(inference.predict_fn(model, 4, features_only=True))(variables, images).jaxpr
    assert not head_out(16, str(feats))


def test_only_a_batch_of_at_least_one_loop_step_is_looped():
    fn = lambda x: x * 2.0
    step = 8 * inference.CPU_STREAMS
    small = jax.make_jaxpr(inference.chunked(fn, 8))(jnp.zeros((step - 1, 3)))
    large = jax.make_jaxpr(inference.chunked(fn, 8))(jnp.zeros((step + 4, 3)))
    assert 'scan' not in str(small) and 'scan' in str(large)   # lax.map is a scan
    x = jnp.arange(step + 4.0)
    np.testing.assert_array_equal(inference.chunked(fn, 8)(x), x * 2)


@pytest.mark.parametrize('streams', [1, 3])
def test_any_number_of_streams_gives_the_same_outputs(streams):
    fn = lambda x: {'double': x * 2.0, 'sum': jnp.sum(x, axis=1)}
    x = jnp.arange(3 * 29.0).reshape(29, 3)
    got = jax.jit(inference.chunked(fn, 4, streams))(x)
    chex.assert_trees_all_equal(got, fn(x))
    with pytest.raises(ValueError, match='streams must be'):
        inference.chunked(fn, 4, 0)


def test_auto_chunks_on_cpu_only_and_bad_chunks_are_refused():
    assert inference.resolve_chunk('auto', 'cpu') == inference.CPU_CHUNK
    assert inference.resolve_chunk('auto', 'gpu') is None and inference.resolve_chunk('auto', 'tpu') is None
    assert inference.resolve_chunk(0) is None and inference.resolve_chunk(None) is None
    assert inference.resolve_chunk(3) == 3
    for bad in (-1, 2.5, 'eight', True):
        with pytest.raises(ValueError, match='chunk must be'):
            inference.resolve_chunk(bad)


def test_chunking_is_for_one_device_only():
    one = Mesh(np.array(jax.devices()[:1]), ('data',))
    assert inference.chunk_for(one) == 'auto'
    several = Mesh(np.array(jax.devices()[:1] * 2), ('data',))   # only its size is read
    assert inference.chunk_for(several) is None


def test_eval_step_sums_are_the_same_chunked():
    model, variables, images = _setup()
    batch = {'images': images, 'labels': jnp.arange(11) % 10, 'mask': jnp.ones(11).at[-2:].set(0)}
    ref = jax.jit(make_eval_step(model))(variables, batch)
    got = jax.jit(make_eval_step(model, 4))(variables, batch)
    assert float(got['count']) == 9.0
    chex.assert_trees_all_close(got, ref, rtol=TOLERANCE)
