"""The train and eval steps, importable on their own (a notebook, the benchmark, the trainer)::

    from ghostnetv2_jax.train import optim, state, steps
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch, num_epochs)
    tx = optim.create_optimizer(config, schedule)
    train_state = state.create_state(variables, tx, jax.random.PRNGKey(0), use_ema=config.ema_decay > 0)
    train_step = steps.jit_train_step(steps.make_train_step(model, tx, schedule, config))
    train_state, metrics = train_step(train_state, {'images': images, 'labels': labels})

``jit_train_step`` is how the trainer compiles its step (the state donated, this project's
compiler options). The per-parameter work of a step runs on the parameters flattened into one
vector: the optimizer (``optim.flatten_masked``), the accumulated gradient and the gradient and
parameter norms, so each is a few fused kernels rather than one or more per parameter leaf.
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from ghostnetv2_jax import runtime, xla_options
from ghostnetv2_jax.train.state import TrainState, ema_decay_at, ema_update


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example CE against label-smoothed one-hot targets (timm's LabelSmoothingCrossEntropy)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        targets = optax.smooth_labels(targets, smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def masked_mean(values: jax.Array, mask) -> jax.Array:
    """The mean over the examples whose ``mask`` is 1 (all of them when ``mask`` is None): a
    batch row the input pipeline could not fill (mask 0) weighs nothing."""
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def global_norm(tree) -> jax.Array:
    """The L2 norm of every leaf of ``tree`` together, as one reduction over the flattened tree."""
    flat = ravel_pytree(tree)[0]
    return jnp.sqrt(jnp.sum(jnp.square(flat)))


DISTILLATION_LOSSES = ('soft_ce', 'kl')


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                      kind: str = 'soft_ce') -> jax.Array:
    """Per-example knowledge-distillation loss, scaled by ``temperature**2`` (Hinton et al.).

    'soft_ce': the cross-entropy of the student's against the teacher's softened distribution,
    ``-sum p_t log p_s`` (at temperature 1, the authors' GhostNetV3 train.py). 'kl': the KL
    divergence ``sum p_t (log p_t - log p_s)``, the same gradients with 0 at a perfect match.
    """
    if kind not in DISTILLATION_LOSSES:
        raise ValueError(f'distillation loss must be one of {DISTILLATION_LOSSES}, got {kind!r}')
    log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    p_teacher = jnp.exp(log_p_teacher)
    per_example = -jnp.sum(p_teacher * log_p_student, axis=-1)
    if kind == 'kl':
        per_example = per_example + jnp.sum(p_teacher * log_p_teacher, axis=-1)
    return per_example * temperature ** 2


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable, config,
                    teacher=None) -> Callable:
    """(state, batch) -> (state, metrics). ``batch`` leaves are (B, ...) or, with gradient
    accumulation, (k, B / k, ...); an optional ``mask`` (1: a real example) weighs the loss.
    ``tx`` is any optax transformation over the parameter tree (``optim.create_optimizer`` gives
    the recipe's, on the flattened parameters); its state is ``state.opt_state``
    (``state.create_state``). Uses ``config.grad_accum_steps``, ``label_smoothing``,
    ``ema_decay`` and ``ema_schedule`` (``state.ema_decay_at``).

    With a ``teacher`` model the step is (state, batch, teacher_variables) -> (state, metrics):
    the teacher runs in eval mode on the same images and the loss is
    ``ce_weight * CE + kd_weight * distillation_loss`` (``config.distill``), both reported.
    """
    k = config.grad_accum_steps
    distill = config.distill if teacher is not None else None

    def micro_grads(params, batch_stats, images, labels, mask, rng, teacher_variables):
        if distill is not None:
            teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_variables, images, train=False))

        def loss_fn(p):
            logits, new_vars = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                                           mutable=['batch_stats'], rngs={'dropout': rng})
            ce = masked_mean(cross_entropy(logits, labels, config.label_smoothing), mask)
            terms = {}
            if distill is None:
                loss = ce
            else:
                kd = masked_mean(distillation_loss(logits, teacher_logits, distill.temperature, distill.loss), mask)
                loss = distill.ce_weight * ce + distill.kd_weight * kd
                terms = {'loss_ce': ce, 'loss_kd': kd}
            return loss, (logits, new_vars['batch_stats'], terms)
        (loss, (logits, new_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        top1 = masked_mean(jnp.argmax(logits, -1) == labels, mask)
        return grads, new_stats, {'loss': loss, 'top1': top1, **terms}

    def train_step(state: TrainState, batch: Dict[str, jax.Array], teacher_variables=None):
        rng = jax.random.fold_in(state.rng, state.step)
        mask = batch.get('mask')
        if k == 1:
            grads, batch_stats, losses = micro_grads(state.params, state.batch_stats, batch['images'],
                                                     batch['labels'], mask, rng, teacher_variables)
        else:
            # The sum of the micro-batches' gradients as one flat vector: one add per micro-batch.
            zeros, unravel = ravel_pytree(jax.tree.map(jnp.zeros_like, state.params))

            def body(carry, xs):
                acc, stats = carry
                i, images, labels, mask = xs
                g, stats, losses = micro_grads(state.params, stats, images, labels, mask,
                                               jax.random.fold_in(rng, i), teacher_variables)
                return (acc + ravel_pytree(g)[0], stats), losses
            (grads, batch_stats), losses = jax.lax.scan(
                body, (zeros, state.batch_stats), (jnp.arange(k), batch['images'], batch['labels'], mask))
            grads = unravel(grads / k)   # mean over the k equal micro-batches
            losses = jax.tree.map(jnp.mean, losses)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=batch_stats, opt_state=opt_state)
        new_state = ema_update(new_state, ema_decay_at(new_state.step, config.ema_decay,
                                                       getattr(config, 'ema_schedule', 'fixed')))
        # param_norm doubles as the check that this update left the weights finite.
        metrics = {**losses, 'grad_norm': global_norm(grads),
                   'param_norm': global_norm(new_state.params), 'lr': schedule(state.step)}
        if mask is not None:
            metrics['skipped'] = jnp.sum(1.0 - mask)   # examples the input pipeline left out
        return new_state, metrics
    return train_step


def jit_train_step(train_step: Callable, *, project_options: bool = True, **jit_kwargs) -> Callable:
    """``train_step`` jitted as the trainer runs it: the state (argument 0) donated, so the new
    state is written over the old one, and compiled with this project's options for a train step
    (``xla_options``; ``project_options=False``: XLA's defaults). ``jit_kwargs`` go to
    ``jax.jit`` (the trainer passes ``out_shardings``)."""
    options = xla_options.compiler_options(train=True) if project_options else None
    return jax.jit(train_step, donate_argnums=0, compiler_options=options, **jit_kwargs)


def make_eval_step(model, chunk: runtime.Chunk = None) -> Callable:
    """(variables, batch) -> sums over the real (mask 1) examples of the global batch. ``chunk``:
    run the network over chunks of the batch (``ghostnetv2_jax.runtime``; for one device)."""
    predict = runtime.predict_fn(model, chunk)

    def eval_step(variables, batch):
        logits = predict(variables, batch['images'])
        labels, mask = batch['labels'], batch['mask']
        k = min(5, logits.shape[-1])
        top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
        return {'loss': jnp.sum(cross_entropy(logits, labels, 0.0) * mask),
                'top1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
                'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}
    return eval_step
