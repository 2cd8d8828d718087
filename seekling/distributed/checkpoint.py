"""Sharded training state with torch.distributed.checkpoint (DCP), and the full model for export.

    save_sharded(dir, model, optimizer)     every rank writes its shards (a collective)
    load_sharded(dir, model, optimizer)     reads them back into any sharding: another world size,
                                            another ep size, or one plain process without a group
    load_full_optimizer(model, opt, state)  a single-process checkpoint's optimizer state, into shards
    full_model(model)                       on rank 0, a plain Transformer with the gathered weights

State dicts come from torch.distributed.checkpoint.state_dict (get/set_state_dict): keys are the
model's own parameter names (FSDP2 and the ep DTensors leave them as they are) and the optimizer
state is keyed by those names too, so DCP can map any saved layout onto any loading one.
Engram tables are plain tensors, whole on every rank (parallelize.py): DCP saves one copy of them
and of their RowSparseAdam state (moments and step, under the tables' names in the same optimizer
state), and every rank reads them whole.
The run directory's layout, atomicity and the Hugging Face files are train/state.py's business.
Left out: asynchronous saves (dcp.async_save) - a save here blocks training for its duration.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from seekling.model.engram import table_parameters
from seekling.model.transformer import Transformer
from seekling.train.optim import MixedOptimizer


def save_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Write model and optimizer shards into directory `path` (every rank calls it)."""
    tables = _table_states(model, optimizer)
    with _adamw_alone(optimizer) as adamw:
        model_sd, optim_sd = get_state_dict(model, adamw)
    optim_sd["state"].update(tables)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Restore model and optimizer in place from `path`, resharding to the current layout.

    The optimizer's state is created first (get_state_dict does that for an optimizer that has not
    stepped, init_state for the tables), so that DCP has tensors of the right shape to read into.
    """
    tables = _table_states(model, optimizer)
    with _adamw_alone(optimizer) as adamw:
        model_sd, optim_sd = get_state_dict(model, adamw)
        optim_sd["state"].update(tables)  # read in place: they are the optimizer's own tensors
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        for name in tables:
            del optim_sd["state"][name]
        set_state_dict(model, adamw, model_state_dict=state["model"], optim_state_dict=optim_sd)


def load_full_optimizer(model: nn.Module, optimizer, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Restore the optimizer of a (sharded) model from whole tensors keyed by parameter name (a
    single-process checkpoint's); every rank passes the same and keeps its shards."""
    state = dict(state)
    for name, st in _table_states(model, optimizer).items():
        for field, value in state.pop(name, {}).items():  # none: a checkpoint saved before any step
            st[field].copy_(value)
    full = StateDictOptions(full_state_dict=True)
    with _adamw_alone(optimizer) as adamw:
        groups = get_optimizer_state_dict(model, adamw, options=full)["param_groups"]
        set_optimizer_state_dict(model, adamw, {"state": state, "param_groups": groups}, options=full)


def _table_states(model: nn.Module, optimizer) -> dict[str, dict]:
    """The RowSparseAdam state of every Engram table, by name (created as zeros if it has none yet)."""
    if not isinstance(optimizer, MixedOptimizer):
        return {}
    return {name: optimizer.sparse.init_state(p) for name, p in table_parameters(model) if p.requires_grad}


@contextlib.contextmanager
def _adamw_alone(optimizer):
    """MixedOptimizer's AdamW, holding only its own state while inside.

    MixedOptimizer (train/optim.py) keeps one state mapping for its AdamW and its RowSparseAdam;
    torch's state-dict functions take one torch optimizer and would find the tables' entries in the
    AdamW's. They are set aside here, and put back into whatever mapping the AdamW then holds
    (set_state_dict replaces it), which the RowSparseAdam shares again.
    """
    if not isinstance(optimizer, MixedOptimizer):
        yield optimizer
        return
    adamw, shared = optimizer.dense, optimizer.dense.state
    tables = {p: shared.pop(p) for g in optimizer.sparse.param_groups for p in g["params"] if p in shared}
    try:
        yield adamw
    finally:
        adamw.state.update(tables)
        optimizer.sparse.state = adamw.state


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
    for layer in plain.layers:  # so are Engram's primes and offsets
        if layer.engram is not None:
            layer.engram.reset_index_buffers()
    return plain
