"""The command line: ``ghostnetv2-jax COMMAND ...`` (or ``python -m ghostnetv2_jax COMMAND ...``).

  summary   params and MACs of registered models
  convert   weights (PyTorch file, training workdir, published name) -> a Flax variables .safetensors
  export    weights (any source, or a published name) -> ONNX, LiteRT, StableHLO or a state_dict timm loads
  parity    side-by-side numbers against timm, stage by stage; exit 1 over tolerance
  train     train a config (configs/*.py) in a workdir, resuming from its checkpoints
  evaluate  top-1 / top-5 of weights on a dataset
  predict   the top classes of image files
  bench     side-by-side speed against timm

Each command is a module here with ``main(argv) -> exit status``: flags in, library calls, one
line out. Exit status: 0 success, 1 a failure (one ``error: ...`` line on stderr), 2 a usage
error (``error: ...`` naming the argument). ``--debug`` anywhere on the line also prints the
traceback of a failure.
"""
from __future__ import annotations

import importlib
import sys
import traceback
from typing import List, Optional

COMMANDS = ('summary', 'convert', 'export', 'parity', 'train', 'evaluate', 'predict', 'bench')
PROG = 'ghostnetv2-jax'


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``argv`` (default: ``sys.argv[1:]``): a command and its arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    argv = [a for a in argv if a != '--debug']
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f'error: unknown command {command!r}; expected one of {", ".join(COMMANDS)} (see {PROG} --help)',
              file=sys.stderr)
        return 2
    from ghostnetv2_jax import process
    process.fast_cpu_defaults()   # before any computation: every command runs with them
    module = importlib.import_module(f'ghostnetv2_jax.cli.{command}')
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as stop:   # argparse's --help (0) and usage errors (2)
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except Exception as error:   # noqa: BLE001 - every failure ends as one line
        if debug:
            traceback.print_exc()
        print(f'error: {one_line(error)}', file=sys.stderr, flush=True)
        return 1


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; its type where it says nothing (or where it is not
    one of the errors the library raises for bad input, so that a bug still reads as one)."""
    text = ' '.join(str(error).split())
    expected = isinstance(error, (ValueError, OSError, LookupError, TypeError, RuntimeError))
    if not text:
        return type(error).__name__
    return text if expected else f'{type(error).__name__}: {text} (run with --debug for the traceback)'
