"""Which attention in GhostNetV2's ghost modules: DFC (the paper's), SE, CBAM, Coordinate Attention,
or none (GhostNet V1's block). The paper compares them on MobileNetV2 (Table 5); here each replaces
DFC in the same blocks of GhostNetV2 1.0x (index > 1), at the same place (the first ghost
module's output), with its own paper's settings (layers/attention.py).

  python experiments/sweep.py --sweep experiments/sweeps/attention.py --scale demo
"""
import ml_collections


def get_sweep():
    sweep = ml_collections.ConfigDict()
    sweep.name = 'attention'
    sweep.base = 'configs/cluttered_digits.py'
    sweep.imagenet_base = 'configs/imagenet_ghostnetv2_100.py'
    sweep.settings = {'eval_every_epochs': 1}   # an eval point per epoch for the accuracy curves
    sweep.seeds = (0, 1, 2)
    sweep.variants = (
        ('dfc', {}),                                        # GhostNetV2 as released
        ('se', {'model_overrides.attention': 'se'}),
        ('cbam', {'model_overrides.attention': 'cbam'}),
        ('coord', {'model_overrides.attention': 'coord'}),
        ('none', {'model_overrides.attention': 'none'}),    # GhostNet V1 1.0x
    )
    return sweep
