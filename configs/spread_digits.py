"""A small GhostNetV2 trained from scratch on the generated spread digits, on CPU: the task of the
attention sweeps (experiments/sweeps).

  python -m ghostnetv2_jax train --config configs/spread_digits.py --workdir /tmp/spread_digits

Each 96x96 canvas holds one digit 72 px tall among six 20-36 px fragments of other digits
(``ghostnetv2_jax.data.sources.spread_digits``): a patch a few strokes wide may belong to the digit
or to a fragment, so the class needs strokes far apart; every epoch draws new canvases, so the
network cannot memorise them. The network is GhostNetV2's table up to stride 16 (the first 11
bottlenecks, DFC in blocks 2-10) at width 0.5: at 96 px its last maps are 6x6, which DFC pools to
3x3, so its horizontal and vertical FCs have extent to aggregate in every attention block.

Its stability over seeds, its learning curves and the wall time of one run on a 2-core CPU are
measured in experiments/results/spread_attention (the ``dfc`` rows; results.md).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # default.py, from any cwd
import default  # noqa: E402
from ghostnetv2_jax.models.ghostnet import GHOSTNET_CFGS  # noqa: E402

STRIDE_16_CFGS = tuple(GHOSTNET_CFGS[:7])     # through the 14 px stage of the 224 px network


def get_config():
    config = default.get_config()
    config.model = 'ghostnetv2_100'
    config.model_overrides.cfgs = STRIDE_16_CFGS
    config.model_overrides.width = 0.5

    data = config.data
    data.dataset = 'spread_digits'
    data.image_size = 96               # the canvas: images pass through unresized
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

    config.drop_rate = 0.0
    config.batch_size = 64
    config.eval_batch_size = 500
    config.num_epochs = 10                # 128 steps each (8,192 new canvases)
    config.optimizer = 'sgd'
    config.nesterov = True
    config.learning_rate = 0.1
    config.lr_base_batch = 0
    config.weight_decay = 5e-5
    config.schedule = 'cosine'
    config.schedule_unit = 'step'
    config.warmup_epochs = 0              # from the first step: the first epoch then leaves chance
    config.warmup_lr = 0.01
    config.min_lr = 0.0
    config.lr_noise = ()
    config.label_smoothing = 0.1
    config.ema_decay = 0.0                # the weights themselves are evaluated
    config.best_metric = 'top1'
    config.eval_every_epochs = 1
    config.log_every_steps = 128
    config.keep_checkpoints = 1
    return config
