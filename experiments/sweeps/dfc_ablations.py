"""The DFC switches the paper ablates (Tables 6-10), each against the released DFC (5x5 kernels,
every attention block, on the first ghost module, 2x2 average pooling, sigmoid before nearest
up-sampling), on the spread digits (configs/spread_digits.py: at 96 px the gates of blocks 2-3
see 24 px maps, of blocks 4-5 12 px (block 5's gate comes before its stride-2 conv), of blocks
6-10 6 px, pooled to 12, 6 and 3).

  Table 6   kernel size:          kernel_3, kernel_7 (released: 5)
  Table 7   which blocks:         blocks_early (2-4: 24 and 12 px maps), blocks_late (5-10: 12 and 6 px)
  Table 8   what is enhanced:     ghost2 (the block's output instead of the expanded features)
  Table 9   gate and up-sampling: gate_after_upsample (with the released nearest up-sampling, the
            released function itself: a sigmoid commutes with copying values, so this variant
            measures float rounding's noise; the paper's question needs bilinear up-sampling)
  Table 10  pooling, up-sampling: max_pool; bilinear, bicubic (released: nearest)

Each variant's ``attention_kwargs`` sets only its own switch; the others keep DFCAttention's
defaults, which are the released model's. Three seeds, paired by seed in the report.

  python experiments/sweep.py --sweep experiments/sweeps/dfc_ablations.py    # -> experiments/results/spread_dfc_ablations
"""
import ml_collections

DFC = 'model_overrides.attention_kwargs'
BLOCKS = 'model_overrides.attention_blocks'


def get_sweep():
    sweep = ml_collections.ConfigDict()
    sweep.name = 'spread_dfc_ablations'
    sweep.base = 'configs/spread_digits.py'
    sweep.imagenet_base = 'configs/imagenet_ghostnetv2_100.py'
    sweep.settings = {}
    sweep.seeds = (0, 1, 2)
    sweep.variants = (
        ('released', {}),
        ('kernel_3', {DFC: {'kernel': (3, 3)}}),
        ('kernel_7', {DFC: {'kernel': (7, 7)}}),
        ('blocks_early', {BLOCKS: (2, 3, 4)}),
        ('blocks_late', {BLOCKS: (5, 6, 7, 8, 9, 10)}),
        ('ghost2', {'model_overrides.attention_position': 'ghost2'}),
        ('gate_after_upsample', {DFC: {'gate_before_upsample': False}}),
        ('max_pool', {DFC: {'downsample': 'max'}}),
        ('bilinear', {DFC: {'upsample': 'bilinear'}}),
        ('bicubic', {DFC: {'upsample': 'bicubic'}}),
    )
    return sweep
