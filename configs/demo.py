"""The demo: GhostNetV2 1.0x (the full network) trained from scratch on the embedded digits, on CPU.

  python -m ghostnetv2_jax train --config configs/demo.py --workdir /tmp/ghostnetv2_demo

Expected: >= 95% validation top-1 in under 10 minutes on a 2-core CPU, compilation included
(measured: docs/benchmarks.md).
The 8x8 digits are upsampled to 40x40: DFC attention pools every map 2x2, and below 33 px the
last stage's 1x1 maps leave nothing to pool. The recipe's RMSprop is tuned for 450 ImageNet
epochs; for a few hundred steps SGD with Nesterov momentum and a cosine schedule converges faster
and more reliably.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # default.py, from any cwd
import default  # noqa: E402


def get_config():
    config = default.get_config()
    config.model = 'ghostnetv2_100'

    data = config.data
    data.dataset = 'digits'
    data.image_size = 40
    data.crop_pct = 1.0
    data.interpolation = 'bilinear'
    data.train_interpolation = 'bilinear'
    data.scale = (0.6, 1.0)            # mild crops: a digit must stay a digit
    data.hflip = 0.0                   # mirrored digits are other symbols
    data.randaugment = ''
    data.color_jitter = 0.0
    data.reprob = 0.0
    data.mean = (0.5, 0.5, 0.5)
    data.std = (0.5, 0.5, 0.5)

    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 6
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
    config.ema_decay = 0.9                # a short run: average the last ~10 steps
    config.eval_every_epochs = 6         # once, at the end
    config.log_every_steps = 22
    config.keep_checkpoints = 1
    return config
