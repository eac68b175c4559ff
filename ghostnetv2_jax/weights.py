"""The one owner of weights: where a model's variables come from and where they go.

Sources (``load``), each giving the model name, its overrides and ``{'params', 'batch_stats'}``:

- a **training workdir** (local or ``gs://``): the checkpoint at ``step`` ('latest', 'best' or a
  step number), the raw weights or, with ``ema``, the EMA copy. For 'latest' and 'best' a damaged
  step falls back to the newest intact one, by the trainer's own rule (``checkpoint.restore_newest``);
  nothing in the workdir is moved or changed;
- a **``.safetensors`` of Flax variables** (``save_variables``, the ``convert`` command): the model
  name and its overrides are in the file;
- a **PyTorch state_dict**: the authors' ``.pth.tar``, timm's ``.pth`` or ``.safetensors``, read as
  ``model_name`` (``ema``: the EMA copy a training file holds);
- **published weights by name**, ``'pretrained:NAME'`` (``'pretrained:ghostnetv2_100'`` or with the
  tag, ``'pretrained:ghostnetv2_100.in1k'``): timm's ``model.safetensors`` for the registered hub id,
  fetched through ``huggingface_hub``'s cache (``ghostnetv2_jax.hub``) and converted
  (``load_pretrained``).

Writers: ``save_variables`` (Flax variables, safetensors) and ``save_state_dict`` (a state_dict
that timm loads with ``strict=True``: ``.pth`` through torch, or ``.safetensors``). Every write is
atomic: a failed one leaves any existing file as it was.

Only files and the orbax checkpoint are read: no TensorFlow (the training extras) and, but for
``.pth`` files, no torch (published weights need ``huggingface_hub``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax import hub
from ghostnetv2_jax.convert import ConversionError, flax_to_torch, load_state_dict, torch_to_flax
from ghostnetv2_jax.models.registry import create_model, get_spec
from ghostnetv2_jax.train.state import DTYPES, architecture_overrides, init_variables, tuplify

FORMAT = 'ghostnetv2_jax.variables/1'   # the safetensors metadata 'format' of save_variables' files
TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.tar')
STEPS = ('latest', 'best')   # or a step number
PRETRAINED = hub.PREFIX      # a source naming published weights: 'pretrained:ghostnetv2_100'
# create_model overrides that say how a model runs, not what its weights are (not kept in Weights)
RUNTIME_OVERRIDES = ('dtype', 'drop_rate', 'depthwise_impl')


@dataclasses.dataclass(frozen=True)
class Weights:
    """Variables and what they are the weights of: ``create_model(model_name, **overrides)``
    (``overrides`` holds ``num_classes`` and the architecture overrides)."""
    model_name: str
    overrides: Dict[str, Any]
    variables: Dict[str, Any]
    source: str
    config: Optional[Dict[str, Any]] = None   # a workdir's training config (its data settings)
    step: Optional[int] = None                # a workdir's checkpoint step

    @property
    def num_classes(self) -> int:
        return int(self.model().num_classes)

    def model(self, dtype: str = 'float32', **kwargs):
        """The model these are the variables of, computing in ``dtype``."""
        if dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
        return create_model(self.model_name, dtype=DTYPES[dtype], **{**self.overrides, **kwargs})


# ----------------------------------------------------------------------------- reading
def is_pretrained(source: str) -> bool:
    """``source`` names published weights: ``'pretrained:NAME'``."""
    return hub.is_pretrained(source)


def is_workdir(source: str) -> bool:
    """A directory (or a remote path without a weights file's suffix) is a training workdir."""
    if is_pretrained(source):
        return False
    if '://' in source:
        return not source.endswith(('.safetensors',) + TORCH_SUFFIXES)
    return os.path.isdir(source)


def needs_model_name(source: str) -> bool:
    """A PyTorch file names no model: reading it takes one."""
    return not is_workdir(source) and not is_pretrained(source) and not source.endswith('.safetensors')


def check_source(source: str, model_name: Optional[str] = None, step: str = 'latest') -> Optional[str]:
    """What is wrong with a source, found without reading it; None if nothing."""
    if str(step) not in STEPS and not str(step).isdigit():
        return f"step must be 'latest', 'best' or a step number, got {step!r}"
    if model_name is not None:
        try:
            get_spec(model_name)
        except ValueError as e:
            return str(e)
    if is_pretrained(source):
        if str(step) != 'latest':
            return f'{source} names published weights: they have no checkpoint step {step!r}'
        try:
            name = hub.resolve(source)[0]
        except ValueError as e:
            return str(e)
        if model_name and model_name != name:
            return f'{source} holds {name} weights, not {model_name}'
        return None
    if '://' in source or os.path.isdir(source):
        return None
    if not os.path.isfile(source):
        return f'no such checkpoint: {source}'
    if needs_model_name(source) and not model_name:
        return f'a model name is needed to read the PyTorch checkpoint {source}'
    return None


def load(source: str, model_name: Optional[str] = None, *, step: str = 'latest', ema: bool = False,
         overrides: Optional[Mapping[str, Any]] = None, log: Optional[Callable[[str], None]] = None) -> Weights:
    """The weights at ``source`` (a workdir, a weights file or ``'pretrained:NAME'``; see the
    module docstring).

    ``model_name``: needed for PyTorch files, checked against what the others hold.
    ``overrides``: architecture overrides to read a PyTorch file or published weights with (the
    class count is the file's). ``log``: where a damaged workdir step is reported (default: stderr).
    """
    found = _read(source, model_name, step, ema, overrides, log)
    if model_name and model_name != found.model_name:
        raise ConversionError(f'{source} holds {found.model_name} weights, not {model_name}')
    return found


def _read(source: str, model_name: Optional[str], step: str, ema: bool, overrides: Optional[Mapping[str, Any]],
          log: Optional[Callable[[str], None]]) -> Weights:
    problem = check_source(source, model_name, step)
    if problem:
        raise FileNotFoundError(problem) if problem.startswith('no such') else ConversionError(problem)
    log = log or (lambda line: print(f'warning: {line}', file=sys.stderr, flush=True))
    if is_pretrained(source):
        if ema:
            raise ConversionError(f'{source}: published weights are one set; they have no EMA copy')
        return load_pretrained(source, **dict(overrides or {}))
    if is_workdir(source):
        return _from_workdir(source, str(step), ema, log)
    if str(step) != 'latest':
        raise ValueError(f'{source} is a weights file, not a training workdir; it has no step {step!r}')
    return _from_file(source, model_name, ema, dict(overrides or {}))


def _from_file(path: str, model_name: Optional[str], ema: bool, overrides: Dict[str, Any]) -> Weights:
    local = _local_copy(path)
    if path.endswith('.safetensors') and _is_variables_file(local):
        if ema:
            raise ConversionError(f'{path} holds one set of weights; it has no EMA copy')
        variables, meta = load_variables(local)
        return Weights(meta['model'], meta['overrides'], variables, path)
    if not model_name:
        raise ConversionError(f'a model name is needed to read the PyTorch checkpoint {path}')
    return _from_state_dict(load_state_dict(local, use_ema=ema), model_name, overrides, path)


def _from_state_dict(sd: Mapping[str, Any], model_name: str, overrides: Dict[str, Any], source: str) -> Weights:
    """A PyTorch state_dict (numpy arrays) as ``model_name`` with ``overrides``; the class count is
    the state_dict's."""
    overrides = {**overrides, 'num_classes': sd['classifier.weight'].shape[0] if 'classifier.weight' in sd else 0}
    return Weights(model_name, overrides, torch_to_flax(sd, model_name, **overrides), source)


def load_pretrained(name: str, *, rng: Any = 0, **overrides: Any) -> Weights:
    """Published weights by name: timm's ``model.safetensors`` for the registered hub id
    (``'ghostnetv2_100'``, ``'ghostnetv2_100.in1k'``, either with or without ``'pretrained:'``),
    from ``huggingface_hub``'s cache (downloaded into it where missing; ``HF_HOME``, ``HF_HUB_CACHE``
    and ``HF_HUB_OFFLINE`` honoured), converted to Flax variables. No torch is needed.

    ``overrides``: ``create_model``'s. ``num_classes`` other than the published 1000 gives a **new,
    randomly initialised classifier head** (the model's own initialisation, from ``rng``: a PRNG key
    or an int seed), every other weight the published one: a model to fine-tune;
    ``num_classes=0``: no head (the model gives the pooled features). ``dtype``, ``drop_rate`` and
    ``depthwise_impl`` only say how the model runs (``Weights.model(...)`` takes them); other
    architecture overrides must fit the published weights.

    Errors (each one line): an unknown or unpublished name (ValueError naming the published
    weights); the file neither cached nor reachable (``hub.NotCached``, a FileNotFoundError saying
    where the file goes, or how to read a downloaded copy with ``load(FILE, model_name)``);
    ``huggingface_hub`` not installed (``hub.MissingDependency``).
    """
    model_name, _ = hub.resolve(name)
    create_model(model_name, **overrides)   # unknown overrides fail here, before any download
    if overrides.get('fold_bn'):
        raise ValueError('fold_bn: published weights are the training form; load them, then '
                         'ghostnetv2_jax.fold_batchnorm(model, variables)')
    arch = {k: v for k, v in overrides.items() if k not in RUNTIME_OVERRIDES + ('num_classes', 'fold_bn')}
    _, _, path = hub.download(name)
    w = _from_state_dict(load_state_dict(path), model_name, arch, hub.source(name))
    num_classes = overrides.get('num_classes')
    if num_classes is None or int(num_classes) == w.overrides['num_classes']:
        return w
    key = jax.random.PRNGKey(int(rng)) if isinstance(rng, (int, np.integer)) else rng
    return _with_new_head(w, int(num_classes), key)


def _with_new_head(w: Weights, num_classes: int, rng: jax.Array) -> Weights:
    """``w`` with a new classifier of ``num_classes`` (none for 0), initialised as the model
    initialises its own (its head alone is run), fitted by ``load_into``'s rules."""
    overrides = {**w.overrides, 'num_classes': num_classes}
    model = create_model(w.model_name, **overrides)
    fresh = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 64))
    if num_classes:
        channels = w.variables['params']['conv_head']['kernel'].shape[-2]   # forward_features' width
        head = model.init({'params': rng}, jnp.zeros((1, 1, 1, channels)), method=model.forward_head)
        fresh['params']['classifier'] = head['params']['classifier']
    variables = _fit(w.variables, fresh, keep_fresh_head=True, describe=f'{w.source} as {w.model_name}')
    return dataclasses.replace(w, overrides=overrides, variables=jax.device_get(variables))


def _from_workdir(workdir: str, step: str, ema: bool, log: Callable[[str], None]) -> Weights:
    import ml_collections
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    from ghostnetv2_jax.train import state as state_lib

    checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
    try:
        steps = sorted(checkpoints.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f'{workdir} holds no checkpoints (expected {checkpoints.directory}/<step>)')
        if step == 'best':
            best = checkpoints.best_step()
            steps = [best] + [s for s in steps if s != best] if best is not None else steps
        elif step != 'latest':
            if int(step) not in steps:
                raise ValueError(f'{workdir} has no checkpoint at step {step}; it has {sorted(steps)}')
            steps = [int(step)]

        def restore(at: int, meta: Dict[str, Any]):
            config = ml_collections.ConfigDict(meta['config'])
            model = state_lib.build_model(config, meta['num_classes'])
            return checkpoints.restore(at, state_lib.abstract_state(config, model))

        at, meta, state = ckpt_lib.restore_newest(checkpoints, restore, steps=steps, set_aside=False, log=log)
    finally:
        checkpoints.close()
    config = meta['config']
    if ema and state.ema_params is None:
        raise ValueError(f'{workdir} was trained without an EMA (ema_decay=0); it has no EMA weights')
    overrides = {k: v for k, v in architecture_overrides(ml_collections.ConfigDict(config)).items()
                 if k != 'depthwise_impl'}   # how the depthwise conv runs is not part of the weights
    return Weights(config['model'], {**overrides, 'num_classes': int(meta['num_classes'])},
                   jax.device_get(state.variables(ema)), workdir, config=config, step=int(at))


def load_into(source: str, model_name: str, overrides: Mapping[str, Any], fresh: Dict[str, Any], *,
              step: str = 'latest', ema: bool = False, keep_fresh_head: bool = True,
              role: str = 'init_from') -> Dict[str, Any]:
    """The weights at ``source`` fitted to ``fresh`` (a new model's initial variables): every leaf
    must exist with the same shape, except the classifier, which keeps its fresh initialisation
    when the class count differs (``keep_fresh_head=False``: an error, as for a distillation
    teacher). ``source``: anything ``load`` reads, ``'pretrained:NAME'`` included. ``role`` names
    the setting the source came from in errors; ``overrides`` are the architecture overrides used
    to read PyTorch files and published weights."""
    if not is_workdir(source) and not is_pretrained(source) and '://' not in source and not os.path.exists(source):
        try:   # a published name written without its prefix
            hub.resolve(source)
            hint = f" (published weights by name are written '{PRETRAINED}{source}')"
        except ValueError:
            hint = ''
        raise ConversionError(f'{role}: no such checkpoint file: {source}{hint}')
    loaded = _read(source, model_name, step, ema, {k: v for k, v in overrides.items() if k != 'num_classes'},
                   None).variables
    return _fit(loaded, fresh, keep_fresh_head=keep_fresh_head, describe=f'{role} {source} does not fit {model_name}')


def _fit(loaded: Mapping[str, Any], fresh: Dict[str, Any], *, keep_fresh_head: bool, describe: str) -> Dict[str, Any]:
    """``load_into``'s rule: ``loaded`` in ``fresh``'s structure and dtypes, every leaf present with
    its shape, the classifier ``fresh``'s where the class count differs (or ``fresh`` has none)."""
    want, have = _flat(fresh), _flat({k: loaded.get(k, {}) for k in ('params', 'batch_stats')})
    is_head = lambda k: k.startswith('params/classifier/')
    head_differs = (any(is_head(k) and k in have and have[k].shape != v.shape for k, v in want.items())
                    or (any(map(is_head, have)) and not any(map(is_head, want))))
    problems = []
    missing = sorted(k for k in want if k not in have and not (head_differs and is_head(k)))
    unexpected = sorted(k for k in have if k not in want and not (head_differs and keep_fresh_head and is_head(k)))
    shapes = sorted(f'{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}' for k in want
                    if k in have and not is_head(k) and have[k].shape != want[k].shape)
    if missing:
        problems.append(f'missing {missing[:5]}{" ..." if len(missing) > 5 else ""}')
    if unexpected:
        problems.append(f'unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}')
    if shapes:
        problems.append(f'shape mismatch {shapes[:3]}{" ..." if len(shapes) > 3 else ""}')
    if head_differs and not keep_fresh_head:
        head = next((k for k in want if is_head(k) and k in have and have[k].shape != want[k].shape), None)
        problems.append(f'classifier {head} {tuple(have[head].shape)} vs {tuple(want[head].shape)}' if head
                        else 'classifier: the model has none')
    if problems:
        raise ConversionError(f'{describe}: ' + '; '.join(problems))
    merged = {k: (want[k] if head_differs and is_head(k) else jnp.asarray(have[k], want[k].dtype)) for k in want}
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), [merged[k] for k in _flat(fresh)])


def _flat(tree: Any) -> Dict[str, Any]:
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _local_copy(path: str) -> str:
    """Remote files (gs://...) are copied to a local temporary file: the readers want a path."""
    if '://' not in path:
        return path
    from etils import epath
    local = os.path.join(tempfile.mkdtemp(prefix='ghostnetv2_weights_'), os.path.basename(path))
    epath.Path(path).copy(local)
    return local


def _is_variables_file(path: str) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(path, framework='numpy') as f:
            return (f.metadata() or {}).get('format') == FORMAT
    except Exception as e:   # safetensors raises its own error type for a bad header
        raise ConversionError(f'cannot read {path} as safetensors (truncated or not a checkpoint): '
                              f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


# ----------------------------------------------------------------------------- Flax variables files
def save_variables(path: str, variables: Mapping[str, Any], model_name: str,
                   overrides: Optional[Mapping[str, Any]] = None) -> str:
    """Write Flax variables to ``path`` (safetensors, flat keys ``params/blocks_0_0/...``, the
    model name and overrides in the metadata); returns ``path``."""
    from safetensors.numpy import save_file
    meta = {'model': model_name, 'overrides': json.dumps(dict(overrides or {}), sort_keys=True), 'format': FORMAT}
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flat(dict(variables)).items()}
    _atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))
    return path


def load_variables(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(variables, {'model': name, 'overrides': {...}}) from a file written by ``save_variables``."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ConversionError(f'no such file: {path}')
    try:
        with safe_open(path, framework='numpy') as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ConversionError(f'cannot read {path} as safetensors: {str(e).splitlines()[0] if str(e) else e!r}') from None
    if meta.get('format') != FORMAT:
        raise ConversionError(f'{path} is not a ghostnetv2_jax variables file (convert it first)')
    nested: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split('/')
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested, {'model': meta['model'], 'overrides': tuplify(json.loads(meta.get('overrides', '{}')))}


def save_state_dict(path: str, weights: Weights) -> str:
    """Write ``weights`` as the state_dict timm's ``create_model(model_name, **overrides)`` loads
    with ``strict=True``: ``.safetensors``, or a ``torch.save`` file for any other suffix."""
    as_torch = not path.endswith('.safetensors')
    sd = flax_to_torch(weights.variables, weights.model_name, as_torch=as_torch, **weights.overrides)
    if as_torch:
        import torch
        _atomic(path, lambda tmp: torch.save(sd, tmp))
    else:
        from safetensors.numpy import save_file
        _atomic(path, lambda tmp: save_file(sd, tmp))
    return path


def _atomic(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

