"""GhostNet (V1), GhostNetV2 and GhostNetV3 in Flax linen, built from one architecture table.

V1 and V2 differ by the attention (``attention='none'`` / ``'dfc'``). GhostNetV3 keeps V2's
inference network and trains it re-parameterised (``num_conv_branches`` > 0): every ghost module
and stride-2 depthwise conv becomes parallel conv+BN branches (``GhostModuleV3``,
``GhostBottleneckV3``), which ``runtime.reparameterize`` folds back into single convs.

Module names follow timm's where they can, so the converter's rename table stays short
(see ``ghostnetv2_jax/convert.py``). Inputs are NHWC images; ``train`` switches BatchNorm to batch
statistics (``mutable=['batch_stats']``) and enables dropout (a ``'dropout'`` rng).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ghostnetv2_jax.layers.attention import make_attention
from ghostnetv2_jax.layers.batchnorm import BatchNorm
from ghostnetv2_jax.layers.conv import conv2d
from ghostnetv2_jax.layers.depthwise import DepthwiseConv
from ghostnetv2_jax.layers.helpers import make_divisible

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


def _attention_options(module, **extra) -> Dict[str, Any]:
    """``make_attention``'s arguments for a ghost module's attention (GhostModule, GhostModuleV3)."""
    options = (module.attention_kwargs or {}) if module.attention != 'none' else {}
    return dict(name=module.attention, features=module.features, depthwise_impl=module.depthwise_impl,
                dtype=module.dtype, **extra, **options)


class GhostModule(nn.Module):
    """Primary 1x1 conv + cheap depthwise conv, concatenated, optionally enhanced by attention.

    The primary conv makes ``ceil(features / ratio)`` intrinsic maps; the cheap operation, a
    ``dw_size`` depthwise conv with ``ratio - 1`` outputs per map, makes the ghost maps; the
    first ``features`` of both are kept. ``attention`` is applied as
    ``attn(module_input, ghost_output)`` (see layers/attention.py).
    """
    features: int
    ratio: int = 2
    dw_size: int = 3
    use_act: bool = True
    act: Callable[[jax.Array], jax.Array] = nn.relu
    attention: str = 'none'
    attention_kwargs: Optional[Dict[str, Any]] = None
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = self.act if self.use_act else (lambda v: v)
        bn = lambda name: BatchNorm(dtype=self.dtype, folded=self.fold_bn, name=name)
        init_chs = math.ceil(self.features / self.ratio)
        x1 = conv2d(init_chs, 1, dtype=self.dtype, name='primary_conv')(x)
        x1 = act(bn('primary_bn')(x1, train))
        x2 = DepthwiseConv(self.dw_size, multiplier=self.ratio - 1, impl=self.depthwise_impl,
                           dtype=self.dtype, name='cheap_conv')(x1)
        x2 = act(bn('cheap_bn')(x2, train))
        out = jnp.concatenate([x1, x2], axis=-1)[..., :self.features]
        attn = make_attention(**self.attention_options())
        return out if attn is None else attn(x, out, train)

    @nn.nowrap
    def attention_options(self) -> Dict[str, Any]:
        """``make_attention``'s arguments for the attention this module applies (as 'attn')."""
        return _attention_options(self, fold_bn=self.fold_bn)


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
        dw = lambda s, name: DepthwiseConv(self.kernel_size, stride=s, impl=self.depthwise_impl,
                                           dtype=self.dtype, name=name)
        bn = lambda name: BatchNorm(dtype=self.dtype, folded=self.fold_bn, name=name)

        y = GhostModule(self.mid_features, use_act=True, name='ghost1', **attn('ghost1'), **common)(x, train)
        if self.stride > 1:
            y = bn('bn_dw')(dw(self.stride, 'conv_dw')(y), train)
        if self.se_ratio > 0:
            y = make_attention('se', self.mid_features, rd_ratio=self.se_ratio, dtype=self.dtype,
                               module_name='se')(y, y, train)
        y = GhostModule(self.out_features, use_act=False, name='ghost2', **attn('ghost2'), **common)(y, train)

        if x.shape[-1] == self.out_features and self.stride == 1:
            shortcut = x
        else:
            shortcut = bn('shortcut_dw_bn')(dw(self.stride, 'shortcut_dw')(x), train)
            shortcut = conv2d(self.out_features, 1, dtype=self.dtype, name='shortcut_pw')(shortcut)
            shortcut = bn('shortcut_pw_bn')(shortcut, train)
        return y + shortcut


class ConvBn(nn.Module):
    """One re-parameterisable branch of GhostNetV3: a conv without bias, then BatchNorm (timm's
    ``ConvBnAct`` with no activation). ``depthwise``: one group per input channel, ``multiplier``
    outputs each; the padding is PyTorch's ``kernel_size // 2``."""
    features: int
    kernel_size: int = 1
    stride: int = 1
    depthwise: bool = False
    multiplier: int = 1
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depthwise:
            conv = DepthwiseConv(self.kernel_size, stride=self.stride, multiplier=self.multiplier,
                                 impl=self.depthwise_impl, dtype=self.dtype, name='conv')
        else:
            conv = conv2d(self.features, self.kernel_size, stride=self.stride, dtype=self.dtype, name='conv')
        return BatchNorm(dtype=self.dtype, name='bn1')(conv(x), train)


class GhostModuleV3(nn.Module):
    """GhostNetV3's ghost module in its training form: GhostModule's two convs, each re-parameterised.

    - primary: ``num_conv_branches`` parallel 1x1 conv+BN branches, summed, then the activation;
    - cheap: ``num_conv_branches`` parallel ``dw_size`` depthwise conv+BN branches, plus a 1x1
      depthwise conv+BN *scale* branch and a BN-only *identity* branch (ratio 2, where each
      intrinsic map makes one ghost map), summed, then the activation.

    Every branch is linear up to the sum, so in eval mode each sum is one conv with a bias: the
    deploy form is ``GhostModule`` (``runtime.reparameterize``). Attention as in ``GhostModule``.
    """
    features: int
    ratio: int = 2
    dw_size: int = 3
    use_act: bool = True
    act: Callable[[jax.Array], jax.Array] = nn.relu
    num_conv_branches: int = 3
    attention: str = 'none'
    attention_kwargs: Optional[Dict[str, Any]] = None
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = self.act if self.use_act else (lambda v: v)
        common = dict(depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        init_chs = math.ceil(self.features / self.ratio)
        new_chs = init_chs * (self.ratio - 1)

        x1 = 0
        for i in range(self.num_conv_branches):
            x1 = x1 + ConvBn(init_chs, 1, name=f'primary_rpr_conv_{i}', **common)(x, train)
        x1 = act(x1)

        cheap = lambda k, name: ConvBn(new_chs, k, depthwise=True, multiplier=self.ratio - 1, name=name, **common)
        x2 = cheap(1, 'cheap_rpr_scale')(x1, train)
        if new_chs == init_chs:
            x2 = x2 + BatchNorm(dtype=self.dtype, name='cheap_rpr_skip')(x1, train)
        for i in range(self.num_conv_branches):
            x2 = x2 + cheap(self.dw_size, f'cheap_rpr_conv_{i}')(x1, train)
        x2 = act(x2)

        out = jnp.concatenate([x1, x2], axis=-1)[..., :self.features]
        attn = make_attention(**self.attention_options())
        return out if attn is None else attn(x, out, train)

    @nn.nowrap
    def attention_options(self) -> Dict[str, Any]:
        """``make_attention``'s arguments for the attention this module applies (as 'attn')."""
        return _attention_options(self)


class GhostBottleneckV3(nn.Module):
    """GhostBottleneck with GhostModuleV3s and, at stride 2, the depthwise conv re-parameterised:
    ``num_conv_branches`` parallel k x k depthwise conv+BN branches plus a 1x1 stride-2 scale
    branch, summed (no activation). SE and the shortcut are GhostBottleneck's."""
    mid_features: int
    out_features: int
    kernel_size: int = 3
    stride: int = 1
    se_ratio: float = 0.0
    num_conv_branches: int = 3
    attention: str = 'none'
    attention_position: str = 'ghost1'
    attention_kwargs: Optional[Dict[str, Any]] = None
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.attention_position not in ('ghost1', 'ghost2'):
            raise ValueError(f"attention_position must be 'ghost1' or 'ghost2', got {self.attention_position!r}")
        common = dict(depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        attn = lambda pos: (dict(attention=self.attention, attention_kwargs=self.attention_kwargs)
                            if self.attention_position == pos else {})
        ghost = lambda features, use_act, name: GhostModuleV3(
            features, use_act=use_act, num_conv_branches=self.num_conv_branches, name=name, **attn(name), **common)
        dw = lambda k, name: ConvBn(self.mid_features, k, stride=self.stride, depthwise=True, name=name, **common)
        bn = lambda name: BatchNorm(dtype=self.dtype, name=name)

        y = ghost(self.mid_features, True, 'ghost1')(x, train)
        if self.stride > 1:
            z = dw(1, 'dw_rpr_scale')(y, train)
            for i in range(self.num_conv_branches):
                z = z + dw(self.kernel_size, f'dw_rpr_conv_{i}')(y, train)
            y = z
        if self.se_ratio > 0:
            y = make_attention('se', self.mid_features, rd_ratio=self.se_ratio, dtype=self.dtype,
                               module_name='se')(y, y, train)
        y = ghost(self.out_features, False, 'ghost2')(y, train)

        if x.shape[-1] == self.out_features and self.stride == 1:
            shortcut = x
        else:
            shortcut = bn('shortcut_dw_bn')(DepthwiseConv(self.kernel_size, stride=self.stride, impl=self.depthwise_impl,
                                                          dtype=self.dtype, name='shortcut_dw')(x), train)
            shortcut = conv2d(self.out_features, 1, dtype=self.dtype, name='shortcut_pw')(shortcut)
            shortcut = bn('shortcut_pw_bn')(shortcut, train)
        return y + shortcut


def feature_take_indices(num_maps: int, indices: Union[int, Sequence[int], None]) -> List[int]:
    """The map indices ``indices`` selects, as timm's ``feature_take_indices``: None: all
    ``num_maps``; an int n: the last n; a sequence: those indices (negative from the end)."""
    if indices is None:
        indices = num_maps
    if isinstance(indices, int):
        if not 0 < indices <= num_maps:
            raise ValueError(f'last-n ({indices}) is out of range (1 to {num_maps})')
        return list(range(num_maps - indices, num_maps))
    taken = []
    for i in indices:
        idx = num_maps + i if i < 0 else i
        if not 0 <= idx < num_maps:
            raise ValueError(f'feature index {idx} is out of range (0 to {num_maps - 1})')
        taken.append(idx)
    return taken


class GhostNet(nn.Module):
    """GhostNet V1 (``attention='none'``), V2 (``attention='dfc'``) or V3 (V2 with
    ``num_conv_branches`` > 0: GhostBottleneckV3, the re-parameterisable training form) classifier.

    ``attention_blocks``: global indices of the bottlenecks (0..15) that get attention;
    None means the released models' choice, every block with index > 1.

    The entry points are timm's, each run with ``model.apply(variables, x, method=...)``:
    ``__call__`` (the logits), ``forward_features``, ``forward_head`` and ``forward_intermediates``.
    """
    cfgs: Sequence[Sequence[Sequence[float]]] = GHOSTNET_CFGS
    width: float = 1.0
    num_classes: int = 1000
    drop_rate: float = 0.2
    attention: str = 'dfc'
    attention_kwargs: Optional[Dict[str, Any]] = None
    attention_blocks: Optional[Sequence[int]] = None
    attention_position: str = 'ghost1'
    num_conv_branches: int = 0   # V3's parallel conv+BN branches per re-parameterisable conv (released: 3)
    depthwise_impl: str = 'auto'
    dtype: Dtype = jnp.float32
    fold_bn: bool = False     # inference form with BatchNorm folded into the convs (runtime.fold_batchnorm)

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits (N, num_classes) in float32 (timm's ``forward``)."""
        return self.forward_head(self.forward_features(images, train), train)

    def forward_features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The last map before pooling, (N, H/32, W/32, 960) at width 1.0 (timm's ``forward_features``)."""
        x, _ = self._forward(images, train)
        return x

    def forward_head(self, features: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
        """``forward_features``' map -> global pool, conv_head, dropout, classifier: the logits in
        float32; with ``pre_logits`` the pooled conv_head output before the classifier, (N, 1280)
        (timm's ``forward_head``)."""
        x, _ = self._forward(features, train, features=False, head=True, pre_logits=pre_logits)
        return x

    def forward_intermediates(self, images: jax.Array, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NHWC',
                              intermediates_only: bool = False, train: bool = False):
        """``(forward_features' map, [intermediate maps])``, or only the list with
        ``intermediates_only``: timm's ``forward_intermediates`` in NHWC.

        The maps are those of ``feature_info(model)``: 0 is conv_stem's output (stride 2, taken
        before bn1, as timm does), then the output of each stage that ends in a stride-2 block
        (strides 4, 8, 16, 32). ``indices``: None for all 5 (= timm's ``features_only`` model), an
        int n for the last n, or a sequence of indices (negative from the end); they come back in
        network order. ``stop_early``: run only the stages up to the last map taken, and return
        the last stage run's output (the stem's, after bn1, for map 0 alone) in place of
        forward_features' map. ``norm``: GhostNet has no norm layer after its stages, so it changes
        nothing (as in timm). A BN-folded model refuses map 0: it has no conv_stem output before bn1.
        """
        if output_fmt != 'NHWC':
            raise ValueError(f"output_fmt must be 'NHWC' (the Flax model's layout), got {output_fmt!r}")
        stage_ends = [-1] + [stage for stage, rows in enumerate(self.cfgs) if int(rows[-1][4]) > 1]
        taken = feature_take_indices(len(stage_ends), indices)
        last_stage = stage_ends[max(taken)] if stop_early else None
        x, maps = self._forward(images, train, take={stage_ends[i] + 1 for i in taken}, last_stage=last_stage)
        return maps if intermediates_only else (x, maps)

    def _attention_for(self, index: int) -> str:
        chosen = range(2, 10 ** 6) if self.attention_blocks is None else self.attention_blocks
        return self.attention if index in chosen else 'none'

    @nn.compact
    def _forward(self, x: jax.Array, train: bool, *, features: bool = True, head: bool = False,
                 take: Collection[int] = (), last_stage: Optional[int] = None,
                 pre_logits: bool = False) -> Tuple[jax.Array, List[jax.Array]]:
        """The network, built here and only here, with timm's module names; the methods above
        each run a part of it. ``features``: the stem and the stages ``blocks_0`` ..
        ``blocks_{last_stage}`` (None: all, ending with the 1x1 conv stage); ``head``: then the head. Returns the output
        and the maps at ``take``, the positions of timm's ``forward_intermediates``: 0 is
        conv_stem's output, i > 0 the output of stage i - 1."""
        if self.fold_bn and self.num_conv_branches:
            raise ValueError('a GhostNetV3 training form has no folded BatchNorm; its inference form is '
                             'runtime.reparameterize(model, variables)')
        if self.fold_bn and 0 in take:
            raise ValueError("the stride-2 map (feature index 0) is conv_stem's output before bn1, which "
                             'a BN-folded model does not compute; take other indices or use the unfolded model')
        x = x.astype(self.dtype)
        maps: List[jax.Array] = []
        if features:
            stem_width = make_divisible(16 * self.width)
            x = conv2d(stem_width, 3, stride=2, dtype=self.dtype, name='conv_stem')(x)
            if 0 in take:
                maps.append(x)  # timm takes the stride-2 map straight from conv_stem, before BN
            x = nn.relu(BatchNorm(dtype=self.dtype, folded=self.fold_bn, name='bn1')(x, train))

            if self.num_conv_branches:
                block = functools.partial(GhostBottleneckV3, num_conv_branches=self.num_conv_branches)
            else:
                block = functools.partial(GhostBottleneck, fold_bn=self.fold_bn)
            num_stages = len(self.cfgs) + 1 if last_stage is None else last_stage + 1
            index = 0
            for stage, rows in enumerate(self.cfgs[:num_stages]):
                for j, (k, exp, c, se, s) in enumerate(rows):
                    x = block(
                        make_divisible(exp * self.width), make_divisible(c * self.width), int(k), int(s), se,
                        attention=self._attention_for(index), attention_position=self.attention_position,
                        attention_kwargs=self.attention_kwargs, depthwise_impl=self.depthwise_impl,
                        dtype=self.dtype, name=f'blocks_{stage}_{j}')(x, train)
                    index += 1
                if stage + 1 in take:
                    maps.append(x)
            if num_stages > len(self.cfgs):   # the last stage: a 1x1 conv to 960 * width
                n = len(self.cfgs)
                last_width = make_divisible(self.cfgs[-1][-1][1] * self.width)
                x = conv2d(last_width, 1, dtype=self.dtype, name=f'blocks_{n}_0_conv')(x)
                x = nn.relu(BatchNorm(dtype=self.dtype, folded=self.fold_bn, name=f'blocks_{n}_0_bn1')(x, train))
                if n + 1 in take:
                    maps.append(x)
        if head:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
            x = nn.relu(conv2d(HEAD_WIDTH, 1, use_bias=True, dtype=self.dtype, name='conv_head')(x))
            x = x.reshape(x.shape[0], -1)
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            if not pre_logits and self.num_classes > 0:
                x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='classifier')(x)
            x = x.astype(jnp.float32)
        return x, maps


def feature_info(model: GhostNet) -> List[Dict[str, int]]:
    """Channels and stride of each map of ``forward_intermediates`` (timm's feature_info)."""
    info = [dict(num_chs=make_divisible(16 * model.width), reduction=2)]
    reduction = 2
    for rows in model.cfgs:
        if int(rows[-1][4]) > 1:
            reduction *= 2
            info.append(dict(num_chs=make_divisible(rows[-1][2] * model.width), reduction=reduction))
    return info
