"""Optimizer and lr schedule: the recipe's formulas, timm's RMSpropTF and StepLRScheduler."""
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ghostnetv2_jax.train import optim

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
IMAGENET_TRAIN = 1281167
STEPS_PER_EPOCH = IMAGENET_TRAIN // 1024          # 1251 optimizer updates per epoch


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f'cfg_{name}', CONFIGS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope='module')
def recipe():
    return load_config('imagenet_ghostnetv2_100')


@pytest.fixture(scope='module')
def schedule(recipe):
    return jax.jit(optim.create_learning_rate_schedule(recipe, STEPS_PER_EPOCH, recipe.num_epochs))


def lr_at(schedule, epoch: int, offset: int = 0) -> float:
    return float(schedule(jnp.int32(epoch * STEPS_PER_EPOCH + offset)))


def recipe_lr(epoch: int) -> float:
    """The authors' schedule written out: timm StepLRScheduler, warmup_t=3 from 1e-6, then
    0.064 * 0.973 ** (epoch // 2.4) (decay counted from epoch 0), before noise."""
    if epoch < 3:
        return 1e-6 + epoch * (0.064 - 1e-6) / 3
    return 0.064 * 0.973 ** (epoch // 2.4)


def test_recipe_config_matches_the_authors_command(recipe):
    assert (recipe.batch_size, recipe.num_epochs, recipe.learning_rate) == (1024, 450, 0.064)
    assert (recipe.optimizer, recipe.rmsprop_decay, recipe.opt_eps, recipe.momentum) == ('rmsprop_tf', 0.9, 1e-3, 0.9)
    assert (recipe.warmup_epochs, recipe.warmup_lr, recipe.decay_epochs, recipe.decay_rate) == (3, 1e-6, 2.4, 0.973)
    assert tuple(recipe.lr_noise) == (0.42, 0.9) and recipe.lr_noise_pct == 0.67 and recipe.lr_noise_std == 1.0
    assert (recipe.weight_decay, recipe.ema_decay, recipe.label_smoothing, recipe.drop_rate) == (1e-5, 0.9999, 0.1, 0.2)
    d = recipe.data
    assert (d.randaugment, d.reprob, d.remode, d.color_jitter, d.train_interpolation) == (
        'rand-m9-mstd0.5', 0.2, 'pixel', 0.4, 'random')
    assert (d.image_size, d.crop_pct, d.interpolation) == (224, 0.875, 'bicubic')


def test_warmup_is_linear_per_epoch_from_warmup_lr(schedule):
    assert lr_at(schedule, 0) == pytest.approx(1e-6, rel=1e-5)
    assert lr_at(schedule, 0, STEPS_PER_EPOCH - 1) == pytest.approx(1e-6, rel=1e-5)   # constant within an epoch
    for epoch in (1, 2):
        assert lr_at(schedule, epoch) == pytest.approx(recipe_lr(epoch), rel=1e-6)


@pytest.mark.parametrize('epoch', [3, 4, 5, 12, 100, 188, 405, 449])
def test_step_decay_outside_the_noise_window(schedule, epoch):
    assert lr_at(schedule, epoch) == pytest.approx(recipe_lr(epoch), rel=1e-5)
    assert lr_at(schedule, epoch, STEPS_PER_EPOCH - 1) == pytest.approx(recipe_lr(epoch), rel=1e-5)


def test_noise_only_between_42_and_90_percent_of_the_epochs(schedule):
    mult = optim.lr_noise_multipliers(450, (0.42, 0.9), pct=0.67, seed=42)
    window = np.arange(450)[(mult != 1.0)]
    assert window.min() == 189 and window.max() == 404            # 0.42 * 450 <= e < 0.9 * 450
    assert len(window) == 405 - 189
    assert np.all(np.abs(mult - 1.0) < 0.67)
    for epoch in (189, 250, 404):
        assert lr_at(schedule, epoch) == pytest.approx(recipe_lr(epoch) * mult[epoch], rel=1e-5)
    # seeded per epoch: the same numbers every time, others with another seed
    np.testing.assert_array_equal(mult, optim.lr_noise_multipliers(450, (0.42, 0.9), seed=42))
    assert not np.array_equal(mult, optim.lr_noise_multipliers(450, (0.42, 0.9), seed=43))


def test_schedule_matches_timm_step_scheduler_without_noise(recipe):
    torch = pytest.importorskip('torch')
    from timm.scheduler.step_lr import StepLRScheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.learning_rate)
    timm_sched = StepLRScheduler(opt, decay_t=2.4, decay_rate=0.973, warmup_t=3, warmup_lr_init=1e-6,
                                 warmup_prefix=False, t_in_epochs=True)
    config = recipe.copy_and_resolve_references()
    config.lr_noise = ()
    ours = jax.jit(optim.create_learning_rate_schedule(config, STEPS_PER_EPOCH, 450))
    epochs = np.arange(450)
    got = np.asarray(jax.vmap(ours)(jnp.asarray(epochs * STEPS_PER_EPOCH, jnp.int32)))
    want = []
    for epoch in epochs:
        timm_sched.step(int(epoch))
        want.append(opt.param_groups[0]['lr'])
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5)


def test_torch_normal_draws_torch_randn_bit_for_bit():
    """``optim.TorchNormal(seed)`` returns what ``torch.randn(1, generator=g).item()`` returns
    after ``g.manual_seed(seed)``, six calls in a row (so the cached ``r sin(theta)`` of every
    other call too), for 2000 consecutive seeds and seeds past 32 bits."""
    torch = pytest.importorskip('torch')
    seeds = list(range(2000)) + [2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 7, 2 ** 40 + 3, 2 ** 63 + 11]
    mismatched = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        want = [torch.randn(1, generator=g).item() for _ in range(6)]
        draw = optim.TorchNormal(seed)
        if [draw() for _ in range(6)] != want:
            mismatched.append(seed)
    assert not mismatched, f'{len(mismatched)} seeds differ, first {mismatched[:5]}'


@pytest.mark.parametrize('pct', [0.67, 0.05])
def test_lr_noise_is_timm_schedulers_noise(pct):
    """timm's ``Scheduler._calculate_noise``, resampling included: at pct 0.05 most epochs draw
    many times (about 1 in 25 draws is kept)."""
    torch = pytest.importorskip('torch')
    from timm.scheduler.step_lr import StepLRScheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = StepLRScheduler(opt, decay_t=1, noise_range_t=(0, 500), noise_pct=pct, noise_seed=42)
    for t in range(500):
        assert optim.lr_noise(42 + t, pct) == sched._calculate_noise(t), t


def test_recipe_schedule_with_lr_noise_matches_timm_create_scheduler_v2(recipe):
    """The whole 450-epoch recipe schedule, noise window included, equals the lr timm's
    ``create_scheduler_v2`` sets for each epoch the way train.py steps it (``step(epoch)``)."""
    torch = pytest.importorskip('torch')
    from timm.scheduler import create_scheduler_v2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.learning_rate)
    timm_sched, num_epochs = create_scheduler_v2(
        opt, sched='step', num_epochs=recipe.num_epochs, decay_epochs=recipe.decay_epochs,
        decay_rate=recipe.decay_rate, warmup_lr=recipe.warmup_lr, warmup_epochs=recipe.warmup_epochs,
        warmup_prefix=recipe.warmup_prefix, noise=list(recipe.lr_noise), noise_pct=recipe.lr_noise_pct,
        noise_std=recipe.lr_noise_std, noise_seed=recipe.lr_noise_seed)
    assert num_epochs == 450
    want = []
    for epoch in range(num_epochs):
        timm_sched.step(epoch)
        want.append(opt.param_groups[0]['lr'])
    ours = jax.jit(jax.vmap(optim.create_learning_rate_schedule(recipe, STEPS_PER_EPOCH, recipe.num_epochs)))
    epochs = np.arange(num_epochs)
    for offset in (0, STEPS_PER_EPOCH - 1):   # first and last update of every epoch
        got = np.asarray(ours(jnp.asarray(epochs * STEPS_PER_EPOCH + offset, jnp.int32)))
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5)
    noisy = np.flatnonzero(np.abs(np.asarray(want) / [recipe_lr(e) for e in epochs] - 1) > 1e-9)
    assert (noisy.min(), noisy.max()) == (189, 404)


def test_lr_scales_linearly_with_the_global_batch(recipe):
    config = recipe.copy_and_resolve_references()
    config.batch_size = 256
    assert optim.scaled_learning_rate(config) == pytest.approx(0.016)
    config.lr_base_batch = 0
    assert optim.scaled_learning_rate(config) == pytest.approx(0.064)


def test_weight_decay_mask_skips_biases_and_batchnorm():
    params = {'conv': {'kernel': jnp.ones((3, 3, 4, 8)), 'bias': jnp.ones(8)},
              'bn': {'scale': jnp.ones(8), 'bias': jnp.ones(8)}, 'fc': {'kernel': jnp.ones((8, 2))}}
    mask = optim.weight_decay_mask(params)
    assert mask == {'conv': {'kernel': True, 'bias': False}, 'bn': {'scale': False, 'bias': False},
                    'fc': {'kernel': True}}


def test_rmsprop_tf_matches_timm(recipe):
    """Five updates with L2 weight decay on kernels only equal timm's RMSpropTF with timm's
    no-decay parameter groups (square average starts at 1, eps in the sqrt, lr in momentum)."""
    torch = pytest.importorskip('torch')
    from timm.optim import RMSpropTF
    rng = np.random.default_rng(0)
    init = {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32), 'bias': rng.normal(size=4).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()} for _ in range(5)]
    lr, wd = 0.01, 0.05                                           # wd large enough to matter

    config = recipe.copy_and_resolve_references()
    config.weight_decay = wd
    tx = optim.create_optimizer(config, optax.constant_schedule(lr))
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)

    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    topt = RMSpropTF([{'params': [tp['kernel']], 'weight_decay': wd}, {'params': [tp['bias']], 'weight_decay': 0.0}],
                     lr=lr, alpha=0.9, eps=1e-3, momentum=0.9)
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        topt.step()
    chex.assert_trees_all_close(params, {k: p.detach().numpy() for k, p in tp.items()}, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_or_schedule_is_a_clear_error(recipe):
    config = recipe.copy_and_resolve_references()
    config.optimizer = 'lamb'
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optim.create_optimizer(config, optax.constant_schedule(0.1))
    config = recipe.copy_and_resolve_references()
    config.schedule = 'poly'
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        optim.create_learning_rate_schedule(config, 10, 10)


def _toy_params(rng):
    """A conv kernel and bias, a BN scale and a dense kernel: decayed and undecayed leaves mixed."""
    shapes = {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'bn': {'scale': (4,)}, 'fc': {'kernel': (4, 3)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _run(tx, params, grads, state=None):
    state = tx.init(params) if state is None else state
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize('optimizer', optim.OPTIMIZERS)
@pytest.mark.parametrize('clip', [0.0, 0.5])
def test_flat_optimizer_gives_the_per_leaf_updates(recipe, optimizer, clip):
    """The update rule on the flattened parameter vector (the default) equals the same rule leaf
    by leaf, weight-decay mask included; its state is one vector per buffer."""
    rng = np.random.default_rng(1)
    params = _toy_params(rng)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(4)]
    config = recipe.copy_and_resolve_references()
    config.optimizer, config.grad_clip_norm, config.weight_decay = optimizer, clip, 0.05
    flat_tx = optim.create_optimizer(config, optax.constant_schedule(0.01))
    tree_tx = optim.create_optimizer(config, optax.constant_schedule(0.01), flat=False)
    flat_params, flat_state = _run(flat_tx, params, grads)
    tree_params, _ = _run(tree_tx, params, grads)
    chex.assert_trees_all_close(flat_params, tree_params, rtol=1e-6, atol=1e-7)
    n = sum(p.size for p in jax.tree.leaves(params))
    assert {leaf.shape for leaf in jax.tree.leaves(flat_state)} <= {(), (n,)}


def test_flat_layout_puts_the_decayed_leaves_first():
    params = _toy_params(np.random.default_rng(0))
    layout = optim.FlatLayout(params, optim.weight_decay_mask)
    assert layout.num_masked == 3 * 3 * 2 * 4 + 4 * 3
    flat = layout.ravel(params)
    np.testing.assert_array_equal(flat[:72], params['conv']['kernel'].ravel())
    np.testing.assert_array_equal(flat[72:84], params['fc']['kernel'].ravel())
    chex.assert_trees_all_equal(layout.unravel(flat), params)
    masked = layout.masked(flat)
    np.testing.assert_array_equal(masked[:84], flat[:84])
    assert not np.any(masked[84:])


def test_weight_decay_mask_matches_timm_filter_bias_and_bn():
    """timm's create_optimizer_v2(filter_bias_and_bn=True) decays the same parameters (compared
    by size, the layouts differ): every conv and linear weight, no bias or BatchNorm."""
    pytest.importorskip('torch')
    import timm
    from timm.optim._param_groups import param_groups_weight_decay
    from ghostnetv2_jax.models.registry import create_model
    from ghostnetv2_jax.train.state import init_variables
    model = create_model('ghostnetv2_100', num_classes=1000)
    params = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), 224))['params']
    leaves, mask = jax.tree.leaves(params), jax.tree.leaves(optim.weight_decay_mask(params))
    ours = {d: sorted(p.size for p, m in zip(leaves, mask) if m == d) for d in (True, False)}
    groups = param_groups_weight_decay(timm.create_model('ghostnetv2_100'), 1e-5)
    theirs = {g['weight_decay'] > 0: sorted(p.numel() for p in g['params']) for g in groups}
    assert ours == theirs
