"""``ghostnetv2-jax summary --model NAME [--model NAME ...] [--size 224x320]``: params, MACs, eval
preprocessing and published top-1 of registered models."""
from __future__ import annotations

from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, size, usage_error


def build_parser() -> Parser:
    p = Parser('summary', __doc__)
    p.add_argument('--model', action='append', required=True, help='registered name (repeatable)')
    p.add_argument('--size', type=size, default=(224, 224), help='N or HxW (default 224)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ghostnetv2_jax import summary
    from ghostnetv2_jax.models.registry import get_spec
    for name in args.model:
        try:
            get_spec(name)
        except ValueError as error:   # an unknown name, with the list of known ones
            usage_error(str(error))
    for name in args.model:
        spec = get_spec(name)
        s = summary.summarize(name, args.size)
        print(f"{name}: {s['params']:,} params, {s['macs'] / 1e6:.1f}M MACs at "
              f"{args.size[0]}x{args.size[1]}; eval {spec.pretrained.input_size[0]}px crop "
              f"{spec.pretrained.crop_pct} {spec.pretrained.interpolation}; top-1 paper "
              f"{spec.top1_paper} timm {spec.top1_timm}")
    return 0
