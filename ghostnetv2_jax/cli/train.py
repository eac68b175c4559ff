"""``ghostnetv2-jax train --config configs/RECIPE.py --workdir DIR [--config.FIELD=VALUE ...]``:
train a recipe in DIR, resuming from the newest intact checkpoint there.

The recipe's docstring gives its command and expected result. Overrides are typed by the field
they set (``--config.model_overrides.cfgs=None`` unsets a field); an unknown field is an error
naming it. Several hosts: ``--config.coordinator_address`` / ``num_processes`` / ``process_id``
or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (docs/training.md).
"""
from __future__ import annotations

from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, usage_error


def build_parser() -> Parser:
    p = Parser('train', __doc__, epilog='--config.FIELD=VALUE: any field of the recipe (configs/default.py)')
    p.add_argument('--config', required=True, help='recipe file (configs/*.py)')
    p.add_argument('--workdir', required=True, help='checkpoints and logs (local or gs://)')
    p.add_argument('--verbosity', type=int, default=-1,
                   help='absl log level of the libraries (-1: warnings; 0: info); progress is printed')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    from ghostnetv2_jax.cli.config import ConfigError, load_config
    bad = [a for a in overrides if not a.startswith('--config.')]
    if bad:
        usage_error(f'unexpected arguments: {" ".join(bad)}')
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        usage_error(str(error))
    from absl import logging
    logging.set_verbosity(args.verbosity)   # orbax and absl are chatty at INFO
    from ghostnetv2_jax import process
    from ghostnetv2_jax.train import sharding
    process.fast_cpu_defaults()   # before the backend starts: one step's temporaries, kept for the next
    sharding.initialize_distributed(config.distributed, config.coordinator_address, config.num_processes,
                                    config.process_id)   # before anything touches a backend
    from ghostnetv2_jax.train import trainer
    trainer.train_and_evaluate(config, args.workdir)
    return 0
