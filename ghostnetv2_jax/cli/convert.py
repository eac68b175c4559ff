"""``ghostnetv2-jax convert --src SOURCE --dst DST``: weights -> a Flax variables ``.safetensors``
(the model name and its overrides in the file; read back by every command and by
``ghostnetv2_jax.weights.load``).

  ghostnetv2-jax convert --model ghostnetv2_100 --src ck_ghostnetv2_10.pth.tar --dst weights/
  ghostnetv2-jax convert --src WORKDIR --step best --ema --dst run.safetensors
  ghostnetv2-jax convert --pretrained ghostnetv2_100 --dst weights/   # timm's published weights by name

SOURCE: a PyTorch state_dict (authors' .pth.tar, timm .pth or .safetensors; with --model) or a
training workdir; or, with --pretrained NAME, published weights (ghostnetv2_100 or
ghostnetv2_100.in1k: timm's model.safetensors through the Hugging Face cache). DST: a directory
(writes DST/MODEL.safetensors) or a path ending .safetensors.
"""
from __future__ import annotations

import os
from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, add_weights_arguments, check_weights_arguments, load_weights


def build_parser() -> Parser:
    p = Parser('convert', __doc__)
    add_weights_arguments(p, '--src')
    p.add_argument('--dst', required=True, help='output directory, or a .safetensors path')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_weights_arguments(args)
    from ghostnetv2_jax import weights
    w = load_weights(args)
    dst = args.dst if args.dst.endswith('.safetensors') else os.path.join(args.dst, f'{w.model_name}.safetensors')
    print(f'wrote {weights.save_variables(dst, w.variables, w.model_name, w.overrides)}')
    return 0
