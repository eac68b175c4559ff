"""Every attention variant against a PyTorch reference with the same weights, and the registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule
from timm.layers.coord_attn import CoordAttn
from timm.models._efficientnet_blocks import SqueezeExcite as TimmSE
from timm.layers import make_divisible

from conftest import rel_err
from ghostnetv2_jax.convert import _to_flax_layout
from ghostnetv2_jax.layers import attention
from ghostnetv2_jax.parity import randomize_

RNG = np.random.default_rng(0)


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def flax_vars_from_torch(module, sd, modules, sample_args):
    """Fill ``module``'s variables from torch ``sd``: ``modules`` maps Flax module name -> torch prefix."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *sample_args))
    leaf_names = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
                  ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
    out = {}
    for collection, tree in shapes.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [k.key for k in path]
            key = modules['.'.join(names[:-1])] + '.' + leaf_names[(collection, names[-1])]
            value = _to_flax_layout(names[-1], sd[key].detach().numpy())
            assert value.shape == leaf.shape, (key, value.shape, leaf.shape)
            node = out.setdefault(collection, {})
            for n in names[:-1]:
                node = node.setdefault(n, {})
            node[names[-1]] = value
    return out


class TorchDFC(torch.nn.Module):
    """DFC with the ablation switches, written from the paper/timm's GhostModuleV2 in PyTorch."""

    def __init__(self, cin, cout, kernel, downsample, gate, gate_before_upsample, upsample):
        super().__init__()
        kh, kw = kernel
        self.short_conv = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, bias=False), torch.nn.BatchNorm2d(cout),
            torch.nn.Conv2d(cout, cout, (1, kw), padding=(0, kw // 2), groups=cout, bias=False), torch.nn.BatchNorm2d(cout),
            torch.nn.Conv2d(cout, cout, (kh, 1), padding=(kh // 2, 0), groups=cout, bias=False), torch.nn.BatchNorm2d(cout))
        self.down = {'avg': lambda x: F.avg_pool2d(x, 2, 2), 'max': lambda x: F.max_pool2d(x, 2, 2), 'none': lambda x: x}[downsample]
        self.gate = {'sigmoid': torch.sigmoid, 'hard_sigmoid': F.hardsigmoid}[gate]
        self.before, self.mode = gate_before_upsample, upsample

    def forward(self, source, target):
        res = self.short_conv(self.down(source))
        size = target.shape[-2:]
        extra = {} if self.mode == 'nearest' else {'align_corners': False}
        if self.before:
            return target * F.interpolate(self.gate(res), size=size, mode=self.mode, **extra)
        return target * self.gate(F.interpolate(res, size=size, mode=self.mode, **extra))


DFC_MODULES = {'conv': 'short_conv.0', 'bn': 'short_conv.1', 'fc_w': 'short_conv.2', 'bn_w': 'short_conv.3',
               'fc_h': 'short_conv.4', 'bn_h': 'short_conv.5'}


@pytest.mark.parametrize('switches', [
    dict(),                                                      # the released model
    dict(kernel=(7, 7)),
    dict(kernel=(3, 5), downsample='max'),
    dict(downsample='none', gate='hard_sigmoid'),
    dict(gate_before_upsample=False, upsample='bilinear'),
    dict(upsample='bicubic'),
])
def test_dfc_switches_match_torch(switches):
    torch.manual_seed(0)
    full = dict(kernel=(5, 5), downsample='avg', gate='sigmoid', gate_before_upsample=True, upsample='nearest') | switches
    ref = TorchDFC(6, 10, **full)
    randomize_(ref)
    ref.eval()
    source = RNG.standard_normal((2, 13, 11, 6)).astype(np.float32)   # odd: pooling floors, 6 -> 13 resize
    target = RNG.standard_normal((2, 13, 11, 10)).astype(np.float32)
    ours = attention.make_attention('dfc', 10, **switches)
    v = flax_vars_from_torch(ours, ref.state_dict(), DFC_MODULES, (source, target))
    out = jax.jit(ours.apply)(v, source, target)
    with torch.no_grad():
        expected = nhwc(ref(nchw(source), nchw(target)))
    assert rel_err(out, expected) < 1e-5


def test_dfc_train_mode_updates_its_four_batchnorms():
    dfc = attention.make_attention('dfc', 8)
    x = jnp.ones((2, 8, 8, 4)) * jnp.arange(4.0)
    v = dfc.init(jax.random.PRNGKey(0), x, jnp.ones((2, 8, 8, 8)))
    _, new = dfc.apply(v, x, jnp.ones((2, 8, 8, 8)), train=True, mutable=['batch_stats'])
    assert set(new['batch_stats']) == {'bn', 'bn_w', 'bn_h'}
    assert not np.allclose(new['batch_stats']['bn']['var'], v['batch_stats']['bn']['var'])


def test_se_matches_timm_squeeze_excite():
    torch.manual_seed(1)
    ref = TimmSE(72, rd_ratio=0.25, gate_layer='hard_sigmoid',
                 rd_round_fn=lambda v: make_divisible(v, 4)).eval()
    x = RNG.standard_normal((2, 9, 7, 72)).astype(np.float32)
    ours = attention.make_attention('se', 72, module_name='se')
    v = flax_vars_from_torch(ours, ref.state_dict(), {'conv_reduce': 'conv_reduce', 'conv_expand': 'conv_expand'}, (x, x))
    with torch.no_grad():
        assert rel_err(ours.apply(v, x, x), nhwc(ref(nchw(x)))) < 1e-5


def test_cbam_matches_timm_cbam_module():
    torch.manual_seed(2)
    ref = CbamModule(48)
    randomize_(ref)
    ref.eval()
    x = RNG.standard_normal((2, 10, 12, 48)).astype(np.float32)
    ours = attention.make_attention('cbam', 48)
    v = flax_vars_from_torch(ours, ref.state_dict(), {'fc1': 'channel.fc1', 'fc2': 'channel.fc2',
                                                       'spatial_conv': 'spatial.conv.conv',
                                                       'spatial_bn': 'spatial.conv.bn'}, (x, x))
    with torch.no_grad():
        assert rel_err(jax.jit(ours.apply)(v, x, x), nhwc(ref(nchw(x)))) < 1e-5


def test_coord_attention_matches_timm_coord_attn_with_the_papers_widths():
    torch.manual_seed(3)
    c = 64
    ref = CoordAttn(c, rd_channels=max(8, c // 32), bias=True)   # Hou et al.: mip = max(8, C/32), biases
    randomize_(ref)
    ref.eval()
    x = RNG.standard_normal((2, 9, 14, c)).astype(np.float32)
    ours = attention.make_attention('coord', c)
    v = flax_vars_from_torch(ours, ref.state_dict(), {'conv1': 'conv1', 'bn1': 'bn1', 'conv_h': 'conv_h',
                                                       'conv_w': 'conv_w'}, (x, x))
    with torch.no_grad():
        assert rel_err(jax.jit(ours.apply)(v, x, x), nhwc(ref(nchw(x)))) < 1e-5


@pytest.mark.parametrize('name', ['dfc', 'se', 'cbam', 'coord'])
def test_every_variant_keeps_the_target_shape_and_dtype(name):
    source = jnp.ones((2, 10, 6, 5), jnp.bfloat16)
    target = jnp.ones((2, 10, 6, 16), jnp.bfloat16)
    attn = attention.make_attention(name, 16, dtype=jnp.bfloat16)
    v = attn.init(jax.random.PRNGKey(0), source, target)
    out = attn.apply(v, source, target)
    assert out.shape == target.shape and out.dtype == target.dtype


def test_registry_none_and_errors():
    assert attention.make_attention('none', 8) is None
    assert sorted(attention.ATTENTIONS) == ['cbam', 'coord', 'dfc', 'none', 'se']
    with pytest.raises(ValueError, match='unknown attention'):
        attention.make_attention('eca', 8)
    with pytest.raises(ValueError, match='gate'):
        attention.make_attention('dfc', 8, gate='tanh').init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 2)), jnp.ones((1, 4, 4, 8)))
