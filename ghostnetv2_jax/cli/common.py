"""What every command's parser shares: one error format and exit status 2 for usage errors."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Tuple

from ghostnetv2_jax.cli import PROG


class Parser(argparse.ArgumentParser):
    """argparse with the project's error line: ``error: MESSAGE (see PROG --help)``, exit 2."""

    def __init__(self, command: str, doc: str, **kwargs):
        super().__init__(prog=f'{PROG} {command}', description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        usage_error(f'{message} (see {self.prog} --help)')


def usage_error(message: str):
    """Stop with a usage error: one line, exit status 2."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def size(text: str) -> Tuple[int, int]:
    """'N' or 'HxW' -> (H, W)."""
    try:
        h, _, w = text.lower().partition('x')
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f'size must be N or HxW, got {text!r}') from None


def add_weights_arguments(p: argparse.ArgumentParser, source: str = '--checkpoint') -> None:
    """The arguments that name weights (``ghostnetv2_jax.weights.load``): ``source`` (a file or a
    workdir) or ``--pretrained NAME`` (published weights), exactly one of them. Read them with
    ``check_weights_arguments`` and then ``load_weights``."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(source, dest='source', metavar='SOURCE', default=None,
                       help='a training workdir, a Flax variables .safetensors (convert), or a PyTorch '
                            'state_dict (.pth, .pth.tar, timm .safetensors; needs --model)')
    which.add_argument('--pretrained', metavar='NAME', default=None,
                       help="published weights by name, e.g. ghostnetv2_100 or ghostnetv2_100.in1k: timm's, "
                            "fetched with huggingface_hub into its cache (HF_HOME; HF_HUB_OFFLINE=1 reads "
                            "the cache alone)")
    p.add_argument('--model', default=None, help='registered model name (needed for PyTorch files)')
    p.add_argument('--step', default='latest', help="a workdir's checkpoint: 'latest', 'best' or a step number")
    p.add_argument('--ema', action='store_true', help="the EMA weights (a workdir's, or a training file's)")


def check_weights_arguments(args) -> None:
    """Usage errors in the weights arguments, found before anything slow is imported; a source
    that does not exist is a failure (``FileNotFoundError``). ``--pretrained NAME`` becomes the
    source ``'pretrained:NAME'`` (``args.source``), which ``weights.load`` reads."""
    from ghostnetv2_jax import weights
    if getattr(args, 'pretrained', None) is not None:
        if args.ema:
            usage_error('--ema reads a workdir or a training file; published weights (--pretrained) are one set')
        if str(args.step) != 'latest':
            usage_error('--step reads a workdir; published weights (--pretrained) have no steps')
        args.source = weights.PRETRAINED + args.pretrained.removeprefix(weights.PRETRAINED)
        problem = weights.check_source(args.source, args.model)
        if problem:
            usage_error(problem)
        return
    if weights.needs_model_name(args.source) and not args.model and os.path.isfile(args.source):
        usage_error(f'--model is required to read the PyTorch checkpoint {args.source}')
    problem = weights.check_source(args.source, args.model, args.step)
    if problem and not os.path.exists(args.source) and '://' not in args.source:
        raise FileNotFoundError(problem)
    if problem:
        usage_error(problem)


def load_weights(args, log=None):
    """The ``weights.Weights`` the weights arguments name (checked first, as
    ``check_weights_arguments``): what every command that takes weights reads them with."""
    from ghostnetv2_jax import weights
    check_weights_arguments(args)
    return weights.load(args.source, args.model, step=args.step, ema=args.ema, log=log)
