"""``python -m ghostnetv2_jax train --config configs/X.py --workdir DIR [--config.field=value ...]``.

Thin on purpose: flags, multi-host start-up, then ``trainer.train_and_evaluate``. The config is
locked, so ``--config.no_such_field=1`` is an error naming the field.
"""
from __future__ import annotations

import re
import sys
from typing import List, Optional

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'training config file (configs/*.py)',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints and logs (local or gs://)')


def _main(argv: List[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        raise app.UsageError('--config and --workdir are required')
    try:
        config.model   # a config file that failed to load is reported on first use
    except OSError as e:
        print('error: ' + ' '.join(str(e).split()), file=sys.stderr)
        return 1
    if not FLAGS['verbosity'].present:   # orbax and absl are chatty at INFO; progress is printed
        logging.set_verbosity(logging.WARNING)
    from ghostnetv2_jax import xla_options
    from ghostnetv2_jax.train import sharding
    xla_options.dispatch_cpu_synchronously()   # one train step's temporaries at a time on CPU
    try:
        # before anything touches a backend
        sharding.initialize_distributed(config.distributed, config.coordinator_address,
                                        config.num_processes, config.process_id)
        from ghostnetv2_jax.train import trainer
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except Exception as e:  # one clear line for the expected failures; a traceback otherwise
        from ghostnetv2_jax.convert import ConversionError
        from ghostnetv2_jax.train.checkpoint import CheckpointSaveError
        from ghostnetv2_jax.train.trainer import TrainingError
        if isinstance(e, (ValueError, TypeError, FileNotFoundError, ConversionError, TrainingError,
                          CheckpointSaveError)):
            logging.debug('training failed', exc_info=True)
            print(f'error: {e}', file=sys.stderr)
            return 1
        raise
    return 0


def parse_flags(argv: List[str]) -> List[str]:
    """absl parsing, with one-line errors for what config_flags reports as tracebacks or
    multi-line messages: a config file that does not load, a field the config does not have."""
    saved, sys.argv = sys.argv, list(argv)    # config_flags finds the --config.* overrides in sys.argv
    try:
        return FLAGS(argv)
    except (flags.Error, OSError, ValueError) as e:   # bad value, missing config file, flag order
        raise SystemExit('error: ' + ' '.join(str(e).split())) from None
    except (AttributeError, KeyError) as e:   # --config.<unknown field>=...
        text = str(e).replace('\\n', '\n')
        key = re.search(r'[A-Za-z_]\w*', text)
        key = key.group(0) if key else text
        given = [a.split('=')[0] for a in argv if a.startswith('--config.') and
                 a.split('=')[0].split('.')[-1] == key]
        hint = re.search(r'Did you mean "([^"]+)"', text)
        raise SystemExit(f'error: unknown config field {given[0] if given else key}'
                         + (f' (did you mean {hint.group(1)}?)' if hint else '')) from None
    finally:
        sys.argv = saved


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point used by ``python -m ghostnetv2_jax train``; ``argv[0]`` is a program name."""
    app.run(_main, argv=list(sys.argv if argv is None else argv), flags_parser=parse_flags)
    return 0   # not reached: app.run exits with _main's return value


if __name__ == '__main__':
    main()
