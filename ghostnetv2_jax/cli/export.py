"""``ghostnetv2-jax export --src SOURCE --dst FILE``: weights -> a PyTorch state_dict that timm's
``create_model(MODEL, **overrides)`` loads with ``strict=True``.

  ghostnetv2-jax export --src WORKDIR --step best --ema --dst model.pth
  ghostnetv2-jax export --src ghostnetv2_100.safetensors --dst ghostnetv2_100.pth

SOURCE: a Flax variables .safetensors (convert), a training workdir, or a PyTorch file (with
--model). FILE: .safetensors (no torch needed), or any other suffix for ``torch.save``.
"""
from __future__ import annotations

from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, add_weights_arguments, check_weights_arguments


def build_parser() -> Parser:
    p = Parser('export', __doc__)
    add_weights_arguments(p, '--src')
    p.add_argument('--dst', required=True, help='.pth (torch.save) or .safetensors')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_weights_arguments(args)
    from ghostnetv2_jax import weights
    w = weights.load(args.source, args.model, step=args.step, ema=args.ema)
    print(f'wrote {weights.save_state_dict(args.dst, w)}')
    return 0
