import os

import seekling  # noqa: F401  (first: it sets MKL_CBWR before torch loads MKL, see seekling/__init__.py)
import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a random failure would block a landing without a way to
# reproduce it); locally hypothesis explores new examples each time, which is how it finds bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine OpenMP
    barriers then wait on other processes (measured: one test 1.4 s alone, 12 s contended)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def compiled_spy(monkeypatch):
    """Batch sizes that went through the engine's compiled decode step (EngineConfig(compile=True))."""
    from seekling.inference.compiled import CompiledDecode

    seen = []
    call = CompiledDecode.__call__

    def counted(self, ids, rows, positions):
        seen.append(len(ids))
        return call(self, ids, rows, positions)

    monkeypatch.setattr(CompiledDecode, "__call__", counted)
    return seen


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device that device-aware tests put their models on: SEEKLING_TEST_DEVICE (cpu by default;
    scripts/gpu_check.sh sets cuda). A device asked for but missing fails rather than skips: a GPU
    run that quietly fell back to the CPU would report passes it never made."""
    name = os.environ.get("SEEKLING_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        pytest.fail(f"SEEKLING_TEST_DEVICE={name!r} is not usable with torch {torch.__version__} here ({e}); "
                    "unset it to test on the CPU", pytrace=False)
    return dev
