"""Data and expert parallelism for one torchrun job: the process group, the mesh, and the sharding.

    par = init_parallel(dp=None, ep=2)           # None outside torchrun (or at world size 1)
    parallelize(model, par, torch.bfloat16)      # FSDP2 (+ EP) applied to a built, initialised model

Every rank is a data-parallel rank (dp = world size) and reads its own slice of each batch. The
mesh is 2-D, (efsdp, ep) = (world/ep, ep): expert weights are sharded over `ep` (expert
parallelism, expert_parallel.py) and FSDP-sharded over `efsdp`; everything else is FSDP-sharded
over all ranks, the flattened `dp` dimension (torchtitan's dp_shard / ep layout, without its
context and tensor parallelism).

Sharding is applied by wrapping with FSDP2's `fully_shard`, per block (experts apart when ep > 1),
embeddings, head, then the root, as torchtitan does. Nothing else about the caller's modules
changes, except what expert parallelism needs: the experts' weights become ep-sharded DTensors and
`Experts.dispatch` is set. FSDP2 hooks only `forward`, and the trainer's loss calls
`model.hidden` / `model.mtp_hidden`: those are registered as forward methods (FSDP2's API for it).

Gradients: FSDP averages over the ranks that shard a parameter. An expert's gradient arrives as
the sum over its ep group (the all_to_all backward brings every rank's contribution) and is then
averaged over only world/ep ranks, so its divide factor is set to the world size: every gradient
is then the mean over all ranks, as one process with the whole batch would compute.
Engram tables (model/engram.py) stay out of FSDP (`ignored_params`): whole on every rank, like
the buffers. Their gradients are sparse (the rows a batch looked up) and their optimizer is
RowSparseAdam, neither of which FSDP2's flat reduce-scatter and DTensor shards carry, and sharding
them would all-gather whole tables every step to read a few rows. After the backward the step
calls `Parallel.mean_sparse_grads`: every rank's coalesced rows are all-gathered, summed and
divided by the world size (the mean FSDP takes of dense gradients), identically on every rank, so
every rank applies the same row update and the tables stay equal without ever being broadcast.
Their projections, norms and convolution are ordinary parameters, sharded with their block.
Left out: tensor, context and pipeline parallelism; HSDP (replicating across nodes); compiling a
sharded model (torch.compile is single-process only for now); sharding the Engram tables (a table
larger than one device's memory; the paper's answer is host memory, not sharding).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from seekling.distributed.expert_parallel import apply_expert_parallel, check_expert_parallel
from seekling.model.engram import table_parameters
from seekling.model.mhc import HyperConnection, HyperHead
from seekling.train.core import clip_sparse_grads_with_norm_


@dataclass(frozen=True)
class Parallel:
    """Where this process sits in the job: its ranks, device and meshes."""

    rank: int
    world_size: int  # = dp: every rank is a data-parallel rank
    ep: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # (efsdp, ep)
    dp_mesh: DeviceMesh  # all ranks, flattened
    owns_group: bool = True  # created the process group (and so destroys it at the end)

    @property
    def dp(self) -> int:
        return self.world_size

    @property
    def primary(self) -> bool:
        """Rank 0: the one that logs, prints and writes the shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.dp_mesh.get_group())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum over every rank (a new tensor; `t` is left alone)."""
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_mesh.get_group())
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size

    def agree(self, flag: bool) -> bool:
        """True on every rank if it is True on any: ranks must stop (or save) at the same step."""
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def mean_sparse_grads(self, parameters) -> None:
        """Average over all ranks the gradients FSDP does not reduce: those of the parameters it left
        whole, the Engram tables (sparse). Every rank ends with the very same tensor. A collective."""
        # FSDP turned every parameter it manages into a DTensor; the others are the replicated tables.
        # Chosen by that, not by which have gradients, so that every rank joins the same gathers.
        params = [p for p in parameters if p.requires_grad and not isinstance(p, DTensor)]
        if not params:
            return
        assert all(p.grad is None or p.grad.is_sparse for p in params), "parallelize replicates sparse tables only"
        world = self.world_size
        grads = [(p.grad if p.grad is not None else torch.sparse_coo_tensor(
            torch.empty(1, 0, dtype=torch.long, device=p.device), p.new_empty(0, *p.shape[1:]), p.shape)).coalesce()
            for p in params]
        # Ranks touch different numbers of rows: gather the counts, then every rank's rows and values
        # padded to the largest count (all_gather takes equal sizes on gloo and NCCL alike). One
        # gather each for all tables together: rows and values are concatenated table after table.
        counts = torch.tensor([g._nnz() for g in grads], device=self.device)
        n = self._gather(counts).tolist()  # n[rank][table]
        cap = [max(c) for c in zip(*n)]
        rows = torch.cat([F.pad(g.indices()[0], (0, c - g._nnz())) for g, c in zip(grads, cap)])
        vals = torch.cat([F.pad(g.values(), (0, 0, 0, c - g._nnz())).flatten() for g, c in zip(grads, cap)])
        all_rows, all_vals = self._gather(rows), self._gather(vals)
        r0 = v0 = 0  # where table t starts in every rank's rows and values
        for t, (p, g) in enumerate(zip(params, grads)):
            d = g.shape[1]  # an embedding's row width
            idx = torch.cat([all_rows[i, r0:r0 + n[i][t]] for i in range(world)])
            val = torch.cat([all_vals[i, v0:v0 + n[i][t] * d] for i in range(world)]).view(-1, d)
            r0, v0 = r0 + cap[t], v0 + cap[t] * d
            # divided like FSDP's dense gradients: the mean over ranks, the gradient of the global batch
            p.grad = torch.sparse_coo_tensor(idx[None], val, g.shape).coalesce() / world

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `t` (all the same size), stacked in rank order: (world, len(t))."""
        # a flat output: gloo's all_gather_into_tensor takes no other shape, NCCL's takes both
        out = t.new_empty(self.world_size * t.numel())
        dist.all_gather_into_tensor(out, t, group=self.dp_mesh.get_group())
        return out.view(self.world_size, -1)

    def broadcast(self, obj):
        """Rank 0's picklable `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.dp_mesh.get_group())
        return box[0]


def launched_world_size() -> int:
    """The world size torchrun announced (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(dp: int | None = None, ep: int = 1) -> Parallel | None:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA) and build its mesh; None for one process.

    `dp`, when given, must equal the world size (it is a check on the launch, not a setting).
    """
    world = launched_world_size()
    if dp is not None and dp < 1 or ep < 1:
        raise ValueError(f"--dp and --ep must be positive, got dp={dp}, ep={ep}")
    if world == 1:
        if (dp or 1) > 1 or ep > 1:
            raise ValueError(f"--dp {dp or 1} --ep {ep} needs {max(dp or 1, ep)} processes; launch with "
                             f"`torchrun --nproc_per_node {max(dp or 1, ep)} -m seekling train ...`")
        return None
    if dp is not None and dp != world:
        raise ValueError(f"--dp {dp} but torchrun started {world} processes; every process is a data-parallel "
                         f"rank, so pass --dp {world} (or leave it out)")
    if world % ep:
        raise ValueError(f"--ep {ep} does not divide the world size {world}; pick an ep that divides "
                         f"--nproc_per_node x --nnodes")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = not dist.is_initialized()  # a caller's group (a test harness, a notebook) is reused and kept
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("efsdp", "ep"))
    # _flatten is how torchtitan (and DeviceMesh's tests) name a merged dimension in torch 2.x.
    dp_mesh = mesh["efsdp", "ep"]._flatten("dp")
    return Parallel(rank=dist.get_rank(), world_size=world, ep=ep, local_rank=local_rank, device=device,
                    mesh=mesh, dp_mesh=dp_mesh, owns_group=owns_group)


def close_parallel(par: Parallel | None) -> None:
    if par is not None and par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16: weights all-gathered and used in bf16, gradients reduced in fp32 onto fp32 shards.

    Inputs are not cast (cast_forward_inputs=False): the residual stream, router weights and loss
    stay under the step's autocast exactly as on one process; only the parameters travel in bf16.
    """
    if dtype == torch.float32:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def parallelize(model: nn.Module, par: Parallel, dtype: torch.dtype) -> nn.Module:
    """Apply expert parallelism (ep > 1) and FSDP2 to `model` (on par.device, same weights on every
    rank); returns the same module object, sharded."""
    if par.ep > 1:
        check_expert_parallel(model.cfg.n_routed_experts, par.ep)
        if par.device.type == "cuda" and dtype != torch.bfloat16:
            raise ValueError("expert parallelism on GPUs runs the experts with grouped_mm, which takes bf16 "
                             "only; pass --dtype bfloat16 (or auto)")
    mp = mixed_precision(dtype)
    # Experts.forward returns a view (combine drops the padding row by slicing); FSDP2 warns that an
    # in-place op on it would skip its hooks. MoE.forward only adds to it out of place (y + shared).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .*returned a view tensor")
    experts = apply_expert_parallel(model, par.mesh["ep"]) if par.ep > 1 else []
    for e in experts:
        fully_shard(e, mesh=par.mesh["efsdp"], mp_policy=mp)
        e.set_gradient_divide_factor(float(par.world_size))
    # mHC's mixing parameters are computed in fp32 whatever the step's dtype (model/mhc.py, as
    # DeepSeek-V4): sharded on their own with an fp32 policy, so bf16 mixed precision does not round
    # them on the way in. Inner modules first: the block's own unit then leaves them out.
    fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
    for m in model.modules():
        if isinstance(m, (HyperConnection, HyperHead)):
            fully_shard(m, mesh=par.dp_mesh, mp_policy=fp32)
    # Engram tables stay whole on every rank (module docstring); every unit that holds one ignores it.
    tables = {p for _, p in table_parameters(model)}
    for block in [*model.layers, *model.mtp]:
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mp, ignored_params=tables)
    # The embedding and the head are each used by the main model and every MTP depth in one forward:
    # kept unsharded until the backward (reshard_after_forward=False) rather than gathered again.
    fully_shard(model.embed, mesh=par.dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model.head, mesh=par.dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=par.dp_mesh, mp_policy=mp, ignored_params=tables)
    for method in ("hidden", "mtp_hidden"):
        register_fsdp_forward_method(model, method)
    return model


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded parameters; returns the norm before clipping (a plain tensor).

    torch's clip_grad_norm_ cannot combine DTensors of different meshes (experts live on (efsdp, ep),
    the rest on dp): the squared norms are taken per mesh, made whole across ranks, then summed.
    Sparse gradients (Engram tables, replicated and already averaged by mean_sparse_grads) are the
    same on every rank: their norm is taken locally, so it counts once, not once per rank.
    """
    params = [p for p in parameters if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    by_mesh: dict = {}
    for p in params:
        if not p.grad.is_sparse:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
    sq = [torch.linalg.vector_norm(p.grad.coalesce().values()).float() ** 2 for p in sparse]
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq.append(norm.float() ** 2)
    total = torch.stack(sq).sum().sqrt() if sq else torch.zeros(())
    for group in by_mesh.values():  # one foreach per mesh: a foreach op cannot mix meshes either
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    clip_sparse_grads_with_norm_(sparse, max_norm, total)
    return total
