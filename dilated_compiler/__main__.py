"""``python -m dilated_compiler``: the same command line as ``dilated-compiler``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
