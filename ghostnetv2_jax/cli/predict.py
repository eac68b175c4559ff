"""``ghostnetv2-jax predict --checkpoint SOURCE IMAGE ...``: the top-K classes of images, with
names and probabilities.

  ghostnetv2-jax predict --checkpoint ghostnetv2_100.safetensors cat.jpg dog.png
  ghostnetv2-jax predict --checkpoint WORKDIR --ema --step best --top 3 --json photos/*.jpg
  ghostnetv2-jax predict --pretrained ghostnetv2_100 cat.jpg    # timm's published weights by name

Images are preprocessed as the model is evaluated (a workdir's data settings, else the registered
model's). An image that cannot be read is one ``error: IMAGE: why`` line on stderr; the others are
still predicted and the exit status is 1.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, add_weights_arguments, check_weights_arguments, load_weights, usage_error


def build_parser() -> Parser:
    p = Parser('predict', __doc__)
    p.add_argument('images', nargs='+', metavar='IMAGE', help='image files (anything Pillow reads)')
    add_weights_arguments(p)
    p.add_argument('--top', type=int, default=5, help='classes per image (default 5)')
    p.add_argument('--batch-size', '--batch_size', type=int, default=32, help='images per forward pass (default 32)')
    p.add_argument('--json', action='store_true', help='one JSON object per image instead of text')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1:
        usage_error(f'--top must be at least 1, got {args.top}')
    if args.batch_size < 1:
        usage_error(f'--batch-size must be at least 1, got {args.batch_size}')
    check_weights_arguments(args)
    from ghostnetv2_jax import classify
    classifier = classify.classifier_of(load_weights(args))
    failed: List[str] = []

    def on_error(path: str, error: BaseException) -> None:
        failed.append(path)
        print(f'error: {path}: {classify.unreadable_reason(error)}', file=sys.stderr, flush=True)

    for result in classify.predict(classifier, args.images, args.top, args.batch_size, on_error):
        print(json.dumps(result) if args.json else classify.format_result(result), flush=True)
    return 1 if failed else 0
