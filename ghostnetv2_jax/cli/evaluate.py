"""``ghostnetv2-jax evaluate --checkpoint SOURCE [--dataset D] ...``: top-1 / top-5 of weights
(or ``--pretrained NAME`` for published weights in place of ``--checkpoint``).

  # a training workdir (its latest checkpoint; --step best|latest|N; --ema for the EMA weights)
  ghostnetv2-jax evaluate --checkpoint WORKDIR --ema --step best
  # converted weights (convert) or a PyTorch file (authors' .pth.tar, timm .pth; with --model)
  ghostnetv2-jax evaluate --checkpoint ghostnetv2_100.safetensors --dataset imagenet2012 --data_dir gs://BUCKET/tensorflow_datasets
  ghostnetv2-jax evaluate --checkpoint ck_ghostnetv2_10.pth.tar --model ghostnetv2_100
  # published weights by name (timm's, through the Hugging Face cache; HF_HUB_OFFLINE=1: the cache alone)
  ghostnetv2-jax evaluate --pretrained ghostnetv2_100 --dataset imagenet2012 --data_dir gs://BUCKET/tensorflow_datasets

Preprocessing is the model's eval preprocessing: for a workdir the data settings it trained with,
otherwise the registered model's (224 px, crop 0.875, bicubic, ImageNet mean/std); the
--image_size / --crop_pct / --interpolation options override either.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, add_weights_arguments, check_weights_arguments, load_weights


def build_parser() -> Parser:
    p = Parser('evaluate', __doc__)
    add_weights_arguments(p)
    p.add_argument('--dataset', default=None, help="'digits', 'folder:/path' or a tfds name; default: the "
                   "workdir's dataset, else imagenet2012")
    p.add_argument('--data_dir', '--data-dir', default=None, help='tfds data_dir (local or gs://)')
    p.add_argument('--split', default=None, help="default: the workdir's eval split, else 'validation'")
    p.add_argument('--batch_size', '--batch-size', type=int, default=250,
                   help='global eval batch (a multiple of the device count; default 250)')
    p.add_argument('--image_size', '--image-size', type=int, default=None, help='override the eval input size')
    p.add_argument('--crop_pct', '--crop-pct', type=float, default=None, help='override the eval crop fraction')
    p.add_argument('--interpolation', choices=['bilinear', 'bicubic', 'nearest'], default=None,
                   help='override the eval resize method')
    p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help='compute dtype')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_weights_arguments(args)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    from ghostnetv2_jax import evaluate
    w = load_weights(args)
    data = evaluate.data_config(w, dataset=args.dataset, data_dir=args.data_dir, eval_split=args.split,
                                image_size=args.image_size, crop_pct=args.crop_pct,
                                interpolation=args.interpolation)
    r = evaluate.evaluate(w, data, args.batch_size, args.dtype)
    r.update(checkpoint=args.source, ema=args.ema)
    where = args.source + (f' step {r["step"]}' if r['step'] is not None else '') + (' (EMA)' if args.ema else '')
    print(f"{where} on {r['dataset']}:{r['split']} ({r['count']} images, {r['image_size']}px crop "
          f"{r['crop_pct']} {r['interpolation']}): top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% "
          f"loss {r['loss']:.4f}")
    if args.json:
        from etils import epath
        epath.Path(args.json).write_text(json.dumps(r, indent=2))
    sys.stdout.flush()
    return 0
