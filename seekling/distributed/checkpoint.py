"""Sharded training state with torch.distributed.checkpoint (DCP), and the full model for export.

    save_sharded(dir, model, optimizer)     every rank writes its shards (a collective)
    load_sharded(dir, model, optimizer)     reads them back into any sharding: another world size,
                                            another ep size, or one plain process without a group
    full_model(model)                       on rank 0, a plain Transformer with the gathered weights

State dicts come from torch.distributed.checkpoint.state_dict (get/set_state_dict): keys are the
model's own parameter names (FSDP2 and the ep DTensors leave them as they are) and the optimizer
state is keyed by those names too, so DCP can map any saved layout onto any loading one.
The run directory's layout, atomicity and the Hugging Face files are train/state.py's business.
Left out: asynchronous saves (dcp.async_save) - a save here blocks training for its duration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from seekling.model.transformer import Transformer


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimizer shards into directory `path` (every rank calls it)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer in place from `path`, resharding to the current layout.

    The optimizer's state is created first (get_state_dict does that for an optimizer that has not
    stepped), so that DCP has tensors of the right shape to read into.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model(model: nn.Module) -> Transformer | None:
    """A plain CPU Transformer holding the full fp32 weights (and expert biases) of a sharded model,
    on rank 0; None on the other ranks. A collective: every rank calls it."""
    # Gathering the (efsdp, ep)-sharded experts takes two all-gathers, which DTensor logs as a warning
    # on every save; the cost is one gather per checkpoint, so that message is silenced here.
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level, log.level = log.level, logging.ERROR
    try:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        log.setLevel(level)
    if not sd:
        return None
    with torch.device("meta"):  # no second initialisation of the weights: they are assigned below
        plain = Transformer(model.cfg)
    plain.load_state_dict(sd, strict=True, assign=True)
    plain.rope = type(plain.rope)(model.cfg)  # rope's inverse frequencies are not in a state dict: rebuilt on the CPU
    return plain
