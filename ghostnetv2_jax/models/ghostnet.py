"""GhostNet (V1) and GhostNetV2 in Flax linen, built from the architecture table.

Module names follow timm's where they can, so the converter's rename table stays short
(see ``ghostnetv2_jax/convert.py``). Inputs are NHWC images; ``train`` switches BatchNorm to batch
statistics (``mutable=['batch_stats']``) and enables dropout (a ``'dropout'`` rng).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnetv2_jax.nn.attention import DFCAttention, make_attention
from ghostnetv2_jax.nn.depthwise import DepthwiseConv, resolve_impl
from ghostnetv2_jax.nn.depthwise_native import (GHOST_KERNEL_SIZES, StridedDepthwise, apply_strided, ghost_cheap,
                                                ghost_module_fn, stem_conv_fn)
from ghostnetv2_jax.nn.layers import BatchNorm, conv2d, make_divisible, torch_padding

Dtype = Any

# One row per bottleneck: kernel, expansion width, output width, SE ratio, stride.
# Rows are grouped into timm's 9 stages; a 10th stage (1x1 conv to 960 * width) follows.
GHOSTNET_CFGS: Tuple[Tuple[Tuple[float, ...], ...], ...] = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1),
     (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)
HEAD_WIDTH = 1280
# The fused inference op also runs a ghost module's primary 1x1 conv when its input is this narrow
# (every ghost1 from the stem to the 28x28 stage, and block 0's ghost2), where XLA's matmul is
# bound by memory. Batch 32 on 2 cores, BN folded: 122 ms against 128 unfused; with 72 or 120
# (wider, compute-bound matmuls too), 125-126 ms.
FUSED_PRIMARY_MAX_CHANNELS = 40


class GhostModule(nn.Module):
    """Primary 1x1 conv + cheap depthwise conv, concatenated, optionally enhanced by attention.

    ``attention`` is applied as ``attn(module_input, ghost_output)`` (see nn/attention.py).
    """
    features: int
    ratio: int = 2
    dw_size: int = 3
    use_act: bool = True
    attention: str = 'none'
    attention_kwargs: Optional[Dict[str, Any]] = None
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    def _fused_cheap_op(self, train: bool) -> bool:
        """Inference on CPU with the native kernels: BN, activation, cheap conv and concatenation
        run as one op (nn.depthwise_native.ghost_cheap), which reads and writes memory once; with
        it DFC's gate where fusible, the primary conv for narrow inputs, and a stride-2 block's
        depthwise conv (``strided``) after those."""
        return (not train and self.ratio == 2 and self.dtype == jnp.float32
                and (self.dw_size, self.dw_size) in GHOST_KERNEL_SIZES
                and resolve_impl(self.depthwise_impl) == 'native')

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 strided: Optional[StridedDepthwise] = None) -> jax.Array:
        """The module's output; with ``strided`` (the fused inference path only: a stride-2
        bottleneck's conv_dw and bn_dw), that conv's output, computed in the same op where the
        primary conv is fused too and DFC's gate, if any, is."""
        if strided is not None and not self._fused_cheap_op(train):
            raise ValueError('strided is for the fused inference path (GhostModule._fused_cheap_op)')
        act = nn.relu if self.use_act else (lambda v: v)
        init_chs = math.ceil(self.features / self.ratio)
        primary_conv = functools.partial(conv2d, init_chs, 1, dtype=self.dtype, name='primary_conv')
        bn = lambda name: BatchNorm(dtype=self.dtype, folded=self.fold_bn, impl=self.depthwise_impl,
                                    name=name)
        primary_bn = bn('primary_bn')
        cheap_conv = DepthwiseConv(self.dw_size, multiplier=self.ratio - 1, impl=self.depthwise_impl,
                                   dtype=self.dtype, name='cheap_conv')
        cheap_bn = bn('cheap_bn')
        options = (self.attention_kwargs or {}) if self.attention != 'none' else {}
        attn = make_attention(self.attention, self.features, depthwise_impl=self.depthwise_impl,
                              dtype=self.dtype, fold_bn=self.fold_bn, **options)
        if self._fused_cheap_op(train):
            # DFC's gate is applied by the fused op as it writes its output (one pass fewer).
            fuse_gate = isinstance(attn, DFCAttention) and attn.gate_fusible(x.shape[1:3])
            gate = attn(x, None, train, gate_only=True) if fuse_gate else None
            like = jax.ShapeDtypeStruct((*x.shape[:-1], init_chs), self.dtype)   # x1's shape
            ops = (*primary_bn(like, affine_only=True), cheap_conv(like, kernel_only=True),
                   *cheap_bn(like, affine_only=True), self.features, self.use_act)
            if x.shape[-1] <= FUSED_PRIMARY_MAX_CHANNELS:
                last = fuse_gate or attn is None    # no attention left to apply after the op
                out = primary_conv(conv_fn=ghost_module_fn(*ops, gate=gate, strided=strided if last else None))(x)
                if last:
                    return out
            else:
                out = ghost_cheap(primary_conv()(x), *ops, gate=gate)
            if not fuse_gate and attn is not None:
                out = attn(x, out, train)
            return out if strided is None else apply_strided(out, strided)
        else:
            x1 = act(primary_bn(primary_conv()(x), train))
            x2 = act(cheap_bn(cheap_conv(x1), train))
            out = jnp.concatenate([x1, x2], axis=-1)
            if out.shape[-1] != self.features:
                out = out[..., :self.features]
        return out if attn is None else attn(x, out, train)


class GhostBottleneck(nn.Module):
    """ghost1 (expand) -> [depthwise k x k, stride s, BN] -> [SE] -> ghost2 (project) + shortcut."""
    mid_features: int
    out_features: int
    kernel_size: int = 3
    stride: int = 1
    se_ratio: float = 0.0
    attention: str = 'none'
    attention_position: str = 'ghost1'   # 'ghost1': expanded features; 'ghost2': block output
    attention_kwargs: Optional[Dict[str, Any]] = None
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.attention_position not in ('ghost1', 'ghost2'):
            raise ValueError(f"attention_position must be 'ghost1' or 'ghost2', got {self.attention_position!r}")
        common = dict(depthwise_impl=self.depthwise_impl, dtype=self.dtype, fold_bn=self.fold_bn)
        attn = lambda pos: (dict(attention=self.attention, attention_kwargs=self.attention_kwargs)
                            if self.attention_position == pos else {})
        dw = lambda k, s, name: DepthwiseConv(k, stride=s, impl=self.depthwise_impl, dtype=self.dtype, name=name)
        bn = lambda name: BatchNorm(dtype=self.dtype, folded=self.fold_bn, impl=self.depthwise_impl,
                                    name=name)
        in_features, k, s = x.shape[-1], self.kernel_size, self.stride

        ghost1 = GhostModule(self.mid_features, use_act=True, name='ghost1', **attn('ghost1'), **common)
        if s > 1 and (k, k) in GHOST_KERNEL_SIZES and ghost1._fused_cheap_op(train):
            # conv_dw and bn_dw go to ghost1, which runs them in its fused op where it fuses its
            # primary conv and any attention (the expanded map is then never stored), else after it
            like = jax.ShapeDtypeStruct((self.mid_features,), self.dtype)
            y = ghost1(x, train, strided=StridedDepthwise(
                dw(k, s, 'conv_dw')(like, kernel_only=True), *bn('bn_dw')(like, affine_only=True),
                (s, s), torch_padding(k)))
        else:
            y = ghost1(x, train)
            if s > 1:
                y = bn('bn_dw')(dw(k, s, 'conv_dw')(y), train)
        if self.se_ratio > 0:
            y = make_attention('se', self.mid_features, rd_ratio=self.se_ratio, dtype=self.dtype,
                               module_name='se')(y, y, train)
        y = GhostModule(self.out_features, use_act=False, name='ghost2', **attn('ghost2'), **common)(y, train)

        if in_features == self.out_features and s == 1:
            shortcut = x
        else:
            shortcut = bn('shortcut_dw_bn')(dw(k, s, 'shortcut_dw')(x), train)
            shortcut = conv2d(self.out_features, 1, dtype=self.dtype, name='shortcut_pw')(shortcut)
            shortcut = bn('shortcut_pw_bn')(shortcut, train)
        return y + shortcut


PARTS = ('all', 'features', 'head')


class GhostNet(nn.Module):
    """GhostNet V1 (``attention='none'``) or V2 (``attention='dfc'``) classifier.

    ``attention_blocks``: global indices of the bottlenecks (0..15) that get attention;
    None means the released models' choice, every block with index > 1.
    """
    cfgs: Sequence[Sequence[Sequence[float]]] = GHOSTNET_CFGS
    width: float = 1.0
    num_classes: int = 1000
    drop_rate: float = 0.2
    attention: str = 'dfc'
    attention_kwargs: Optional[Dict[str, Any]] = None
    attention_blocks: Optional[Sequence[int]] = None
    attention_position: str = 'ghost1'
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False     # inference form with BatchNorm folded into the convs (deploy.py)

    def _attention_for(self, index: int) -> str:
        chosen = range(2, 10 ** 6) if self.attention_blocks is None else self.attention_blocks
        return self.attention if index in chosen else 'none'

    def _fused_stem(self, train: bool, features_only: bool) -> bool:
        """Inference on CPU with the native kernels: the stem's conv, BN and ReLU run as one op
        (nn.depthwise_native.stem_conv) instead of patches, a concatenation and a matmul."""
        return (not train and not features_only and self.dtype == jnp.float32
                and resolve_impl(self.depthwise_impl) == 'native')

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, *, features_only: bool = False,
                 part: str = 'all'):
        """Logits (N, num_classes) in float32; with ``features_only`` the list of 5 feature maps at
        strides 2, 4, 8, 16, 32, the same maps as timm's ``features_only=True`` model.

        ``part`` splits the network as timm's ``forward_features`` / ``forward_head`` do:
        ``'features'`` returns the last map before pooling, (N, H/32, W/32, 960) at width 1.0;
        ``'head'`` takes that map as ``images`` and returns the logits; ``'all'`` runs both.
        """
        if part not in PARTS:
            raise ValueError(f'part must be one of {PARTS}, got {part!r}')
        if features_only and part != 'all':
            raise ValueError(f"features_only returns the stage maps; it takes part='all', got {part!r}")
        if features_only and self.fold_bn:
            raise ValueError('features_only needs the unfolded model: its first map is taken before bn1')
        if part == 'head':
            return self._head(images.astype(self.dtype), train)
        features: List[jax.Array] = []
        x = images.astype(self.dtype)
        stem_width = make_divisible(16 * self.width)
        bn1 = BatchNorm(dtype=self.dtype, folded=self.fold_bn, impl=self.depthwise_impl, name='bn1')
        if self._fused_stem(train, features_only):
            # conv, BN and ReLU as one native op; the Conv's variables are unchanged
            scale, bias = bn1(jax.ShapeDtypeStruct((stem_width,), self.dtype), affine_only=True)
            x = conv2d(stem_width, 3, stride=2, dtype=self.dtype, name='conv_stem',
                       conv_fn=stem_conv_fn(scale, bias))(x)
        else:
            x = conv2d(stem_width, 3, stride=2, dtype=self.dtype, name='conv_stem')(x)
            features.append(x)  # timm takes the stride-2 map straight from conv_stem, before BN
            x = nn.relu(bn1(x, train))

        index = 0
        for stage, rows in enumerate(self.cfgs):
            for j, (k, exp, c, se, s) in enumerate(rows):
                x = GhostBottleneck(
                    make_divisible(exp * self.width), make_divisible(c * self.width), int(k), int(s), se,
                    attention=self._attention_for(index), attention_position=self.attention_position,
                    attention_kwargs=self.attention_kwargs, depthwise_impl=self.depthwise_impl,
                    dtype=self.dtype, fold_bn=self.fold_bn, name=f'blocks_{stage}_{j}')(x, train)
                index += 1
            if int(rows[-1][4]) > 1:
                features.append(x)
        if features_only:
            return features

        last_width = make_divisible(self.cfgs[-1][-1][1] * self.width)
        x = conv2d(last_width, 1, dtype=self.dtype, name=f'blocks_{len(self.cfgs)}_0_conv')(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, folded=self.fold_bn, impl=self.depthwise_impl,
                                 name=f'blocks_{len(self.cfgs)}_0_bn1')(x, train))
        return x if part == 'features' else self._head(x, train)

    def _head(self, x: jax.Array, train: bool) -> jax.Array:
        """Global pool, conv_head, classifier (timm's forward_head); submodules of __call__."""
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
        x = nn.relu(conv2d(HEAD_WIDTH, 1, use_bias=True, dtype=self.dtype, name='conv_head')(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if self.num_classes <= 0:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='classifier')(x)
        return x.astype(jnp.float32)


def feature_info(model: GhostNet) -> List[Dict[str, int]]:
    """Channels and stride of each map returned by ``features_only=True`` (timm's feature_info)."""
    info = [dict(num_chs=make_divisible(16 * model.width), reduction=2)]
    reduction = 2
    for rows in model.cfgs:
        if int(rows[-1][4]) > 1:
            reduction *= 2
            info.append(dict(num_chs=make_divisible(rows[-1][2] * model.width), reduction=reduction))
    return info
