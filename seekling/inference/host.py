"""Traffic between the host and the model's device: Python lists in, step results out.

The engine's bookkeeping (token lists, block lists, per-request parameters, random generators)
is Python on the host; the model and everything the engine computes live on the model's device
(CPU, CUDA or MPS). Tensors built from host values go through `to_device`, and what the host
reads back goes through `read_back`, so one place decides how each crossing is made:

* `to_device` copies from pinned memory, asynchronously, on CUDA: a plain `torch.tensor(data,
  device="cuda")` is a blocking copy, which synchronises the stream (every kernel queued before
  it must finish), so the CPU would stall once per metadata tensor instead of queueing the step.
* `read_back` packs several results into one fp32 tensor and reads it with a single `.tolist()`,
  so a GPU step synchronises once, not once per tensor. fp32 holds token ids exactly up to 2^24
  (the engine checks the vocabulary fits) and MPS has no fp64.
On a CPU both are plain tensor construction and `.tolist()`.
Left out: CUDA graphs of the step's metadata; a decode step still issues its small copies.
"""

from __future__ import annotations

import torch

MAX_EXACT_ID = 2**24  # integers read back through fp32 are exact below this


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A Python list (or a CPU tensor) as a tensor on `device`."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype, device="cpu")
    if device.type == "cuda":
        # Pinned, so the copy is queued behind the step's kernels; the caching host allocator keeps
        # the buffer until the copy has run, so `t` may be dropped at once.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)  # a no-op on the CPU; elsewhere (MPS) a plain copy, with no pinned memory to rely on


def read_back(*tensors: torch.Tensor) -> list[list[float]]:
    """Each tensor's values, flattened, as Python floats: one device-to-host transfer for all of them."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).tolist()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()])
        i += t.numel()
    return out
