"""Every variant of the experiment sweeps trains: each attention variant (experiments/sweeps/
attention.py) and each DFC ablation switch (experiments/sweeps/dfc_ablations.py), built from the
sweep's own overrides, takes optimizer steps with the trainer's train step and its loss falls.

The model is the tiny config's GhostNetV2 with three bottlenecks instead of one, DFC on all three
(the released model's "every block" at this size); the block-subset switches keep their meaning
here: early and late (Table 7) one block each, and the SE-free blocks (``se_unstacked``) the two
without their own SE. A fixed batch is fitted, so the loss must
fall within a few steps whenever gradients reach every parameter the variant adds.
"""
import pathlib
import sys

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # experiments/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from experiments import sweep  # noqa: E402
from ghostnetv2_jax.train import optim, state as state_lib, steps, trainer  # noqa: E402

TINY = str(REPO / 'configs' / 'tiny.py')
SWEEPS = {name: sweep.load_sweep(str(REPO / 'experiments' / 'sweeps' / f'{name}.py'))
          for name in ('attention', 'dfc_ablations')}
# kernel, expansion, out, SE ratio, stride: three bottlenecks, 16x16 input -> 8, 8, 4 px maps.
THREE_BLOCKS = (((3, 16, 16, 0.0, 1),), ((3, 32, 24, 0.25, 2),), ((5, 48, 24, 0.0, 1),))
ALL_BLOCKS = (0, 1, 2)
# The sweeps' block subsets of configs/spread_digits.py's 11 blocks (DFC in 2-10; own SE in 3, 4,
# 9, 10), as blocks of the three here (own SE in block 1).
BLOCK_SUBSETS = {(2, 3, 4): (0,), (5, 6, 7, 8, 9, 10): (2,), (2, 5, 6, 7, 8): (0, 2)}
STEPS = 8
BATCH = 16


def _distinct_runs():
    """(sweep, variant) of every distinct model: the ablation sweep's 'released' is the attention
    sweep's 'dfc'."""
    seen, runs = set(), []
    for name, s in SWEEPS.items():
        for variant, overrides in s.variants.items():
            if sweep.to_json(overrides) not in seen:
                seen.add(sweep.to_json(overrides))
                runs.append((name, variant))
    return runs


RUNS = _distinct_runs()


def test_every_sweep_variant_is_covered():
    assert {v for _, v in RUNS} >= {'dfc', 'se', 'se_unstacked', 'cbam', 'coord', 'none', 'kernel_3',
                                    'kernel_7', 'blocks_early', 'blocks_late', 'ghost2',
                                    'gate_after_upsample', 'max_pool', 'bilinear', 'bicubic'}


def _config(sweep_name: str, variant: str):
    s = SWEEPS[sweep_name]
    run = sweep.Run(variant, 0, s.variants[variant])
    config = sweep.build_config(TINY, {'model_overrides.cfgs': THREE_BLOCKS,
                                       'model_overrides.attention_blocks': ALL_BLOCKS}, run)
    config.unlock()
    blocks = tuple(config.model_overrides.attention_blocks)
    config.model_overrides.attention_blocks = BLOCK_SUBSETS.get(blocks, blocks)
    config.label_smoothing = 0.0
    return config


@pytest.mark.parametrize('sweep_name,variant', RUNS, ids=[f'{n}:{v}' for n, v in RUNS])
def test_variant_trains_and_its_loss_falls(sweep_name, variant):
    config = _config(sweep_name, variant)
    overrides = SWEEPS[sweep_name].variants[variant]
    model = trainer.build_model(config, num_classes=10)
    for key, value in overrides.items():   # the variant's own switch reached the model
        field = key.split('.')[-1]
        if field != 'attention_blocks':
            assert getattr(model, field) == sweep.normalize(value), (field, getattr(model, field))
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = {'images': rng.standard_normal((BATCH, size, size, 3)).astype(np.float32),
             'labels': rng.integers(0, 10, BATCH).astype(np.int32)}
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=STEPS, num_epochs=1)
    tx = optim.create_optimizer(config, schedule)
    variables = state_lib.init_variables(model, jax.random.PRNGKey(0), size)
    train_state = state_lib.create_state(variables, tx, jax.random.PRNGKey(1), use_ema=False)
    # the trainer's step function, donating its state; at LLVM -O0 rather than the project's
    # options (the same operations, half the compile; xla_options' own tests check those)
    train_step = jax.jit(steps.make_train_step(model, tx, schedule, config), donate_argnums=0,
                         compiler_options={'xla_backend_optimization_level': 0})
    losses = []
    for _ in range(STEPS):
        train_state, metrics = train_step(train_state, batch)
        losses.append(float(metrics['loss']))
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-2:]) < 0.95 * losses[0], losses
