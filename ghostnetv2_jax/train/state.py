"""The train state: everything a resumed run needs, as one pytree.

``step`` counts optimizer updates (with ``grad_accum_steps = k`` one update reads k micro-batches,
so the data position is ``k * step``). ``rng`` is the run's base key: the key of a step is ``fold_in(rng, step)``,
so the random stream depends on the step only and survives a restart unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ghostnetv2_jax.models.registry import create_model
from ghostnetv2_jax.train import optim


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


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def tuplify(v: Any) -> Any:
    """Lists from configs/JSON -> tuples (architecture tables are compared and hashed as tuples)."""
    if isinstance(v, (list, tuple)):
        return tuple(tuplify(x) for x in v)
    if isinstance(v, dict):
        return {k: tuplify(x) for k, x in v.items()}
    return v


def architecture_overrides(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The set ``config.model_overrides`` as plain Python (what, with the name, defines the
    weights); unset (None) fields keep the registered model's values."""
    return {k: v for k, v in tuplify(config.model_overrides.to_dict()).items() if v is not None}


def build_model(config: ml_collections.ConfigDict, num_classes: int, dtype: Optional[str] = None) -> nn.Module:
    """The network ``config`` trains (``dtype``: the compute dtype, default ``config.dtype``)."""
    dtype = config.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f'config.dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
    return create_model(config.model, num_classes=num_classes, drop_rate=config.drop_rate,
                        dtype=DTYPES[dtype], **architecture_overrides(config))


def abstract_state(config: ml_collections.ConfigDict, model: nn.Module, sharding=None) -> TrainState:
    """The shapes (placed with ``sharding`` where given) of the train state ``config`` trains
    ``model`` with: what a checkpoint of that run is restored into. Nothing is computed; the
    optimizer only gives the state its structure (its schedule is never called)."""
    tx = optim.create_optimizer(config, lambda count: 0.0)
    rng = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: create_state(init_variables(model, rng, config.data.image_size), tx, rng,
                                                 config.ema_decay > 0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


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
