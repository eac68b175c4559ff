"""PyTorch state_dict <-> Flax variables, strictly, and the reader of PyTorch state_dict files.

The mapping is a handful of explicit rules (efficientnet-jax style):

- names: Flax module paths are joined with '.', then ``_RENAMES`` turns them into timm's keys
  (``blocks_3_0.ghost1.primary_bn`` -> ``blocks.3.0.ghost1.primary_conv.1``);
- leaves: ``kernel`` -> ``weight`` with conv HWIO -> OIHW (a depthwise (kh, kw, 1, C) becomes
  (C, 1, kh, kw)) and dense (in, out) -> (out, in); BN ``scale``/``bias`` -> ``weight``/``bias``;
  ``batch_stats`` ``mean``/``var`` -> ``running_mean``/``running_var``; every BN also owns a
  ``num_batches_tracked`` buffer in PyTorch, consumed on import and written on export.

Strict: every tensor of the state_dict is consumed, every Flax leaf is filled and every shape
checked; anything else raises ``ConversionError`` naming the keys.

``load_state_dict`` reads a timm ``.safetensors`` without torch and ``.pth``/``.pth.tar`` files with
``torch.load(weights_only=True)``. Every other way in and out of weights (workdirs, Flax variables
files, writing state_dicts) is ``ghostnetv2_jax.weights``.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax.models.registry import create_model

StateDict = Dict[str, np.ndarray]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model, or a file that is not a checkpoint."""


# Flax module path (dotted) -> timm key. Applied in order, each to the whole dotted path.
_RENAMES = (
    (r'^blocks_(\d+)_(\d+)_', r'blocks.\1.\2.'),          # final 1x1 stage: blocks_9_0_conv
    (r'^blocks_(\d+)_(\d+)\.', r'blocks.\1.\2.'),
    (r'_rpr_conv_(\d+)\.', r'_rpr_conv.\1.'),             # GhostNetV3's parallel branches (ModuleList)
    (r'\.primary_conv\.', '.primary_conv.0.'),
    (r'\.primary_bn\.', '.primary_conv.1.'),
    (r'\.cheap_conv\.', '.cheap_operation.0.'),
    (r'\.cheap_bn\.', '.cheap_operation.1.'),
    (r'\.shortcut_dw\.', '.shortcut.0.'),
    (r'\.shortcut_dw_bn\.', '.shortcut.1.'),
    (r'\.shortcut_pw\.', '.shortcut.2.'),
    (r'\.shortcut_pw_bn\.', '.shortcut.3.'),
    # DFC attention: timm's short_conv Sequential (conv, BN, FC_W, BN, FC_H, BN).
    (r'\.attn\.conv\.', '.short_conv.0.'),
    (r'\.attn\.bn\.', '.short_conv.1.'),
    (r'\.attn\.fc_w\.', '.short_conv.2.'),
    (r'\.attn\.bn_w\.', '.short_conv.3.'),
    (r'\.attn\.fc_h\.', '.short_conv.4.'),
    (r'\.attn\.bn_h\.', '.short_conv.5.'),
)
_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
           ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
_PROFILER_KEYS = ('total_ops', 'total_params')   # thop leftovers in the authors' release files
# The authors' GhostNetV3 names each branch's BatchNorm 'bn' where timm says 'bn1' (timm's
# checkpoint_filter_fn renames it in the ghost modules and the stride-2 depthwise branches).
_AUTHORS_V3_BN = re.compile(r'\.(ghost\d|dw_rpr_)')


def torch_name(collection: str, path: Tuple[str, ...]) -> str:
    """timm's state_dict key for the Flax leaf ``variables[collection][path[0]]...[path[-1]]``."""
    module = '.'.join(path[:-1]) + '.'
    for pattern, repl in _RENAMES:
        module = re.sub(pattern, repl, module)
    return module + _LEAVES[(collection, path[-1])]


def _to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == 'kernel' and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)           # HWIO -> OIHW
    if leaf == 'kernel' and a.ndim == 2:
        return a.T                                # (in, out) -> (out, in)
    return a


def _to_flax_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == 'kernel' and a.ndim == 4:
        return a.transpose(2, 3, 1, 0)           # OIHW -> HWIO
    if leaf == 'kernel' and a.ndim == 2:
        return a.T
    return a


def _flax_leaves(model_name: str, **overrides) -> Dict[Tuple[str, Tuple[str, ...]], jax.ShapeDtypeStruct]:
    """Shapes of every Flax leaf of the model, keyed by (collection, path); nothing computed.
    Tracing the init takes seconds for a GhostNetV3, so the answer is kept per model and overrides
    (where the overrides can be a dict key)."""
    key = (model_name, tuple(sorted(overrides.items())))
    try:
        return dict(_cached_flax_leaves(key))
    except TypeError:   # an unhashable override (attention_kwargs): traced each time
        return _trace_flax_leaves(model_name, **overrides)


@functools.lru_cache(maxsize=32)
def _cached_flax_leaves(key):
    return _trace_flax_leaves(key[0], **dict(key[1]))


def _trace_flax_leaves(model_name: str, **overrides) -> Dict[Tuple[str, Tuple[str, ...]], jax.ShapeDtypeStruct]:
    model = create_model(model_name, **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    out = {}
    for collection, tree in shapes.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[(collection, tuple(k.key for k in path))] = leaf
    return out


def _bn_prefixes(names) -> set:
    return {n[:-len('running_mean')] for n in names if n.endswith('running_mean')}


def to_numpy(v: Any) -> np.ndarray:
    """numpy float32 (or integer) array from a numpy array, jax array or torch tensor."""
    if hasattr(v, 'detach'):                      # torch.Tensor, without importing torch
        v = v.detach().cpu()
        v = v.float() if v.is_floating_point() else v
        return v.numpy()
    a = np.asarray(v)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _nest(flat: Dict[Tuple[str, Tuple[str, ...]], np.ndarray]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for (collection, path), value in flat.items():
        node = out.setdefault(collection, {})
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _summarise(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def torch_to_flax(state_dict: Mapping[str, Any], model_name: str, **overrides) -> Dict[str, Any]:
    """timm / authors' state_dict -> ``{'params', 'batch_stats'}`` for ``create_model(model_name,
    **overrides)``. Raises ``ConversionError`` on any missing, unexpected or mis-shaped tensor."""
    state_dict = filter_state_dict(state_dict)
    targets = _flax_leaves(model_name, **overrides)
    names = {key: torch_name(*key) for key in targets}
    wanted = set(names.values()) | {p + 'num_batches_tracked' for p in _bn_prefixes(names.values())}
    missing = sorted(n for n in names.values() if n not in state_dict)
    unexpected = sorted(set(state_dict) - wanted)
    mismatch = None
    flat = {}
    for key, name in names.items():
        if name not in state_dict:
            continue
        a = _to_flax_layout(key[1][-1], to_numpy(state_dict[name]))
        if a.shape != targets[key].shape and mismatch is None:
            mismatch = (name, tuple(np.shape(state_dict[name])), _to_torch_layout(key[1][-1], np.zeros(targets[key].shape)).shape)
        flat[key] = jnp.asarray(a, jnp.float32)
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys: {_summarise(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {_summarise(unexpected)}')
    if mismatch:
        problems.append(f'shape mismatch at {mismatch[0]}: checkpoint {mismatch[1]} vs model {mismatch[2]}')
    if problems:
        have, want = checkpoint_version(state_dict), checkpoint_version(names.values())
        if missing and have != want and 'v3' in (have, want):
            problems.append(f'the checkpoint holds GhostNet{have.upper()} weights, {model_name} is GhostNet{want.upper()}')
        raise ConversionError(f'checkpoint does not fit {model_name}: ' + '; '.join(problems))
    return _nest(flat)


def flax_to_torch(variables: Mapping[str, Any], model_name: str, *, as_torch: bool = False,
                  **overrides) -> Dict[str, Any]:
    """Flax variables -> timm state_dict (numpy arrays, or torch tensors with ``as_torch``) that
    ``timm.create_model(model_name).load_state_dict(sd, strict=True)`` accepts."""
    targets = _flax_leaves(model_name, **overrides)
    out: Dict[str, Any] = {}
    for collection, path in targets:
        node = variables[collection]
        for k in path:
            node = node[k]
        a = np.asarray(node, np.float32)
        if a.shape != targets[(collection, path)].shape:
            raise ConversionError(f"variables do not fit {model_name}: {collection}/{'/'.join(path)} "
                                  f"has shape {a.shape}, model expects {targets[(collection, path)].shape}")
        out[torch_name(collection, path)] = np.ascontiguousarray(_to_torch_layout(path[-1], a))
    for prefix in _bn_prefixes(list(out)):
        out[prefix + 'num_batches_tracked'] = np.zeros((), np.int64)
    out = dict(sorted(out.items()))
    if as_torch:
        import torch
        out = {k: torch.from_numpy(np.array(v)) for k, v in out.items()}  # writable copies
    return out


# ----------------------------------------------------------------------------- files
def filter_state_dict(sd: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop profiler leftovers and a DataParallel 'module.' prefix, and rename the authors'
    GhostNetV3 branch BatchNorms ``bn.`` to timm's ``bn1.`` (the authors' files need these)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_PROFILER_KEYS):
            continue
        k = k[len('module.'):] if k.startswith('module.') else k
        if 'bn.' in k and _AUTHORS_V3_BN.search(k):
            k = k.replace('bn.', 'bn1.')
        out[k] = v
    return out


def checkpoint_version(names) -> str:
    """Which GhostNet a set of timm state_dict keys (or this project's converted names) belongs
    to: 'v3' (re-parameterisable branches), 'v2' (DFC attention) or 'v1'."""
    names = list(names)
    if any('_rpr_' in n for n in names):
        return 'v3'
    return 'v2' if any('.short_conv.' in n for n in names) else 'v1'


def _unwrap(obj: Any, path: str, use_ema: bool) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f'{path} holds a {type(obj).__name__}, not a state_dict')
    ema_keys = [k for k in ('state_dict_ema', 'model_ema', 'ema') if k in obj]
    if use_ema:
        if not ema_keys:
            raise ConversionError(f'{path} has no EMA weights (looked for state_dict_ema, model_ema, ema)')
        obj = obj[ema_keys[0]]
    else:
        for k in ('state_dict', 'model'):
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not obj or not all(isinstance(k, str) and hasattr(v, 'shape') for k, v in obj.items()):
        raise ConversionError(f'{path} is not a state_dict of tensors')
    return obj


def load_state_dict(path: str, use_ema: bool = False) -> StateDict:
    """Read a ``.safetensors`` (no torch needed) or ``.pth``/``.pth.tar``/``.pt``/``.bin`` file,
    unwrap ``state_dict``/``model`` (or the EMA copy with ``use_ema``), drop profiler keys."""
    if not os.path.isfile(path):
        raise ConversionError(f'no such checkpoint file: {path}')
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file
        try:
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ConversionError(f'cannot read {path} as safetensors (truncated or not a checkpoint): '
                                  f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
        if use_ema:
            raise ConversionError(f'{path}: safetensors files hold one set of weights; drop --ema')
    else:
        import torch
        try:
            sd = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(f'cannot read {path} as a PyTorch checkpoint (truncated or not a '
                                  f'checkpoint): {msg}') from None
        sd = _unwrap(sd, path, use_ema)
    return {k: to_numpy(v) for k, v in filter_state_dict(sd).items()}

