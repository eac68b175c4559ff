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
``forward_intermediates`` refuses feature index 0 (the stride-2 map, taken before ``bn1``).

GhostNetV3 (``num_conv_branches`` > 0) trains each ghost module's two convs and each stride-2
depthwise conv as parallel conv+BN branches. In eval mode every branch is linear, so each sum
of branches is one conv with a bias (RepVGG's re-parameterisation)::

    deploy_model, deploy_variables = reparameterize(model, variables)

folds every branch's BatchNorm into its conv, zero-pads the 1x1 scale branch to the k x k
kernel, writes the BN-only identity branch as a centre-tap kernel, and sums them; the remaining
BatchNorms are folded as above. ``deploy_model`` is the GhostNetV2 network (``num_conv_branches=0``,
``fold_bn=True``), so everything that runs a V2 model (``predict_fn`` and its fused ops) runs it.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

import flax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax.layers.batchnorm import EPSILON

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


def _eval_variables(model, variables) -> Dict[str, Any]:
    if not hasattr(model, 'fold_bn'):
        raise TypeError(f'{type(model).__name__} has no fold_bn field; expected a GhostNet')
    if getattr(model, 'fold_bn'):
        raise ValueError('the model is already folded')
    variables = flax.core.unfreeze(variables)
    if set(variables) != {'params', 'batch_stats'}:
        raise ValueError(f"expected variables with 'params' and 'batch_stats', got {sorted(variables)}")
    return variables


def fold_batchnorm(model, variables) -> Tuple[Any, Dict[str, Any]]:
    """(deploy_model, deploy_variables): ``model`` with BatchNorm folded into the preceding convs.
    A GhostNetV3 training form is re-parameterised (``reparameterize``), its only inference form.

    The variables must be the model's eval-mode variables (``params`` and ``batch_stats``)."""
    if getattr(model, 'num_conv_branches', 0):
        return reparameterize(model, variables)
    variables = _eval_variables(model, variables)
    params = _fold_scope(variables['params'], variables['batch_stats'], EPSILON, '')
    return model.clone(fold_bn=True), {'params': params}


# ----------------------------------------------------------------------------- GhostNetV3
def _bn_affine(params: Dict[str, Any], stats: Dict[str, Any], eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm as ``x * mul + add``, in float64."""
    mul = np.asarray(params['scale'], np.float64) / np.sqrt(np.asarray(stats['var'], np.float64) + eps)
    return mul, np.asarray(params['bias'], np.float64) - np.asarray(stats['mean'], np.float64) * mul


def _centred(kernel: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A (kh, kw, I, O) kernel zero-padded to ``size``, its taps at the centre."""
    (kh, kw), (th, tw) = kernel.shape[:2], size
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    return np.pad(kernel, ((ph, th - kh - ph), (pw, tw - kw - pw), (0, 0), (0, 0)))


def _merge_branches(params: Dict[str, Any], stats: Dict[str, Any], convs, scale: Optional[str],
                    identity: Optional[str], eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """One (kernel, bias) equal in eval mode to the sum of the conv+BN branches ``convs``, the
    1x1 conv+BN branch ``scale`` and the BN-only branch ``identity`` (depthwise, one output per
    channel), all read from one module's ``params`` / ``stats``."""
    kernel, bias = None, None

    def add(k, b):
        nonlocal kernel, bias
        kernel = k if kernel is None else kernel + k
        bias = b if bias is None else bias + b
    for name in convs:
        mul, add_ = _bn_affine(params[name]['bn1'], stats[name]['bn1'], eps)
        add(np.asarray(params[name]['conv']['kernel'], np.float64) * mul, add_)
    size = kernel.shape[:2]
    if scale is not None:
        mul, add_ = _bn_affine(params[scale]['bn1'], stats[scale]['bn1'], eps)
        add(_centred(np.asarray(params[scale]['conv']['kernel'], np.float64) * mul, size), add_)
    if identity is not None:
        mul, add_ = _bn_affine(params[identity], stats[identity], eps)
        eye = np.zeros(size + (1, mul.shape[0]))
        eye[size[0] // 2, size[1] // 2, 0, :] = 1.0
        add(eye * mul, add_)
    return kernel, bias


def _folded(kernel: np.ndarray, bias: np.ndarray) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A folded (conv, BN) pair's variables: the conv's kernel and the BN's shift."""
    return {'kernel': jnp.asarray(kernel, jnp.float32)}, {'bias': jnp.asarray(bias, jnp.float32)}


def _branches(scope: Dict[str, Any], prefix: str):
    found = sorted((k for k in scope if k.startswith(prefix) and k[len(prefix):].isdigit()),
                   key=lambda k: int(k[len(prefix):]))
    if not found:
        raise ValueError(f'no {prefix}N branches beside the other re-parameterisable parts')
    return found


def _reparameterize_scope(params: Dict[str, Any], stats: Dict[str, Any],
                          eps: float) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """GhostModuleV3 -> GhostModule and GhostBottleneckV3's strided branches -> conv_dw / bn_dw,
    with the branches' BatchNorms folded; (params, stats) of everything else pass through."""
    params, stats = dict(params), dict(stats)
    merged = []
    if 'primary_rpr_conv_0' in params:          # a GhostModuleV3
        primary = _branches(params, 'primary_rpr_conv_')
        cheap = _branches(params, 'cheap_rpr_conv_')
        identity = 'cheap_rpr_skip' if 'cheap_rpr_skip' in params else None
        params['primary_conv'], params['primary_bn'] = _folded(*_merge_branches(
            params, stats, primary, None, None, eps))
        params['cheap_conv'], params['cheap_bn'] = _folded(*_merge_branches(
            params, stats, cheap, 'cheap_rpr_scale', identity, eps))
        merged += primary + cheap + ['cheap_rpr_scale'] + ([identity] if identity else [])
    if 'dw_rpr_scale' in params:                # a stride-2 GhostBottleneckV3
        convs = _branches(params, 'dw_rpr_conv_')
        params['conv_dw'], params['bn_dw'] = _folded(*_merge_branches(params, stats, convs, 'dw_rpr_scale', None, eps))
        merged += convs + ['dw_rpr_scale']
    for name in merged:
        params.pop(name)
        stats.pop(name, None)
    for name, child in list(params.items()):
        if name not in merged and isinstance(child, dict) and name in stats:
            params[name], stats[name] = _reparameterize_scope(child, stats[name], eps)
    return params, stats


def reparameterize(model, variables) -> Tuple[Any, Dict[str, Any]]:
    """(deploy_model, deploy_variables) of a GhostNetV3 training form (``num_conv_branches`` > 0):
    every set of parallel branches folded into one conv, and every BatchNorm into its conv. The
    deploy model is the GhostNetV2 network with folded BatchNorm; its eval logits are
    ``model.apply(variables, x)``'s within float32 rounding.

    The variables must be the model's eval-mode variables (``params`` and ``batch_stats``)."""
    if not getattr(model, 'num_conv_branches', 0):
        raise ValueError('reparameterize takes a GhostNetV3 training form (num_conv_branches > 0); '
                         'fold_batchnorm is the inference form of GhostNet V1/V2')
    variables = _eval_variables(model, variables)
    params, stats = _reparameterize_scope(variables['params'], variables['batch_stats'], EPSILON)
    params = _fold_scope(params, stats, EPSILON, '')
    return model.clone(num_conv_branches=0, fold_bn=True), {'params': params}
