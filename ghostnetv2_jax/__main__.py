"""``python -m ghostnetv2_jax COMMAND ...``: the same as the ``ghostnetv2-jax`` console script
(``ghostnetv2_jax.cli``)."""
import sys

from ghostnetv2_jax.cli import main

if __name__ == '__main__':
    sys.exit(main())
