"""`python -m pyro_vae` is the `pyro-vae` command (and what torchrun starts)."""

import sys

from .cli import main

sys.exit(main())
