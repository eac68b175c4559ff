"""The Flax network computes the same numbers as timm's: eval logits, train mode, gradients.

The reference's BN statistics and affine parameters are randomised and its classifier scaled to
logits of order 10 (see parity.randomize_): a fresh init would hide conversion bugs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from ghostnetv2_jax import convert, create_model, list_models, parity, xla_options

TOL = 1e-4   # max |flax - torch| / max |torch|, the acceptance tolerance

# Every model at 224 with batch 1 and at an odd, non-square size with batch 3; the flagship also
# with the other two combinations.
CASES = [(m, 1, (224, 224)) for m in list_models()] + [(m, 3, (97, 131)) for m in list_models()] + \
        [('ghostnetv2_100', 2, (224, 224)), ('ghostnetv2_100', 1, (97, 131))]


@pytest.fixture(scope='module')
def references():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = parity.timm_model(name, seed=len(cache))
        return cache[name]
    return get


@pytest.mark.parametrize('name,batch,size', CASES, ids=[f'{m}-b{b}-{h}x{w}' for m, b, (h, w) in CASES])
def test_eval_logits_match_timm(references, name, batch, size):
    ref = references(name)
    images = np.random.default_rng(batch).standard_normal((batch, *size, 3)).astype(np.float32)
    report = parity.compare(name, ref, images)
    assert report.logit_scale > 3, 'logits too small to reveal conversion bugs'
    assert report.relative < TOL, '\n'.join(report.lines())
    assert max(report.stage_diffs) < 1e-3, '\n'.join(report.lines())


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_train_mode_forward_running_stats_gradients_and_sgd_step_match_torch():
    name, lr = 'ghostnetv2_100', 1.0   # a large step, so gradient errors show in the parameters
    ref = parity.timm_model(name, seed=7, drop_rate=0.0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 128, 128, 3)).astype(np.float32)
    y = rng.integers(0, 1000, 4)

    ref.train()
    logits_t = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    F.cross_entropy(logits_t, torch.from_numpy(y)).backward()
    grads_t = {k: p.grad.clone() for k, p in ref.named_parameters()}
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    zeros = {k: torch.zeros_like(v) for k, v in before.items() if k not in grads_t}
    grads_t = convert.torch_to_flax({**grads_t, **zeros}, name)['params']
    after_t = convert.torch_to_flax(ref.state_dict(), name)

    model = create_model(name, drop_rate=0.0)
    v = convert.torch_to_flax(before, name)

    def loss_fn(params):
        logits, state = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                                    mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, state)

    # compiled as the trainer compiles its step (this project's XLA options)
    grads, (logits, state) = xla_options.jit(jax.grad(loss_fn, has_aux=True), train=True)(v['params'])
    params = jax.tree.map(lambda p, g: p - lr * g, v['params'], grads)

    assert rel_err(logits, logits_t.detach().numpy()) < TOL
    # Gradients as one vector: some leaves are zero in exact arithmetic (a BN bias whose shift the
    # next 1x1 conv + train-mode BN removes again) and hold only float32 noise on both sides, so a
    # per-leaf relative measure would compare noise with noise.
    g_ours, g_theirs = _leaves(grads), _leaves(grads_t)
    assert g_ours.keys() == g_theirs.keys()
    assert rel_err(np.concatenate([g_ours[k].ravel() for k in g_ours]),
                   np.concatenate([g_theirs[k].ravel() for k in g_ours])) < TOL
    # Parameters after the step and the updated running statistics: every leaf on its own scale.
    for kind, ours, theirs in [('param', params, after_t['params']),
                               ('batch_stats', state['batch_stats'], after_t['batch_stats'])]:
        ours, theirs = _leaves(ours), _leaves(theirs)
        assert ours.keys() == theirs.keys()
        errors = {k: rel_err(ours[k], theirs[k]) for k in ours}
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f'{kind} {worst}: {errors[worst]:.2e}'


@pytest.mark.parametrize('impl', ['xla', 'shift'])
def test_both_depthwise_implementations_match_timm(references, impl):
    images = np.random.default_rng(11).standard_normal((2, 97, 131, 3)).astype(np.float32)
    report = parity.compare('ghostnetv2_100', references('ghostnetv2_100'), images, depthwise_impl=impl)
    assert report.relative < TOL, '\n'.join(report.lines())
