"""`python -m seekling.serve --model DIR ...`: the same as `seekling serve` (bench/bench_serve.py uses it)."""

import sys

from seekling.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
