import os

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a random failure would block a landing without a way to
# reproduce it); locally hypothesis explores new examples each time, which is how it finds bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
