"""PyTorch-exact basics: channel rounding, gates, padding, BatchNorm semantics, resizing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import make_divisible as timm_make_divisible

from ghostnetv2_jax.layers import batchnorm, helpers
from ghostnetv2_jax.layers.conv import conv2d


def test_make_divisible_matches_timm_for_every_ghostnet_width():
    for v in [c * w for c in (16, 24, 40, 48, 72, 80, 112, 120, 160, 184, 200, 240, 480, 672, 960)
              for w in (0.5, 1.0, 1.3, 1.6, 0.75, 2.0)] + [18.0, 5.0, 1.0]:
        assert helpers.make_divisible(v, 4) == timm_make_divisible(v, 4), v


def test_hard_sigmoid_is_torch_hardsigmoid():
    x = np.linspace(-5, 5, 101, dtype=np.float32)
    np.testing.assert_allclose(helpers.hard_sigmoid(jnp.asarray(x)), F.hardsigmoid(torch.from_numpy(x)).numpy(), atol=1e-7)


@pytest.mark.parametrize('size', [8, 9])
def test_stride2_conv_pads_symmetrically_like_torch(size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    conv = conv2d(4, 3, stride=2)
    v = conv.init(jax.random.PRNGKey(0), x)
    ours = conv.apply(v, x)
    w = torch.from_numpy(np.asarray(v['params']['kernel']).transpose(3, 2, 0, 1).copy())
    ref = F.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), w, stride=2, padding=1)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def _bn_pair(c, rng):
    bn_t = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn_t.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
        bn_t.bias.copy_(torch.from_numpy(rng.normal(0, 0.3, c).astype(np.float32)))
        bn_t.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.3, c).astype(np.float32)))
        bn_t.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
    v = {'params': {'scale': bn_t.weight.detach().numpy().copy(), 'bias': bn_t.bias.detach().numpy().copy()},
         'batch_stats': {'mean': bn_t.running_mean.numpy().copy(), 'var': bn_t.running_var.numpy().copy()}}
    return bn_t, v


def test_batchnorm_train_mode_matches_torch_output_and_unbiased_running_var():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 5, 7, 6)) * 2 + 1).astype(np.float32)
    bn_t, v = _bn_pair(6, rng)
    y, new = batchnorm.BatchNorm().apply(v, x, train=True, mutable=['batch_stats'])
    bn_t.train()
    y_t = bn_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, y_t, atol=1e-5)
    np.testing.assert_allclose(new['batch_stats']['mean'], bn_t.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(new['batch_stats']['var'], bn_t.running_var.numpy(), atol=1e-6)


def test_batchnorm_eval_uses_running_stats_and_bf16_keeps_fp32_statistics():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
    bn_t, v = _bn_pair(5, rng)
    bn_t.eval()
    y_t = bn_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(batchnorm.BatchNorm().apply(v, x), y_t, atol=1e-5)
    y16, new = batchnorm.BatchNorm(dtype=jnp.bfloat16).apply(v, x.astype(jnp.bfloat16), train=True,
                                                          mutable=['batch_stats'])
    assert y16.dtype == jnp.bfloat16
    assert new['batch_stats']['mean'].dtype == jnp.float32 and new['batch_stats']['var'].dtype == jnp.float32


@pytest.mark.parametrize('method', ['nearest', 'bilinear', 'bicubic'])
@pytest.mark.parametrize('src,dst', [((3, 3), (7, 7)), ((4, 6), (8, 12)), ((5, 7), (14, 9)), ((7, 7), (3, 4)),
                                     ((28, 28), (56, 56)), ((6, 4), (13, 11))])
def test_resize_matches_torch_interpolate(method, src, dst):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *src, 3)).astype(np.float32)
    kwargs = {} if method == 'nearest' else {'align_corners': False}
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), size=dst, mode=method, **kwargs)
    ours = helpers.resize(jnp.asarray(x), dst, method)
    # nearest is a gather: bit-exact. The weighted modes sum the same float32 weights in another
    # order (torch interpolates rows then columns, tap by tap), so they agree to float32 rounding.
    atol = 0.0 if method == 'nearest' else 1e-5
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), rtol=0, atol=atol)


def test_nearest_resize_uses_torch_floor_rule_not_half_pixel():
    # 3 -> 7: torch picks rows 0,0,0,1,1,2,2; jax.image.resize's half-pixel rule gives 0,0,1,1,1,2,2.
    x = jnp.arange(3, dtype=jnp.float32).reshape(1, 3, 1, 1)
    assert helpers.resize(x, (7, 1)).ravel().tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_resize_rejects_unknown_method():
    with pytest.raises(ValueError, match='unknown resize method'):
        helpers.resize(jnp.zeros((1, 2, 2, 1)), (4, 4), 'area')
