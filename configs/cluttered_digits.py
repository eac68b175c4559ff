"""GhostNetV2 1.0x trained from scratch on the embedded cluttered digits, on CPU.

  python -m ghostnetv2_jax train --config configs/cluttered_digits.py --workdir /tmp/cluttered

The task where attention variants can differ: the plain digits (configs/demo.py) saturate near
98% for every variant. Each 40x40 example holds one 16x16 digit at a random spot among six 6-8 px
fragments of other digits (``ghostnetv2_jax.data.sources.cluttered_digits``), so the class is
decided by the whole digit, not by a local patch of strokes.

Expected: 30-60% validation top-1 after 12 epochs (1,068 steps), in about 6-9 minutes on one
core of a 2-core CPU, compilation included; far from saturated, and strongly seed-dependent. The
attention sweep (2 seeds per variant; ``git show ffa0e84:experiments/results/attention/results.md``)
measured DFC at 45.1 +- 15.0% and no attention at 53.6 +- 8.5%: the loss stays near chance for
the first epochs and the epoch at which it takes off varies with the seed, so seeds of one variant
differ by 11-21 points. Comparing variants on this task needs more epochs and seeds than the demo
scale gives (e.g. ``--config.num_epochs=30`` and five seeds).

The whole canvas is the input (a crop could cut the digit out; the placement already translates
it) and nothing is flipped; otherwise the demo's recipe, for more steps.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # default.py, from any cwd
import default  # noqa: E402


def get_config():
    config = default.get_config()
    config.model = 'ghostnetv2_100'

    data = config.data
    data.dataset = 'cluttered_digits'
    data.image_size = 40               # the canvas: images pass through unresized
    data.crop_pct = 1.0
    data.interpolation = 'bilinear'
    data.train_interpolation = 'bilinear'
    data.scale = (1.0, 1.0)            # the whole canvas: a crop could cut the digit out
    data.ratio = (1.0, 1.0)
    data.hflip = 0.0                   # mirrored digits are other symbols
    data.randaugment = ''
    data.color_jitter = 0.0
    data.reprob = 0.0
    data.mean = (0.5, 0.5, 0.5)
    data.std = (0.5, 0.5, 0.5)

    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 12                # 89 steps each (5,752 examples)
    config.optimizer = 'sgd'
    config.nesterov = True
    config.learning_rate = 0.1
    config.lr_base_batch = 0
    config.weight_decay = 5e-5
    config.schedule = 'cosine'
    config.schedule_unit = 'step'
    config.warmup_epochs = 1
    config.warmup_lr = 0.01
    config.min_lr = 0.0
    config.lr_noise = ()
    config.ema_decay = 0.95               # a short run: average the last ~20 steps
    config.eval_every_epochs = 12         # once, at the end
    config.log_every_steps = 178
    config.keep_checkpoints = 1
    return config
