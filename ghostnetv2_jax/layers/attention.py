"""Attention variants behind one registry: 'dfc', 'se', 'cbam', 'coord', 'none'.

The contract (every variant)::

    attn = make_attention(name, features=C, **kwargs)    # a flax Module, or None for 'none'
    y = attn(source, target, train=train)                 # same shape and dtype as ``target``

``target`` (N, H, W, C) is the feature map being enhanced: in GhostNetV2 the output of a ghost
module. ``source`` is that module's input, the map the attention may look at instead. DFC computes
its gate from ``source`` in parallel with the ghost module (the paper's design, so the gate costs
no extra latency on the critical path); SE, CBAM and Coordinate Attention compute theirs from
``target``, as in their own papers. Every variant returns ``target * gate``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnetv2_jax.layers.batchnorm import BatchNorm
from ghostnetv2_jax.layers.conv import conv2d
from ghostnetv2_jax.layers.depthwise import DepthwiseConv
from ghostnetv2_jax.layers.helpers import avg_pool_2x2, hard_sigmoid, make_divisible, resize

Dtype = Any

GATES: Dict[str, Callable[[jax.Array], jax.Array]] = {
    'sigmoid': jax.nn.sigmoid,
    'hard_sigmoid': hard_sigmoid,
}


def _gate(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in GATES:
        raise ValueError(f"unknown gate {name!r}; expected one of {sorted(GATES)}")
    return GATES[name]


class DFCAttention(nn.Module):
    """Decoupled fully-connected attention (GhostNetV2).

    down-sample -> 1x1 conv + BN -> horizontal FC: depthwise (1, K_W) + BN -> vertical FC:
    depthwise (K_H, 1) + BN -> gate -> up-sample to the target's H, W -> multiply.
    Defaults are the released model: kernel (5, 5), 2x2 average pooling, sigmoid applied before
    nearest up-sampling. There is no activation inside the branch.
    """
    features: int
    kernel: Tuple[int, int] = (5, 5)
    downsample: str = 'avg'          # 'avg' | 'max' | 'none'
    gate: str = 'sigmoid'            # 'sigmoid' | 'hard_sigmoid'
    gate_before_upsample: bool = True
    upsample: str = 'nearest'        # 'nearest' | 'bilinear' | 'bicubic'
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def attention_map(self, source: jax.Array, train: bool = False) -> jax.Array:
        """The branch before its gate: (N, H', W', C) at the down-sampled resolution."""
        kh, kw = self.kernel
        x = source
        if self.downsample == 'avg':
            x = avg_pool_2x2(x)  # floors odd sizes
        elif self.downsample == 'max':
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
        elif self.downsample != 'none':
            raise ValueError(f"DFC downsample must be avg, max or none, got {self.downsample!r}")
        if 0 in x.shape[1:3]:
            raise ValueError(f'DFC attention got a {source.shape[1]}x{source.shape[2]} map, too small to '
                             'down-sample 2x; GhostNetV2 needs inputs of at least 33x33 pixels (a 2x2 last stage)')
        bn = lambda name: BatchNorm(dtype=self.dtype, folded=self.fold_bn, name=name)
        x = conv2d(self.features, 1, dtype=self.dtype, name='conv')(x)
        x = bn('bn')(x, train)
        x = DepthwiseConv((1, kw), impl=self.depthwise_impl, dtype=self.dtype, name='fc_w')(x)
        x = bn('bn_w')(x, train)
        x = DepthwiseConv((kh, 1), impl=self.depthwise_impl, dtype=self.dtype, name='fc_h')(x)
        return bn('bn_h')(x, train)

    def __call__(self, source: jax.Array, target: jax.Array, train: bool = False) -> jax.Array:
        """``target`` times the gate computed from ``source``."""
        x = self.attention_map(source, train)
        gate, size = _gate(self.gate), target.shape[1:3]
        if self.gate_before_upsample:
            g = resize(gate(x), size, self.upsample)
        else:
            g = gate(resize(x, size, self.upsample))
        return target * g.astype(target.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in GhostNet: reduced width make_divisible(C * ratio, 4),
    ReLU, hard-sigmoid gate, biases on both 1x1 convs."""
    features: int
    rd_ratio: float = 0.25
    gate: str = 'hard_sigmoid'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array, train: bool = False) -> jax.Array:
        del source  # SE looks at the features it gates
        rd = make_divisible(self.features * self.rd_ratio, 4)
        s = jnp.mean(target, axis=(1, 2), keepdims=True)
        s = conv2d(rd, 1, use_bias=True, dtype=self.dtype, name='conv_reduce')(s)
        s = conv2d(self.features, 1, use_bias=True, dtype=self.dtype, name='conv_expand')(nn.relu(s))
        return target * _gate(self.gate)(s).astype(target.dtype)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention.
    Channel: a shared bias-free MLP (ratio 1/16) on average- and max-pooled features, summed.
    Spatial: 7x7 conv + BN over the channel-wise mean and max."""
    features: int
    rd_ratio: float = 1 / 16
    spatial_kernel: int = 7
    gate: str = 'sigmoid'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array, train: bool = False) -> jax.Array:
        del source
        gate = _gate(self.gate)
        rd = make_divisible(self.features * self.rd_ratio, 1, round_limit=0.0)
        fc1 = conv2d(rd, 1, dtype=self.dtype, name='fc1')
        fc2 = conv2d(self.features, 1, dtype=self.dtype, name='fc2')
        mlp = lambda s: fc2(nn.relu(fc1(s)))
        avg = jnp.mean(target, axis=(1, 2), keepdims=True)
        mx = jnp.max(target, axis=(1, 2), keepdims=True)
        x = target * gate(mlp(avg) + mlp(mx)).astype(target.dtype)
        s = jnp.concatenate([jnp.mean(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)], -1)
        s = conv2d(1, self.spatial_kernel, dtype=self.dtype, name='spatial_conv')(s)
        s = BatchNorm(dtype=self.dtype, folded=self.fold_bn, name='spatial_bn')(s, train)
        return x * gate(s).astype(x.dtype)


class CoordAttention(nn.Module):
    """Coordinate Attention (Hou et al. 2021): pool along W and along H, a shared 1x1 conv + BN +
    hard-swish over both, then one sigmoid gate per direction."""
    features: int
    reduction: int = 32
    min_width: int = 8
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, source: jax.Array, target: jax.Array, train: bool = False) -> jax.Array:
        del source
        h, w = target.shape[1:3]
        mip = max(self.min_width, self.features // self.reduction)
        x_h = jnp.mean(target, axis=2, keepdims=True)                          # N, H, 1, C
        x_w = jnp.swapaxes(jnp.mean(target, axis=1, keepdims=True), 1, 2)     # N, W, 1, C
        y = conv2d(mip, 1, use_bias=True, dtype=self.dtype, name='conv1')(jnp.concatenate([x_h, x_w], 1))
        y = nn.hard_swish(BatchNorm(dtype=self.dtype, folded=self.fold_bn, name='bn1')(y, train))
        a_h = jax.nn.sigmoid(conv2d(self.features, 1, use_bias=True, dtype=self.dtype, name='conv_h')(y[:, :h]))
        a_w = jax.nn.sigmoid(conv2d(self.features, 1, use_bias=True, dtype=self.dtype, name='conv_w')(y[:, h:]))
        return target * (a_h * jnp.swapaxes(a_w, 1, 2)).astype(target.dtype)


ATTENTIONS: Dict[str, Optional[type]] = {
    'dfc': DFCAttention,
    'se': SqueezeExcite,
    'cbam': CBAM,
    'coord': CoordAttention,
    'none': None,
}


def make_attention(name: str, features: int, *, depthwise_impl: str = 'auto',
                   dtype: Dtype = jnp.float32, module_name: str = 'attn', fold_bn: bool = False,
                   **kwargs) -> Optional[nn.Module]:
    """Build the attention variant ``name`` for ``features`` channels (None for 'none').
    ``fold_bn``: the inference form with BatchNorm folded into the convs (runtime.fold_batchnorm)."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; expected one of {sorted(ATTENTIONS)}")
    cls = ATTENTIONS[name]
    if cls is None:
        if kwargs:
            raise ValueError(f"attention 'none' takes no options, got {sorted(kwargs)}")
        return None
    if cls is DFCAttention:
        kwargs['depthwise_impl'] = depthwise_impl
    if fold_bn and cls in (DFCAttention, CBAM, CoordAttention):   # the variants with a BatchNorm
        kwargs['fold_bn'] = True
    return cls(features=features, dtype=dtype, name=module_name, **kwargs)
