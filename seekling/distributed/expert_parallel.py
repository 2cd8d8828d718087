"""Expert parallelism: each rank of an `ep` group owns E/ep routed experts, and tokens travel to them.

Shapes: E routed experts, El = E/ep owned per rank, S routed rows a rank sends (its N*K pairs, laid
out by expert by `Experts.permute`), R rows it receives, D model dim.

The stacked expert weights w13 (E,2I,D) and w2 (E,D,I) become DTensors sharded `Shard(0)` over the
ep mesh dimension: rank j of the group holds experts [j*El, (j+1)*El). The logical tensors keep
their full shape, so checkpoints (DCP) and the gathered full state dict know nothing of ep, and a
run resumes at any other ep size.

One MoE forward, between `permute` and `combine` (the model's `Experts.dispatch` seam):
  1. exchange per-expert row counts with an all_to_all (E int64 per rank), which gives every rank
     how many rows it sends to and receives from each peer (uneven splits);
  2. send the rows and their routing weights with the autograd all_to_all (its backward is the
     reverse exchange, so gradients reach the sending rank's tokens and router);
  3. arrivals are grouped by source rank, then local expert: regroup them by local expert, run the
     same grouped GEMMs as a single process (`grouped_experts`) on the local shard, undo the
     regrouping, and send the outputs back with the reverse all_to_all.
The weights travel with the rows and are applied inside `grouped_experts` exactly as on one
process, so in fp32 an ep run computes the very numbers a single process does, only elsewhere.
Left out: overlapping the exchange with compute and capacity limits (no token is ever dropped).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from seekling.model.moe import Experts, Routed, grouped_experts


def _local(w: torch.Tensor) -> torch.Tensor:
    # After FSDP's all-gather over the other dimension the weight is the ep-sharded DTensor; its local
    # shard is this rank's experts (to_local is differentiable, the gradient lands on the shard).
    return w.to_local() if isinstance(w, DTensor) else w


class AllToAllDispatch:
    """The `Experts.dispatch` of one expert-parallel group: rows out to the owners of their experts, back again."""

    def __init__(self, mesh: DeviceMesh, n_experts: int):
        self.group = mesh.get_group()
        self.ep = mesh.size()
        self.n_local = n_experts // self.ep

    def __call__(self, experts: Experts, routed: Routed, dtype: torch.dtype) -> torch.Tensor:
        ep, El = self.ep, self.n_local
        offs = routed.offs.long()
        counts = torch.diff(offs, prepend=offs.new_zeros(1))  # (E,) rows per expert, padding included
        # recv[src*El + e]: rows rank `src` sends to my local expert e
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        send_splits = counts.view(ep, El).sum(1).tolist()
        recv_splits = recv.view(ep, El).sum(1).tolist()
        rows = all_to_all_single_autograd(routed.rows, recv_splits, send_splits, self.group)
        weights = all_to_all_single_autograd(routed.weights, recv_splits, send_splits, self.group)
        # regroup by local expert; stable, so rows of one expert keep their source-rank order
        local_expert = torch.arange(El, device=counts.device).repeat(ep).repeat_interleave(recv)
        order = local_expert.argsort(stable=True)
        local_offs = recv.view(ep, El).sum(0).cumsum(0).to(torch.int32)
        # index_select both ways: its backward (index_add) sums in a fixed order, unlike x[idx]'s
        out = grouped_experts(rows.index_select(0, order), weights.index_select(0, order), local_offs,
                              _local(experts.w13), _local(experts.w2), dtype)
        out = out.index_select(0, order.argsort())
        return all_to_all_single_autograd(out, send_splits, recv_splits, self.group)


def expert_modules(model: nn.Module) -> list[Experts]:
    """Every routed-experts module of the model (main layers and MTP), in module order."""
    return [m for m in model.modules() if isinstance(m, Experts)]


def check_expert_parallel(n_experts: int, ep: int) -> None:
    if ep > 1 and n_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the model's {n_experts} routed experts; "
                         f"choose an ep that divides {n_experts}")
    if ep > 1 and n_experts == 0:
        raise ValueError("--ep > 1 needs a model with routed experts; this one has none, use --ep 1")


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> list[Experts]:
    """Shard every Experts module's stacked weights Shard(0) over `mesh` (the ep dimension) and set
    its dispatch; returns the modules. The weights must be identical on every rank (same seed)."""
    n_experts = model.cfg.n_routed_experts
    check_expert_parallel(n_experts, mesh.size())
    modules = expert_modules(model)
    for experts in modules:
        for name in ("w13", "w2"):
            full = getattr(experts, name)
            experts.register_parameter(name, nn.Parameter(distribute_tensor(full.detach(), mesh, [Shard(0)]),
                                                          requires_grad=full.requires_grad))
        experts.dispatch = AllToAllDispatch(mesh, n_experts)
    return modules
