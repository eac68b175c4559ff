"""GhostNet (V1) 1.0x (5.18M params, 0.14G MACs) on ImageNet-1k with the GhostNetV2 recipe.

  python -m ghostnetv2_jax train --config configs/imagenet_ghostnet_100.py \
      --workdir gs://BUCKET/ghostnet_100 --config.data.data_dir=gs://BUCKET/tensorflow_datasets

The V2 paper's baseline: the same network and recipe without DFC attention. Expected: around
73.9% top-1 (the V1 paper's number, from its own recipe; the released V1 weights measure 73.96%
in timm) after 450 epochs at global batch 1024, read off the EMA weights ('eval/ema_top1' in TensorBoard
and metrics.jsonl). The lr scales linearly if you change the batch; keep 1024 on fewer devices
with --config.grad_accum_steps=k. The authors trained with --amp: --config.dtype=bfloat16.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # default.py, from any cwd
import default  # noqa: E402


def get_config():
    config = default.get_config()
    config.model = 'ghostnet_100'
    return config
