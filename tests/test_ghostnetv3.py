"""GhostNetV3: the re-parameterisable training form against timm, its checkpoints, its deploy form.

Every reference here has its BN statistics and affine parameters randomised in every branch
(``parity.randomize_`` reaches each BatchNorm2d, the branches' BatchNormAct2d included), so a
branch converted to the wrong place, or folded wrongly, shows. tests/test_parity.py runs the
full-size V3 models too (its cases are every registered model, at 224 and 97x131).

Most checks use a reduced table, the first four rows of GHOSTNET_CFGS: blocks 0-3 hold every
kind of V3 part (stride-1 and stride-2 bottlenecks, so the depthwise branches; SE; DFC attention
on blocks with index > 1; both shortcut forms), at a fraction of the compile time.
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from ghostnetv2_jax import convert, create_model, get_spec, parity, predict_fn
from ghostnetv2_jax.models.ghostnet import GHOSTNET_CFGS

TOL = 1e-4   # max |flax - torch| / max |torch|, the acceptance tolerance
V3_MODELS = ['ghostnetv3_050', 'ghostnetv3_100', 'ghostnetv3_130', 'ghostnetv3_160']
SMALL = tuple(GHOSTNET_CFGS[:4])
SMALL_NAME = 'ghostnetv3_050'


def _timm_small(seed: int, version: str = 'v3', **kwargs):
    """timm's GhostNet on the reduced table at 0.5x, BN randomised in every branch, eval mode."""
    from timm.models.ghostnet import GhostNet
    torch.manual_seed(seed)
    model = GhostNet([[list(r) for r in rows] for rows in SMALL], width=0.5, version=version, **kwargs)
    parity.randomize_(model, seed)
    return model.eval()


@pytest.fixture(scope='module')
def small():
    """(timm reference, its Flax conversion, the Flax model) on the reduced table."""
    ref = _timm_small(3)
    return ref, convert.torch_to_flax(ref.state_dict(), SMALL_NAME, cfgs=SMALL), create_model(SMALL_NAME, cfgs=SMALL)


def _torch_logits(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_registry_v3_specs():
    for name in V3_MODELS:
        spec = get_spec(name)
        assert spec.version == 'v3' and spec.model_kwargs()['num_conv_branches'] == 3
        assert spec.pretrained.input_size == (224, 224) and spec.pretrained.crop_pct == 0.875
        assert spec.pretrained.interpolation == 'bicubic'
    assert get_spec('ghostnetv3_100').top1_paper == 77.1 and get_spec('ghostnetv3_100').top1_timm == 76.93
    assert get_spec('ghostnetv3_100').pretrained.hf_hub_id == 'timm/ghostnetv3_100.in1k'
    assert get_spec('ghostnetv3_130').top1_paper == 79.1


def test_every_branch_bn_is_randomised(small):
    ref, _, _ = small
    branch_bns = [k for k in ref.state_dict() if '_rpr_' in k and k.endswith('running_var')]
    assert any('cheap_rpr_skip' in k for k in branch_bns) and any('dw_rpr_scale' in k for k in branch_bns)
    assert all(not torch.allclose(ref.state_dict()[k], torch.ones(1)) for k in branch_bns)


# Every width's parameter count equals timm's (tests/test_models.py), and every width's timm
# weights convert strictly (no missing, unexpected or mis-shaped tensor) with logits compared with
# timm's in test_parity.py (224 and 97x131); here the released width at one more odd, non-square size.
def test_eval_logits_match_timm_at_odd_size():
    name = 'ghostnetv3_100'
    ref = parity.timm_model(name, seed=V3_MODELS.index(name))
    variables = convert.torch_to_flax(ref.state_dict(), name)
    images = np.random.default_rng(5).standard_normal((2, 65, 97, 3)).astype(np.float32)
    expected = _torch_logits(ref, images)
    assert np.abs(expected).max() > 3, 'logits too small to reveal conversion bugs'
    assert rel_err(jax.jit(create_model(name).apply)(variables, images), expected) < TOL


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_train_forward_running_stats_and_sgd_step_match_torch():
    lr = 1.0   # a large step, so gradient errors show in the parameters
    ref = _timm_small(9, drop_rate=0.0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 48, 56, 3)).astype(np.float32)
    y = rng.integers(0, 1000, 4)

    ref.train()
    logits_t = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    F.cross_entropy(logits_t, torch.from_numpy(y)).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    after_t = convert.torch_to_flax(ref.state_dict(), SMALL_NAME, cfgs=SMALL)

    model = create_model(SMALL_NAME, cfgs=SMALL, drop_rate=0.0)
    v = convert.torch_to_flax(before, SMALL_NAME, cfgs=SMALL)

    def loss_fn(params):
        logits, state = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                                    mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, state)

    grads, (logits, state) = jax.jit(jax.grad(loss_fn, has_aux=True))(v['params'])
    params = jax.tree.map(lambda p, g: p - lr * g, v['params'], grads)

    assert rel_err(logits, logits_t.detach().numpy()) < TOL
    for kind, ours, theirs in [('param', params, after_t['params']),
                               ('batch_stats', state['batch_stats'], after_t['batch_stats'])]:
        ours, theirs = _leaves(ours), _leaves(theirs)
        assert ours.keys() == theirs.keys()
        errors = {k: rel_err(ours[k], theirs[k]) for k in ours}
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, f'{kind} {worst}: {errors[worst]:.2e}'


def _authors_format(sd):
    """timm's V3 state_dict as the authors' release writes it: branch BatchNorms named ``bn``
    (timm: ``bn1``) in the ghost modules and depthwise branches, thop's profiler buffers, and the
    whole under 'state_dict'."""
    out = {}
    for k, v in sd.items():
        if ('.ghost' in k or '.dw_rpr_' in k) and '.bn1.' in k:
            k = k.replace('.bn1.', '.bn.')
        out[k] = v
    out['total_ops'] = torch.zeros(1, dtype=torch.float64)
    out['total_params'] = torch.zeros(1, dtype=torch.float64)
    out['blocks.0.0.ghost1.total_ops'] = torch.zeros(1, dtype=torch.float64)
    return {'state_dict': out}


def test_authors_file_converts_strictly_and_exports_to_timm(small, tmp_path):
    ref, expected, _ = small
    raw = _authors_format(ref.state_dict())
    assert any('.ghost1.primary_rpr_conv.0.bn.weight' in k for k in raw['state_dict'])
    assert any('.dw_rpr_scale.bn.weight' in k for k in raw['state_dict'])
    path = tmp_path / 'ghostnetv3-small.pth.tar'
    torch.save(raw, path)
    variables = convert.torch_to_flax(convert.load_state_dict(str(path)), SMALL_NAME, cfgs=SMALL)
    for (ka, a), (kb, b) in zip(sorted(_leaves(variables).items()), sorted(_leaves(expected).items())):
        assert ka == kb and np.array_equal(a, b), ka

    back = convert.flax_to_torch(variables, SMALL_NAME, as_torch=True, cfgs=SMALL)
    fresh = _timm_small(4)
    fresh.load_state_dict(back, strict=True)
    x = np.random.default_rng(1).standard_normal((1, 40, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(_torch_logits(fresh, x), _torch_logits(ref, x))


def test_v2_weights_for_v3_model_fail_in_one_line_naming_the_first_missing_key():
    v2 = _timm_small(5, version='v2')
    with pytest.raises(convert.ConversionError) as info:
        convert.torch_to_flax(v2.state_dict(), SMALL_NAME, cfgs=SMALL)
    msg = str(info.value)
    assert '\n' not in msg
    v3_keys = set(_timm_small(6).state_dict())
    first_missing = sorted(v3_keys - set(v2.state_dict()) - {k for k in v3_keys if k.endswith('num_batches_tracked')})[0]
    assert first_missing in msg and 'GhostNetV2' in msg and 'GhostNetV3' in msg, msg


def test_deploy_form_equals_train_form_timms_deploy_and_fast_runtime(small):
    from timm.utils.model import reparameterize_model
    from ghostnetv2_jax import reparameterize
    ref, variables, model = small
    deploy_model, deploy_vars = reparameterize(model, variables)
    # The V2-shaped inference network: no branches and no batch statistics left.
    names = set(_leaves(deploy_vars))
    assert not any('_rpr_' in n for n in names) and 'batch_stats' not in deploy_vars
    assert deploy_model.num_conv_branches == 0 and deploy_model.fold_bn
    declared = jax.eval_shape(deploy_model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.map(lambda a: a.shape, declared) == jax.tree.map(lambda a: a.shape, deploy_vars)

    x = np.random.default_rng(2).standard_normal((3, 65, 97, 3)).astype(np.float32)
    train_form = np.asarray(jax.jit(model.apply)(variables, x))
    deploy = np.asarray(jax.jit(deploy_model.apply)(deploy_vars, x))
    timm_deploy = _torch_logits(reparameterize_model(ref), x)
    fast = np.asarray(jax.jit(predict_fn(deploy_model))(deploy_vars, x))
    assert np.abs(train_form).max() > 3
    assert rel_err(deploy, train_form) < TOL
    assert rel_err(deploy, timm_deploy) < TOL
    assert rel_err(fast, deploy) < TOL
    assert rel_err(train_form, _torch_logits(ref, x)) < TOL
