"""The one command line: ``python -m ghostnetv2_jax COMMAND ...``.

  summary   params and MACs of a registered model
  convert   PyTorch checkpoint (authors' .pth.tar, timm .pth / .safetensors) -> Flax variables
  export    Flax variables -> PyTorch state_dict that timm loads with strict=True
  parity    side-by-side numbers against timm, stage by stage; non-zero exit over tolerance
  train     train_and_evaluate from an ml_collections config (absl flags)
  evaluate  top-1 / top-5 of a trained or converted checkpoint
  predict   top-5 classes (names, probabilities) of image files
  bench     side-by-side speed against timm

Bad input exits non-zero with one line on stderr; nothing already written is replaced unless
the new file is complete.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Commands with flags of their own (absl / config flags): module with main(argv).
_DELEGATED = {'train': 'ghostnetv2_jax.train.main', 'evaluate': 'ghostnetv2_jax.evaluate',
              'predict': 'ghostnetv2_jax.predict', 'bench': 'ghostnetv2_jax.bench'}


def _size(text: str):
    try:
        h, _, w = text.lower().partition('x')
        return (int(h), int(w or h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None


def _overrides(args) -> dict:
    return {} if args.num_classes is None else {'num_classes': args.num_classes}


def cmd_summary(args) -> int:
    from ghostnetv2_jax import summary
    from ghostnetv2_jax.models.registry import get_spec
    for name in args.model:
        s = summary.summarize(name, args.size)
        spec = get_spec(name)
        print(f"{name}: {s['params']:,} params, {s['macs'] / 1e6:.1f}M MACs at "
              f"{args.size[0]}x{args.size[1]}; eval {spec.pretrained.input_size[0]}px crop "
              f"{spec.pretrained.crop_pct} {spec.pretrained.interpolation}; top-1 paper "
              f"{spec.top1_paper} timm {spec.top1_timm}")
    return 0


def cmd_convert(args) -> int:
    from ghostnetv2_jax import convert
    dst = convert.convert_file(args.model, args.src, args.dst, use_ema=args.ema, **_overrides(args))
    print(f'wrote {dst}')
    return 0


def cmd_export(args) -> int:
    from ghostnetv2_jax import convert
    print(f'wrote {convert.export_file(args.src, args.dst)}')
    return 0


def cmd_parity(args) -> int:
    from ghostnetv2_jax import parity
    ok = parity.run(args.model, checkpoint=args.checkpoint, sizes=args.size or [(224, 224)],
                    batch=args.batch, seed=args.seed, tolerance=args.tolerance, use_ema=args.ema,
                    depthwise_impl=args.depthwise)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m ghostnetv2_jax', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('summary', help='params and MACs')
    s.add_argument('--model', action='append', required=True, help='registered name (repeatable)')
    s.add_argument('--size', type=_size, default=(224, 224))
    s.set_defaults(fn=cmd_summary)

    c = sub.add_parser('convert', help='PyTorch checkpoint -> Flax variables (safetensors)')
    c.add_argument('--model', required=True)
    c.add_argument('--src', required=True, help='.pth.tar / .pth / .safetensors')
    c.add_argument('--dst', required=True, help='output directory; writes DST/MODEL.safetensors')
    c.add_argument('--ema', action='store_true', help='take the EMA weights of a training checkpoint')
    c.add_argument('--num-classes', type=int, default=None)
    c.set_defaults(fn=cmd_convert)

    e = sub.add_parser('export', help='Flax variables -> PyTorch state_dict')
    e.add_argument('--src', required=True, help='a file written by convert or training')
    e.add_argument('--dst', required=True, help='.pth (torch.save) or .safetensors')
    e.set_defaults(fn=cmd_export)

    q = sub.add_parser('parity', help='compare with timm stage by stage')
    q.add_argument('--model', required=True)
    q.add_argument('--checkpoint', default=None, help='PyTorch weights; default: seeded random '
                   'weights with randomised BN statistics')
    q.add_argument('--ema', action='store_true')
    q.add_argument('--size', type=_size, action='append', help='N or HxW (repeatable); default 224')
    q.add_argument('--batch', type=int, default=2)
    q.add_argument('--seed', type=int, default=0)
    q.add_argument('--tolerance', type=float, default=1e-4, help='max |diff| / max |logit|')
    q.add_argument('--depthwise', default='auto', choices=['auto', 'native', 'shift', 'xla'])
    q.set_defaults(fn=cmd_parity)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return importlib.import_module(_DELEGATED[argv[0]]).main([f'ghostnetv2_jax {argv[0]}'] + argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if getattr(args, 'model', None):
        from ghostnetv2_jax.models.registry import get_spec
        for name in (args.model if isinstance(args.model, list) else [args.model]):
            get_spec(name)  # unknown names fail here, before any work
    return args.fn(args)


def _entry() -> int:
    from ghostnetv2_jax.convert import ConversionError
    try:
        return main()
    except (ConversionError, ValueError, TypeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(_entry())
