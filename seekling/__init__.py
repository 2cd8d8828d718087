"""seekling: a compact PyTorch stack for DeepSeek-style sparse language models."""

from seekling.checkpoint import load, save
from seekling.config import ModelConfig

__all__ = ["ModelConfig", "load", "save"]
__version__ = "0.1.0"
