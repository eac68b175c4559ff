"""The GhostNet model run on CPU with the fused native ops, computing the model's numbers.

``fused()`` is a context in which ``model.apply`` runs these parts of a GhostNet through the
ops of ``ghostnetv2_jax.kernels`` instead of module by module:

- a ``GhostModule`` (BN, activation, cheap conv, concatenation in one pass; with it the primary
  1x1 conv for narrow inputs, and DFC's gate where it is a nearest up-sampling by whole factors);
- in a stride-2 ``GhostBottleneck``, ghost1 together with the block's ``conv_dw`` and ``bn_dw``
  (only the strided map is stored; the block's own conv_dw and bn_dw calls then pass through);
- the stem conv (``conv_stem``) of a ``GhostNet``;
- on inputs of at most ``NATIVE_POINTWISE_MAX_IMAGES`` images, every 1x1 conv (stride 1, no
  padding) and the classifier, with their biases (``kernels.pointwise``), and the wider ghost
  modules' primary convs.

Everything else runs as the model says, and so does any module whose fields the ops do not
implement (another activation or ratio, a kernel size not compiled, other attention or DFC
switches, a dtype other than float32, a depthwise impl other than 'auto'/'native', a subclass).
Where a fused part ends in an attention the op does not fuse, that attention runs after it. The
decision is made from the modules' fields as they are traced, so an edited architecture either
matches a fused op or runs unfused. tests/test_runtime.py checks the numbers on every
registered model and the ablation variants.

Used by ``runtime.predict_fn`` on CPU only; the interception is active while the network is
traced inside ``fused()``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ghostnetv2_jax import kernels
from ghostnetv2_jax.kernels.ghost_module import KERNEL_SIZES, StridedDepthwise, apply_strided, ghost_module
from ghostnetv2_jax.kernels.pointwise import pointwise
from ghostnetv2_jax.kernels.stem import stem_conv
from ghostnetv2_jax.models.ghostnet import GhostBottleneck, GhostModule, GhostNet
from ghostnetv2_jax.layers.attention import GATES, DFCAttention, make_attention
from ghostnetv2_jax.layers.batchnorm import BatchNorm, inference_affine
from ghostnetv2_jax.layers.depthwise import DepthwiseConv

# The module op also runs the primary 1x1 conv when its input is this narrow (every ghost1 from
# the stem to the 28x28 stage, and block 0's ghost2), where XLA's matmul is bound by memory;
# wider matmuls are compute-bound and faster in XLA (measured at batch 32 on 2 cores).
FUSED_PRIMARY_MAX_CHANNELS = 40
FUSIBLE_IMPLS = ('auto', 'native')
# 1x1 convs (and the classifier) run as the native pointwise op on inputs of at most this many
# images: XLA's matmul runs a single image's few hundred rows on one thread, the op on every core;
# at a chunk of the batch (chunking.CPU_CHUNK images, two chunks at once) XLA's is as fast.
NATIVE_POINTWISE_MAX_IMAGES = 7


@contextlib.contextmanager
def fused():
    """Within this context, a traced GhostNet uses the fused native ops (see the module
    docstring). Requires the native kernels (``kernels.available()``); without them it runs the
    model unchanged."""
    if not kernels.available():
        yield
        return
    with nn.intercept_methods(_Interceptor()):
        yield


def _call_args(args, kwargs) -> Tuple[jax.Array, bool]:
    x = args[0] if args else kwargs['x']
    train = args[1] if len(args) > 1 else kwargs.get('train', False)
    return x, bool(train)


def _variables(module: nn.Module) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    v = module.variables
    return v.get('params', {}), v.get('batch_stats', {})


def _ghost_module_fusible(m: GhostModule, x: jax.Array, train: bool) -> bool:
    return (not train and m.ratio == 2 and (m.dw_size, m.dw_size) in KERNEL_SIZES
            and (not m.use_act or m.act is nn.relu) and m.dtype == jnp.float32 and x.dtype == jnp.float32
            and x.ndim == 4 and m.depthwise_impl in FUSIBLE_IMPLS and 'primary_conv' in _variables(m)[0])


def _few_images(x: jax.Array) -> bool:
    return x.shape[0] <= NATIVE_POINTWISE_MAX_IMAGES


def _pointwise_fusible(m: nn.Conv, args, kwargs) -> bool:
    """A 1x1 conv (stride 1, no padding, dilation or groups) on a float32 NHWC map of few images."""
    x = args[0] if args else kwargs.get('inputs')
    params = m.variables.get('params', {})
    kernel = params.get('kernel')
    one = lambda v: v is None or (v == 1 if isinstance(v, int) else tuple(v) == (1, 1))
    return (x is not None and kernel is not None and x.ndim == 4 and kernel.ndim == 4
            and kernel.shape[:2] == (1, 1) and _few_images(x) and m.feature_group_count == 1
            and x.dtype == jnp.float32 and m.dtype in (None, jnp.float32) and m.use_bias == ('bias' in params)
            and one(m.strides) and one(m.kernel_dilation) and one(m.input_dilation)
            and m.padding in ('VALID', 'SAME', ((0, 0), (0, 0)), [(0, 0), (0, 0)], 0))


def _dense_fusible(m: nn.Dense, args, kwargs) -> bool:
    """A float32 Dense layer on (batch, features) of few images."""
    x = args[0] if args else kwargs.get('inputs')
    params = m.variables.get('params', {})
    return (x is not None and x.ndim == 2 and _few_images(x) and x.dtype == jnp.float32
            and m.dtype in (None, jnp.float32) and params.get('kernel') is not None
            and params['kernel'].ndim == 2 and m.use_bias == ('bias' in params))


def _dfc_gate_fusible(attn: nn.Module, size) -> bool:
    """DFC's gate taken before a nearest up-sampling by whole factors: the op applies it."""
    if type(attn) is not DFCAttention or not attn.gate_before_upsample or attn.upsample != 'nearest':
        return False
    h, w = size
    ph, pw = (h, w) if attn.downsample == 'none' else (h // 2, w // 2)
    return ph > 0 and pw > 0 and h % ph == 0 and w % pw == 0 and attn.depthwise_impl in FUSIBLE_IMPLS


def _unbound_attention(m: GhostModule) -> Optional[nn.Module]:
    """The module's attention variant as the model builds it, unbound."""
    options = m.attention_options()
    return None if options['name'] == 'none' else make_attention(**options, parent=None)


def _strided_of(m: GhostModule) -> Optional[StridedDepthwise]:
    """ghost1's stride-2 bottleneck's conv_dw and bn_dw, when the op can run them."""
    block = m.parent
    if type(block) is not GhostBottleneck or m.name != 'ghost1' or block.stride <= 1:
        return None
    k = block.kernel_size
    params, stats = _variables(block)
    if (k, k) not in KERNEL_SIZES or block.depthwise_impl not in FUSIBLE_IMPLS or 'conv_dw' not in params:
        return None
    scale, bias = inference_affine(params['bn_dw'], stats.get('bn_dw'))
    return StridedDepthwise(params['conv_dw']['kernel'], scale, bias, (block.stride, block.stride),
                            ((k // 2, k // 2), (k // 2, k // 2)))


class _Interceptor:
    """The method interceptor behind ``fused()``; one per traced apply."""

    def __init__(self):
        self.passed_through = set()   # bottleneck paths whose conv_dw / bn_dw ghost1 computed

    def __call__(self, next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != '__call__':
            return next_fun(*args, **kwargs)
        kind = type(m)
        if kind is GhostModule:
            x, train = _call_args(args, kwargs)
            if _ghost_module_fusible(m, x, train):
                return self._ghost_module(m, x)
        elif kind in (DepthwiseConv, BatchNorm) and m.name in ('conv_dw', 'bn_dw') and m.parent is not None:
            key = (m.parent.scope.path, m.name)
            if key in self.passed_through:
                self.passed_through.discard(key)
                return args[0]
        elif kind is nn.Conv and _pointwise_fusible(m, args, kwargs):
            params = m.variables['params']
            return pointwise(args[0] if args else kwargs['inputs'], params['kernel'][0, 0], params.get('bias'))
        elif kind is nn.Dense and _dense_fusible(m, args, kwargs):
            params = m.variables['params']
            x = args[0] if args else kwargs['inputs']
            return pointwise(x[:, None, None, :], params['kernel'], params.get('bias'))[:, 0, 0]
        elif kind is nn.Conv and m.name == 'conv_stem' and type(m.parent) is GhostNet:
            x = args[0] if args else kwargs['inputs']
            if x.dtype == jnp.float32 and m.dtype == jnp.float32 and not m.use_bias and 'kernel' in m.variables.get('params', {}):
                return self._stem(m, x)
        return next_fun(*args, **kwargs)

    def _ghost_module(self, m: GhostModule, x: jax.Array) -> jax.Array:
        params, stats = _variables(m)
        s1, b1 = inference_affine(params['primary_bn'], stats.get('primary_bn'))
        s2, b2 = inference_affine(params['cheap_bn'], stats.get('cheap_bn'))
        primary, cheap = params['primary_conv']['kernel'], params['cheap_conv']['kernel']
        attn = _unbound_attention(m)
        attn_vars = {name: tree['attn'] for name, tree in m.variables.items() if 'attn' in tree}
        gate = None
        if attn is not None and _dfc_gate_fusible(attn, x.shape[1:3]):
            logits = attn.apply(attn_vars, x, False, method=DFCAttention.attention_map)
            gate, attn = GATES[attn.gate](logits), None
        ops = (s1, b1, cheap, s2, b2, m.features, m.use_act)
        strided = _strided_of(m)
        if x.shape[-1] <= FUSED_PRIMARY_MAX_CHANNELS:
            last = attn is None             # nothing left to apply after the op
            out = ghost_module(x, *ops, gate=gate, primary=primary, strided=strided if last else None)
            if last and strided is not None:
                block = m.parent.scope.path
                self.passed_through.update({(block, 'conv_dw'), (block, 'bn_dw')})
            if last:
                return out
        else:
            p = (pointwise(x, primary[0, 0]) if _few_images(x) else
                 lax.dot_general(x, primary[0, 0], (((x.ndim - 1,), (0,)), ((), ()))))
            out = ghost_module(p, *ops, gate=gate)
        if attn is not None:
            out = attn.apply(attn_vars, x, out, False)
        return out

    @staticmethod
    def _stem(m: nn.Conv, x: jax.Array) -> jax.Array:
        kernel = m.variables['params']['kernel']
        cout = kernel.shape[-1]
        one, zero = jnp.ones((cout,), jnp.float32), jnp.zeros((cout,), jnp.float32)
        return stem_conv(x, kernel, one, zero, m.strides, m.padding, relu=False)


def is_fusible(model: Any) -> bool:
    """Whether ``fused()`` can change anything for ``model`` (a GhostNet on float32)."""
    return isinstance(model, GhostNet) and model.dtype == jnp.float32 and kernels.available()


__all__ = ['fused', 'is_fusible', 'FUSED_PRIMARY_MAX_CHANNELS', 'NATIVE_POINTWISE_MAX_IMAGES']
