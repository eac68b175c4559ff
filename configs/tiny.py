"""A tiny GhostNetV2 on the embedded digits: the configuration the tests train. One stride-2
bottleneck with every part of the real ones (ghost modules, DFC attention, depthwise conv, SE,
conv shortcut) keeps XLA's compile short; not meant to be accurate.

  python -m ghostnetv2_jax train --config configs/tiny.py --workdir /tmp/tiny
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # default.py, from any cwd
import default  # noqa: E402

TINY_CFGS = (((3, 32, 24, 0.25, 2),),)      # kernel, expansion, out, SE ratio, stride


def get_config():
    config = default.get_config()
    config.model = 'ghostnetv2_100'
    config.model_overrides.cfgs = TINY_CFGS
    config.model_overrides.attention_blocks = (0,)   # DFC on the one block (default: index > 1)
    config.data.dataset = 'digits'
    config.data.image_size = 16
    config.data.crop_pct = 1.0
    config.data.interpolation = 'bilinear'
    config.data.train_interpolation = 'bilinear'
    config.data.scale = (0.5, 1.0)
    config.data.hflip = 0.0
    config.data.randaugment = ''
    config.data.color_jitter = 0.0
    config.data.reprob = 0.0
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.batch_size = 32
    config.eval_batch_size = 64
    config.lr_base_batch = 0
    config.learning_rate = 0.01
    config.num_epochs = 1
    config.num_train_steps = 8
    config.warmup_epochs = 0
    config.lr_noise = ()
    config.ema_decay = 0.9
    config.log_every_steps = 4
    config.keep_checkpoints = 2
    return config
