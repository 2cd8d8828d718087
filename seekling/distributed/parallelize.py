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
Left out: tensor, context and pipeline parallelism; HSDP (replicating across nodes); compiling a
sharded model (torch.compile is single-process only for now).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from seekling.distributed.expert_parallel import apply_expert_parallel, check_expert_parallel
from seekling.model.mhc import HyperConnection, HyperHead


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
    for block in [*model.layers, *model.mtp]:
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mp)
    # The embedding and the head are each used by the main model and every MTP depth in one forward:
    # kept unsharded until the backward (reshard_after_forward=False) rather than gathered again.
    fully_shard(model.embed, mesh=par.dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model.head, mesh=par.dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=par.dp_mesh, mp_policy=mp)
    for method in ("hidden", "mtp_hidden"):
        register_fsdp_forward_method(model, method)
    return model


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded parameters; returns the norm before clipping (a plain tensor).

    torch's clip_grad_norm_ cannot combine DTensors of different meshes (experts live on (efsdp, ep),
    the rest on dp): the squared norms are taken per mesh, made whole across ranks, then summed.
    """
    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict = {}
    for p in params:
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        by_mesh.setdefault(key, []).append(p)
    total_sq = None
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = norm.float() ** 2 if total_sq is None else total_sq + norm.float() ** 2
    total = total_sq.sqrt() if total_sq is not None else torch.zeros(())
    for group in by_mesh.values():  # one foreach per mesh: a foreach op cannot mix meshes either
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
