"""seekling: a compact PyTorch stack for DeepSeek-style sparse language models."""

import os

# Runs must repeat and resume bit for bit. On an Intel Xeon (family 6 model 207) MKL's default GEMM
# paths made two identical fp32 GRPO runs in one process differ in the 7th digit of a gradient norm
# at 2 threads (tests/test_r1_rl.py::test_rl_resumes_bit_exactly); conditional numerical
# reproducibility makes MKL's results a function of the inputs and the thread count only (same
# speed, measured there). MKL reads it when it loads, so before torch is imported: a script that
# imports torch before seekling should set MKL_CBWR=AUTO,STRICT itself.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from seekling.checkpoint import load, save  # noqa: E402  (after MKL_CBWR, which must precede torch)
from seekling.config import ModelConfig

__all__ = ["ModelConfig", "load", "save"]
__version__ = "0.1.0"
