"""`python -m homebake ...`: the CLI, so that `torchrun -m homebake train ...` starts each rank."""

import sys

from .cli import main

sys.exit(main())
