"""Optimizer and learning-rate schedule from a config, built from optax pieces.

The ImageNet recipe is timm's (the authors trained with timm's ``train.py``):

- ``rmsprop_tf``: timm's ``RMSpropTF``: the square average starts at 1, eps sits inside the
  square root, and the learning rate is folded into the momentum buffer. That is exactly
  ``optax.rmsprop(initial_scale=1, eps_in_sqrt=True, momentum=m)``: optax scales by the
  learning rate *before* its momentum trace, so the trace accumulates ``lr * g / rms``.
- weight decay is L2 added to the gradient before the optimizer (timm's non-decoupled
  ``weight_decay``), masked off biases, BatchNorm and every other parameter with ndim <= 1.
- the schedule is timm's ``StepLRScheduler`` with ``t_in_epochs=True``: the lr is constant within
  an epoch, warms up linearly per epoch from ``warmup_lr``, then decays by ``decay_rate`` every
  ``decay_epochs`` (counted from epoch 0, timm's ``warmup_prefix=False`` default), and inside the
  noise window each epoch's lr is multiplied by ``1 + noise``, the very number timm draws for that
  epoch (``torch.randn`` from a generator seeded with ``seed + epoch``), reproduced without torch
  (``TorchNormal``). The multipliers are precomputed on the host so the schedule stays jittable.

The whole update rule runs on the parameters flattened into one vector (``flatten_masked``): one
fused kernel per formula instead of one per parameter leaf (398 in GhostNetV2 1.0x), the idea of
torch's multi-tensor ``foreach`` optimizers. The optimizer state therefore holds flat vectors
(``nu``, ``trace``: one (num_params,) array each, laid out by ``FlatLayout``), not trees.
``create_optimizer(..., flat=False)`` is the same rule leaf by leaf, the reference the flat form
is tested against.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array], jax.Array]

OPTIMIZERS = ('rmsprop_tf', 'sgd', 'adamw')
SCHEDULES = ('step', 'cosine', 'constant')


def scaled_learning_rate(config) -> float:
    """The recipe's lr is for ``lr_base_batch`` images per update; scale it linearly with the
    global batch (timm's ``--lr`` was given for 8 x 128 = 1024). ``lr_base_batch=0`` disables."""
    if config.lr_base_batch and config.lr_base_batch > 0:
        return config.learning_rate * config.batch_size / config.lr_base_batch
    return config.learning_rate


class TorchNormal:
    """The numbers ``torch.randn(1, generator=g).item()`` returns, call after call, for
    ``g = torch.Generator().manual_seed(seed)`` on the CPU, computed without torch.

    torch's CPU generator is MT19937 seeded with the low 32 bits of the seed (``init_genrand``),
    which is how numpy's legacy ``RandomState(seed)`` seeds it too; ``randint(0, 2**32,
    dtype=uint32)`` returns its raw 32-bit outputs. A single-element ``randn`` is
    ``at::normal_distribution<double>``: two uniforms ``u = (random64 & (2**53 - 1)) * 2**-53``,
    each from two consecutive outputs ``(first << 32) | second``; Box-Muller
    ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1`` gives ``r cos(theta)``, and the generator
    keeps ``r sin(theta)`` as the next call's number. The value is then rounded to float32 (the
    tensor's dtype). ``math``'s functions are the C library's, as torch's are, so the draws are
    bit-identical to torch's (tested over thousands of seeds in ``tests/test_optim.py``).
    """

    def __init__(self, seed: int):
        self._words = np.random.RandomState(int(seed) % 2 ** 32)
        self._cached: Optional[float] = None

    def _uniform(self) -> float:
        first, second = (int(w) for w in self._words.randint(0, 2 ** 32, size=2, dtype=np.uint32))
        return (((first << 32) | second) & (2 ** 53 - 1)) * 2.0 ** -53

    def __call__(self) -> float:
        if self._cached is not None:
            value, self._cached = self._cached, None
        else:
            u1, u2 = self._uniform(), self._uniform()
            r, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
            value, self._cached = r * math.cos(theta), r * math.sin(theta)
        return float(np.float32(value))


def lr_noise(seed: int, pct: float = 0.67, std: float = 1.0) -> float:
    """timm's ``Scheduler._calculate_noise`` (normal noise) for the generator seed ``seed``: draws
    from ``TorchNormal(seed)`` until ``|noise| < pct``. timm accepts ``noise_std`` and does not
    use it; here the draw is multiplied by ``std`` before the test, so ``std=1`` (the recipe's)
    is timm's rule."""
    draw = TorchNormal(seed)
    while True:
        noise = std * draw()
        if abs(noise) < pct:
            return noise


def lr_noise_multipliers(num_epochs: int, noise_range: Optional[Sequence[float]], pct: float = 0.67,
                         std: float = 1.0, seed: int = 42) -> np.ndarray:
    """Per-epoch lr multipliers ``1 + noise`` (1 outside the window): timm's, number for number.

    ``noise_range`` holds fractions of ``num_epochs`` (timm's ``--lr-noise 0.42 0.9``): noise
    applies for ``lo * num_epochs <= epoch < hi * num_epochs``; one fraction means "from there
    on". Epoch ``t``'s noise is ``lr_noise(seed + t, pct, std)``, as timm's scheduler draws it
    (its ``noise_seed`` is train.py's ``--seed``, 42 by default).
    """
    mult = np.ones(max(int(num_epochs), 1), np.float64)
    if not noise_range:
        return mult
    lo = noise_range[0] * num_epochs
    hi = noise_range[1] * num_epochs if len(noise_range) > 1 else float('inf')
    for epoch in range(len(mult)):
        if lo <= epoch < hi:
            mult[epoch] = 1.0 + lr_noise(seed + epoch, pct, std)
    return mult


def _epoch_schedule(config, peak: float, num_epochs: int) -> Schedule:
    """lr as a function of the integer epoch (timm's ``_get_lr(t)``)."""
    warmup = int(config.warmup_epochs)
    if config.schedule == 'step':
        decay = optax.exponential_decay(peak, transition_steps=config.decay_epochs,
                                        decay_rate=config.decay_rate, staircase=True)
        if not config.warmup_prefix:   # timm's default: decay counted from epoch 0, not after warmup
            decay = (lambda d: lambda t: d(t + warmup))(decay)
    elif config.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(peak, decay_steps=max(num_epochs - warmup, 1),
                                            alpha=config.min_lr / peak if peak else 0.0)
    elif config.schedule == 'constant':
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f'unknown schedule {config.schedule!r}; expected one of {SCHEDULES}')
    if warmup <= 0:
        return decay
    # timm's form warmup_lr + t * step; optax.linear_schedule computes (init - end) * (1 - t) + end,
    # which in float32 loses the small warmup_lr to cancellation (1.006e-6 instead of 1e-6).
    slope = (peak - config.warmup_lr) / warmup
    ramp = lambda t: config.warmup_lr + t * slope
    return optax.join_schedules([ramp, decay], boundaries=[warmup])


def create_learning_rate_schedule(config, steps_per_epoch: int, num_epochs: int) -> Schedule:
    """Optimizer-update count -> lr. ``steps_per_epoch`` counts optimizer updates.

    With ``config.schedule_unit == 'epoch'`` (timm's ``t_in_epochs``) the lr changes at epoch
    boundaries only; with ``'step'`` the same curve is evaluated at fractional epochs.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')
    peak = scaled_learning_rate(config)
    per_epoch = _epoch_schedule(config, peak, num_epochs)
    noise = jnp.asarray(lr_noise_multipliers(num_epochs, tuple(config.lr_noise or ()), config.lr_noise_pct,
                                             config.lr_noise_std, config.lr_noise_seed), jnp.float32)
    if config.schedule_unit not in ('epoch', 'step'):
        raise ValueError(f"schedule_unit must be 'epoch' or 'step', got {config.schedule_unit!r}")

    def schedule(count):
        epoch = jnp.asarray(count) // steps_per_epoch
        t = epoch if config.schedule_unit == 'epoch' else jnp.asarray(count) / steps_per_epoch
        return per_epoch(t) * noise[jnp.clip(epoch, 0, noise.shape[0] - 1)]
    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True where timm applies weight decay: kernels (ndim > 1); not biases, BN, other 1-D."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


class FlatLayout:
    """Where each parameter leaf sits in the flat vector: the leaves ``mask`` selects first (in
    tree order), then the others, so "decayed" is the prefix ``index < num_masked``, a bound the
    update kernels compare against instead of reading a mask vector."""

    def __init__(self, tree: Any, mask: Optional[Callable[[Any], Any]]):
        leaves, self.treedef = jax.tree.flatten(tree)
        keep = self.treedef.flatten_up_to(mask(tree)) if mask is not None else [False] * len(leaves)
        self.order = [i for i, k in enumerate(keep) if k] + [i for i, k in enumerate(keep) if not k]
        self.shapes = [tuple(np.shape(x)) for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        self.num_masked = sum(int(np.prod(self.shapes[i])) for i, k in enumerate(keep) if k)

    def ravel(self, tree: Any) -> jax.Array:
        leaves = self.treedef.flatten_up_to(tree)
        return jnp.concatenate([jnp.ravel(leaves[i]) for i in self.order])

    def unravel(self, flat: jax.Array) -> Any:
        sizes = [int(np.prod(self.shapes[i])) for i in self.order]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
        leaves = [None] * len(self.order)
        for i, part in zip(self.order, parts):
            leaves[i] = part.reshape(self.shapes[i]).astype(self.dtypes[i])
        return jax.tree.unflatten(self.treedef, leaves)

    def masked(self, flat: jax.Array) -> jax.Array:
        """``flat`` with zeros outside the masked prefix (fused into its consumers)."""
        return jnp.where(jnp.arange(flat.shape[0]) < self.num_masked, flat, jnp.zeros_like(flat))


def flatten_masked(inner: optax.GradientTransformation,
                   mask: Optional[Callable[[Any], Any]] = weight_decay_mask) -> optax.GradientTransformation:
    """``inner`` on the parameter tree flattened into one vector, with weight decay where ``mask``.

    Like ``optax.flatten``: ``inner`` sees the gradient as one vector (``FlatLayout``: the
    leaves ``mask(params)`` selects first) and its updates are split back into the tree, so its
    state holds vectors. As ``params`` it sees the flat parameters with zeros outside the mask:
    in the rules built here ``params`` is read only by ``optax.add_decayed_weights`` (L2, or
    adamw's decoupled decay), which so decays exactly the masked-in leaves, as
    ``add_decayed_weights(mask=...)`` on the tree does. Every other formula is elementwise, so
    the updates are the per-leaf ones. ``mask`` returns a tree of Python bools from the shapes
    (it is applied to the updates as well as to the params).
    """
    def init(params):
        return inner.init(FlatLayout(params, mask).ravel(params))

    def update(updates, state, params=None):
        layout = FlatLayout(updates, mask)   # the mask reads shapes: the updates' are the params'
        flat_params = None if params is None else layout.masked(layout.ravel(params))
        flat, state = inner.update(layout.ravel(updates), state, flat_params)
        return layout.unravel(flat), state
    return optax.GradientTransformation(init, update)


def create_optimizer(config, schedule: Schedule, flat: bool = True) -> optax.GradientTransformation:
    """The full update rule: [clip] -> [L2 on the gradient] -> optimizer. (Gradient accumulation
    happens before it, in the train step, so one call here is one optimizer update.)

    ``flat`` (default): on the flattened parameter vector (``flatten_masked``; the clip norm is
    that vector's norm); ``flat=False``: the same rule leaf by leaf (its state is a tree per
    buffer), the reference the flat form is tested against.
    """
    mask = None if flat else weight_decay_mask   # flat: flatten_masked zeroes the masked-out params
    parts = []
    if config.grad_clip_norm and config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == 'rmsprop_tf':
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
        parts.append(optax.rmsprop(schedule, decay=config.rmsprop_decay, eps=config.opt_eps,
                                   initial_scale=1.0, eps_in_sqrt=True,
                                   momentum=config.momentum or None))
    elif config.optimizer == 'sgd':
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    elif config.optimizer == 'adamw':   # decoupled decay, as timm's adamw
        parts.append(optax.adamw(schedule, eps=config.opt_eps, weight_decay=config.weight_decay, mask=mask))
    else:
        raise ValueError(f'unknown optimizer {config.optimizer!r}; expected one of {OPTIMIZERS}')
    tx = optax.chain(*parts)
    return flatten_masked(tx) if flat else tx
