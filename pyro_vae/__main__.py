"""`python -m pyro_vae` is the `pyro-vae` command (and what torchrun starts)."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (pkgutil.walk_packages, say) runs nothing
    sys.exit(main())
