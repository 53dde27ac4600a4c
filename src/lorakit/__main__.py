"""`python -m lorakit ...`: the same as the `lorakit` command (torchrun can launch it this way)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
