"""The DFC switches the paper ablates (Tables 6-10), each against GhostNetV2 1.0x as released
(5x5 kernels, blocks 2-15, on the first ghost module, 2x2 average pooling, sigmoid before nearest
up-sampling).

  Table 6   kernel size:          kernel_3, kernel_7 (released: 5)
  Table 7   which blocks:         blocks_early (2-4: the 56 and 28 px stages at 224 input),
                                  blocks_middle (5-10: 14 px), blocks_late (11-15: 7 px)
  Table 8   what is enhanced:     ghost2 (the block's output instead of the expanded features)
  Table 9   gate and up-sampling: gate_after_upsample
  Table 10  pooling, up-sampling: max_pool; bilinear, bicubic (released: nearest)

Each variant's ``attention_kwargs`` sets only its own switch; the others keep DFCAttention's
defaults, which are the released model's.

Demo scale: 8 epochs (712 steps) and 2 seeds per variant, so that the 22 runs fit in about an hour
and a half on a 2-core CPU (two sweeps side by side, one core each); the attention sweep runs the
base config's 12 epochs and 3 seeds. ``--seeds 0,1,2`` adds a third seed to the same results.

  python experiments/sweep.py --sweep experiments/sweeps/dfc_ablations.py --scale demo
"""
import ml_collections

DFC = 'model_overrides.attention_kwargs'
BLOCKS = 'model_overrides.attention_blocks'


def get_sweep():
    sweep = ml_collections.ConfigDict()
    sweep.name = 'dfc_ablations'
    sweep.base = 'configs/cluttered_digits.py'
    sweep.imagenet_base = 'configs/imagenet_ghostnetv2_100.py'
    sweep.settings = {'eval_every_epochs': 1,   # an eval point per epoch for the accuracy curves
                      'num_epochs': 8}
    sweep.seeds = (0, 1)
    sweep.variants = (
        ('released', {}),
        ('kernel_3', {DFC: {'kernel': (3, 3)}}),
        ('kernel_7', {DFC: {'kernel': (7, 7)}}),
        ('blocks_early', {BLOCKS: (2, 3, 4)}),
        ('blocks_middle', {BLOCKS: (5, 6, 7, 8, 9, 10)}),
        ('blocks_late', {BLOCKS: (11, 12, 13, 14, 15)}),
        ('ghost2', {'model_overrides.attention_position': 'ghost2'}),
        ('gate_after_upsample', {DFC: {'gate_before_upsample': False}}),
        ('max_pool', {DFC: {'downsample': 'max'}}),
        ('bilinear', {DFC: {'upsample': 'bilinear'}}),
        ('bicubic', {DFC: {'upsample': 'bicubic'}}),
    )
    return sweep
