"""``python -m ghostnetv2_jax train --config configs/X.py --workdir DIR [--config.field=value ...]``.

Thin on purpose: flags, multi-host start-up, then ``trainer.train_and_evaluate``. The config is
locked, so ``--config.no_such_field=1`` is an error naming the field.
"""
from __future__ import annotations

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
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError('--config and --workdir are required')
    config = _CONFIG.value
    if not FLAGS['verbosity'].present:   # orbax and absl are chatty at INFO; progress is printed
        logging.set_verbosity(logging.WARNING)
    from ghostnetv2_jax.train import sharding
    try:
        sharding.initialize_distributed(config.distributed)   # before anything touches a backend
        from ghostnetv2_jax.train import trainer
        trainer.train_and_evaluate(config, _WORKDIR.value)
    except Exception as e:  # one clear line for the expected failures; a traceback otherwise
        from ghostnetv2_jax.convert import ConversionError
        from ghostnetv2_jax.train.trainer import TrainingError
        if isinstance(e, (ValueError, TypeError, FileNotFoundError, ConversionError, TrainingError)):
            logging.debug('training failed', exc_info=True)
            print(f'error: {e}', file=sys.stderr)
            return 1
        raise
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point used by ``python -m ghostnetv2_jax train``; ``argv[0]`` is a program name."""
    app.run(_main, argv=list(sys.argv if argv is None else argv))
    return 0   # not reached: app.run exits with _main's return value


if __name__ == '__main__':
    main()
