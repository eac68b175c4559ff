"""Which attention in GhostNetV2's ghost modules: DFC (the paper's), SE, CBAM, Coordinate Attention,
or none (GhostNet V1's block), on the spread digits (configs/spread_digits.py: one digit over most of
a 96 px canvas among large fragments of others; GhostNetV2's table to stride 16 at width 0.5). The
paper compares them on MobileNetV2 (Table 5); here each replaces DFC in the same blocks (2-10), at
the same place (the first ghost module's output), with its own paper's settings
(layers/attention.py).

Blocks 3, 4, 9 and 10 of the table carry their own SE after the depthwise conv: ``se`` puts an SE
in DFC's place in every DFC block (so in those four blocks it stacks on the block's own SE), and
``se_unstacked`` only in the five that have none. The variants differ in params and MACs (the
report gives both in each row); none is matched to DFC's count.

Five seeds: a seed fixes the data order and the canvases of every variant, so the report pairs the
variants by seed. The ``dfc`` rows are also the task's stability measurement (results.md).

  python experiments/sweep.py --sweep experiments/sweeps/attention.py    # -> experiments/results/spread_attention
"""
import ml_collections


def get_sweep():
    sweep = ml_collections.ConfigDict()
    sweep.name = 'spread_attention'
    sweep.base = 'configs/spread_digits.py'
    sweep.imagenet_base = 'configs/imagenet_ghostnetv2_100.py'
    sweep.settings = {}
    sweep.seeds = (0, 1, 2, 3, 4)
    sweep.variants = (
        ('dfc', {}),                                        # GhostNetV2 as released
        ('se', {'model_overrides.attention': 'se'}),
        ('se_unstacked', {'model_overrides.attention': 'se',
                          'model_overrides.attention_blocks': (2, 5, 6, 7, 8)}),
        ('cbam', {'model_overrides.attention': 'cbam'}),
        ('coord', {'model_overrides.attention': 'coord'}),
        ('none', {'model_overrides.attention': 'none'}),    # GhostNet V1's block
    )
    return sweep
