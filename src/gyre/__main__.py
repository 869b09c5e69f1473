"""``python -m gyre``: the command line (what ``torchrun -m gyre train ...`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
