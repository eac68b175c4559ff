"""``ghostnetv2-jax parity --model NAME [--checkpoint FILE] [--size 97x131 ...]``: this project's
network and timm's side by side in eval mode, stage by stage, on the same weights; exit status 1
when the logits differ by more than --tolerance (max |diff| / max |logit|).

Without --checkpoint both run seeded random weights with randomised BatchNorm statistics and
affine parameters (a fresh init would hide conversion bugs).
"""
from __future__ import annotations

from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, size, usage_error


def build_parser() -> Parser:
    p = Parser('parity', __doc__)
    p.add_argument('--model', required=True, help='registered model name')
    p.add_argument('--checkpoint', default=None, help='PyTorch weights; default: seeded random weights with '
                   'randomised BN statistics')
    p.add_argument('--ema', action='store_true', help="the checkpoint's EMA weights")
    p.add_argument('--size', type=size, action='append', help='N or HxW (repeatable); default 224')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tolerance', type=float, default=1e-4, help='max |diff| / max |logit| (default 1e-4)')
    p.add_argument('--depthwise', default='auto', choices=['auto', 'native', 'shift', 'xla'],
                   help="this project's depthwise convolution")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ghostnetv2_jax import parity
    from ghostnetv2_jax.models.registry import get_spec
    try:
        get_spec(args.model)   # before timm is imported
    except ValueError as error:   # an unknown name, with the list of known ones
        usage_error(str(error))
    ok = parity.run(args.model, checkpoint=args.checkpoint, sizes=args.size or [(224, 224)],
                    batch=args.batch, seed=args.seed, tolerance=args.tolerance, use_ema=args.ema,
                    depthwise_impl=args.depthwise)
    return 0 if ok else 1
