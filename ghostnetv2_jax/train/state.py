"""The train state: everything a resumed run needs, as one pytree.

``step`` counts optimizer updates (with ``grad_accum_steps = k`` one update reads k micro-batches,
so the data position is ``k * step``). ``rng`` is the run's base key: the key of a step is ``fold_in(rng, step)``,
so the random stream depends on the step only and survives a restart unchanged.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any          # None when the EMA is off
    ema_batch_stats: Any
    rng: jax.Array           # raw uint32 key data (orbax-friendly)

    def variables(self, ema: bool = False) -> dict:
        """``{'params', 'batch_stats'}`` for ``model.apply`` (the EMA copy with ``ema``)."""
        if ema:
            return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}
        return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_size) -> dict:
    """Fresh ``{'params', 'batch_stats'}``; the input size (N or (H, W)) only shapes the trace."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    variables = model.init({'params': rng}, jnp.zeros((1, h, w, 3), jnp.float32), train=False)
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def create_state(variables: dict, tx: optax.GradientTransformation, rng: jax.Array,
                 use_ema: bool) -> TrainState:
    """A step-0 state around ``variables``; the EMA starts as a copy (timm's ModelEma)."""
    params, batch_stats = variables['params'], variables['batch_stats']
    copy = lambda t: jax.tree.map(jnp.copy, t)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params),
                      ema_params=copy(params) if use_ema else None,
                      ema_batch_stats=copy(batch_stats) if use_ema else None,
                      rng=jnp.asarray(rng, jnp.uint32))


EMA_SCHEDULES = ('fixed', 'timm', 'timm_warmup')


def ema_decay_at(updates, decay: float, schedule: str = 'fixed'):
    """The EMA decay of the update after which ``updates`` updates have been made (1: the first).

    'fixed': ``decay`` from the first update on (timm's ModelEma / ModelEmaV2, the authors'
    train.py). 'timm': timm's ModelEmaV3 as current train.py drives it (``update(model,
    step=num_updates)``): decay 0 at the first update, so the EMA starts as a copy of the
    weights, then ``decay``. 'timm_warmup': the same with ``--model-ema-warmup``, the decay rising
    as ``1 - (1 + n) ** (-2/3)`` (n = updates - 1) up to ``decay``.
    """
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f'ema_schedule must be one of {EMA_SCHEDULES}, got {schedule!r}')
    if schedule == 'fixed':
        return decay
    n = jnp.asarray(updates, jnp.float32) - 1.0
    ramp = jnp.minimum(1.0 - (1.0 + n) ** (-2.0 / 3.0), decay) if schedule == 'timm_warmup' else decay
    return jnp.where(n <= 0, 0.0, ramp)


def ema_update(state: TrainState, decay: float) -> TrainState:
    """``ema = decay * ema + (1 - decay) * model`` for params and BN statistics alike (timm's
    ModelEma averages the whole state_dict), once per optimizer update."""
    if state.ema_params is None:
        return state
    step_size = 1.0 - decay
    return state.replace(
        ema_params=optax.incremental_update(state.params, state.ema_params, step_size),
        ema_batch_stats=optax.incremental_update(state.batch_stats, state.ema_batch_stats, step_size))


def _flat(tree: Any) -> dict:
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def local_copy(path: str) -> str:
    """Remote files (gs://...) are copied to a local temporary file: the readers want a path."""
    if '://' not in path:
        return path
    import tempfile
    from etils import epath
    local = os.path.join(tempfile.mkdtemp(prefix='init_from_'), os.path.basename(path))
    epath.Path(path).copy(local)
    return local


def _read_pretrained(path: str, model_name: str, overrides: dict) -> dict:
    from ghostnetv2_jax import convert
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(path, framework='numpy') as f:
                ours = (f.metadata() or {}).get('format') == 'ghostnetv2_jax.variables/1'
        except Exception as e:
            raise convert.ConversionError(f'cannot read {path} as safetensors: {e}') from None
        if ours:
            return convert.load_variables(path)[0]
    sd = convert.load_state_dict(path)   # PyTorch file, or a timm safetensors state_dict
    classes = sd['classifier.weight'].shape[0] if 'classifier.weight' in sd else 0
    return convert.torch_to_flax(sd, model_name, **{**overrides, 'num_classes': classes})


def load_pretrained(path: str, model_name: str, overrides: dict, fresh: dict,
                    keep_fresh_head: bool = True, role: str = 'init_from') -> dict:
    """Variables from a converted (``convert.save_variables``) or PyTorch checkpoint, fitted to
    ``fresh`` (the new model's initial variables): every leaf must exist with the same shape,
    except the classifier, which keeps its fresh initialisation when the class count differs
    (``keep_fresh_head=False``: an error, as for a distillation teacher). ``role`` names the
    setting the file came from in errors.

    ``overrides`` are the architecture overrides (cfgs, width, ...), used to read PyTorch files.
    """
    from ghostnetv2_jax.convert import ConversionError
    if not os.path.exists(path) and '://' not in path:
        raise ConversionError(f'{role}: no such checkpoint file: {path}')
    loaded = _read_pretrained(local_copy(path), model_name, overrides)
    want, have = _flat(fresh), _flat({k: loaded.get(k, {}) for k in ('params', 'batch_stats')})
    is_head = lambda k: k.startswith('params/classifier/')
    head_differs = any(is_head(k) and k in have and have[k].shape != v.shape for k, v in want.items())
    problems = []
    missing = sorted(k for k in want if k not in have and not (head_differs and is_head(k)))
    unexpected = sorted(k for k in have if k not in want)
    shapes = sorted(f'{k} {tuple(have[k].shape)} vs {tuple(want[k].shape)}' for k in want
                    if k in have and not is_head(k) and have[k].shape != want[k].shape)
    if missing:
        problems.append(f'missing {missing[:5]}{" ..." if len(missing) > 5 else ""}')
    if unexpected:
        problems.append(f'unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}')
    if shapes:
        problems.append(f'shape mismatch {shapes[:3]}{" ..." if len(shapes) > 3 else ""}')
    if head_differs and not keep_fresh_head:
        head = next(k for k in want if is_head(k) and k in have and have[k].shape != want[k].shape)
        problems.append(f'classifier {head} {tuple(have[head].shape)} vs {tuple(want[head].shape)}')
    if problems:
        raise ConversionError(f'{role} {path} does not fit {model_name}: ' + '; '.join(problems))
    merged = {k: (want[k] if head_differs and is_head(k) else jnp.asarray(have[k], want[k].dtype)) for k in want}
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), [merged[k] for k in _flat(fresh)])
