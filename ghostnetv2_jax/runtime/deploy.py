"""Inference transform: fold every BatchNorm into the conv that feeds it.

In eval mode BatchNorm is a per-channel affine map, ``y = x * mul + add`` with
``mul = scale / sqrt(var + eps)`` and ``add = bias - mean * mul``. Every BatchNorm of GhostNet
(V1, V2 and the attention variants) directly follows a convolution, so the multiply moves into
that conv's kernel (its output-channel axis) and only ``+ add`` is left::

    deploy_model, deploy_variables = fold_batchnorm(model, variables)
    logits = jax.jit(deploy_model.apply)(deploy_variables, images)   # == model.apply(variables, images)

``deploy_model`` is ``model`` with ``fold_bn=True``: the same modules and names, where each
BatchNorm keeps only its ``bias`` (the folded shift) and there are no ``batch_stats``. The
training model and its variables are untouched. The deploy model is inference-only, and its
``features_only`` output is refused (the first feature map is taken before ``bn1``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import flax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax.nn.batchnorm import EPSILON

# BatchNorm name -> the conv it follows, in the same parent module. 'bn1' is the stem's BN at the
# top level and Coordinate Attention's in its module: whichever conv exists there is the one.
_CONV_OF = {
    'bn1': ('conv_stem', 'conv1'),
    'primary_bn': ('primary_conv',), 'cheap_bn': ('cheap_conv',),
    'bn_dw': ('conv_dw',), 'shortcut_dw_bn': ('shortcut_dw',), 'shortcut_pw_bn': ('shortcut_pw',),
    'bn': ('conv',), 'bn_w': ('fc_w',), 'bn_h': ('fc_h',),
    'spatial_bn': ('spatial_conv',),
}
_LAST_STAGE_BN = re.compile(r'^(blocks_\d+_0_)bn1$')   # the final 1x1 conv stage: blocks_9_0_conv


def _conv_for(bn_name: str, scope: Dict[str, Any], path: str) -> str:
    m = _LAST_STAGE_BN.match(bn_name)
    candidates = (m.group(1) + 'conv',) if m else _CONV_OF.get(bn_name, ())
    found = [c for c in candidates if c in scope]
    if len(found) != 1:
        raise ValueError(f'cannot tell which conv feeds BatchNorm {path}{bn_name}: '
                         f'expected one of {list(candidates)} beside it')
    return found[0]


def _fold_scope(params: Dict[str, Any], stats: Dict[str, Any], eps: float, path: str) -> Dict[str, Any]:
    """Fold the BatchNorms that are direct children of this module; recurse into the rest."""
    out = dict(params)
    bns = [k for k in params if k in stats and set(stats[k]) == {'mean', 'var'}]
    for name in bns:
        bn, st = params[name], stats[name]
        mul = np.asarray(bn['scale'], np.float64) / np.sqrt(np.asarray(st['var'], np.float64) + eps)
        add = np.asarray(bn['bias'], np.float64) - np.asarray(st['mean'], np.float64) * mul
        conv_name = _conv_for(name, params, path)
        conv = dict(params[conv_name])
        kernel = np.asarray(conv['kernel'], np.float64)
        if kernel.shape[-1] != mul.shape[0]:
            raise ValueError(f'{path}{conv_name} has {kernel.shape[-1]} outputs but {path}{name} '
                             f'normalises {mul.shape[0]} channels')
        conv['kernel'] = jnp.asarray(kernel * mul, jnp.float32)          # HWIO / (kh, kw, 1, C)
        if 'bias' in conv:   # a conv bias passes through the BN too: fold it into the shift
            add = add + np.asarray(conv['bias'], np.float64) * mul
            conv['bias'] = jnp.zeros_like(conv['bias'])
        out[conv_name] = conv
        out[name] = {'bias': jnp.asarray(add, jnp.float32)}
    for name, child in params.items():
        if name not in bns and isinstance(child, dict) and name in stats:
            out[name] = _fold_scope(out[name], stats[name], eps, f'{path}{name}/')
    return out


def fold_batchnorm(model, variables) -> Tuple[Any, Dict[str, Any]]:
    """(deploy_model, deploy_variables): ``model`` with BatchNorm folded into the preceding convs.

    The variables must be the model's eval-mode variables (``params`` and ``batch_stats``)."""
    if not hasattr(model, 'fold_bn'):
        raise TypeError(f'{type(model).__name__} has no fold_bn field; expected a GhostNet')
    if getattr(model, 'fold_bn'):
        raise ValueError('the model is already folded')
    variables = flax.core.unfreeze(variables)
    if set(variables) != {'params', 'batch_stats'}:
        raise ValueError(f"expected variables with 'params' and 'batch_stats', got {sorted(variables)}")
    params = _fold_scope(variables['params'], variables['batch_stats'], EPSILON, '')
    return model.clone(fold_bn=True), {'params': params}
