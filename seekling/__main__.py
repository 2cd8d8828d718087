"""`python -m seekling ...`, the form torchrun launches: `torchrun --nproc_per_node 2 -m seekling train ...`."""

import sys

from seekling.cli import main

sys.exit(main())
