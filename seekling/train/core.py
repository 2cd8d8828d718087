"""The training step every driver shares: pretraining (one process or torchrun), SFT and RL.

    step = TrainStep(model, optimizer, next_token_loss(mtp_lambda=0.3), StepConfig(dtype=torch.float32))
    metrics = step([batch0, batch1], lr=3e-3)     # one optimizer step over two micro-batches

One step: for each micro-batch, forward and loss under the compute dtype's autocast (the loss is a
plug-in: next-token CE with MTP for pretraining, the same CE over masked targets for SFT, a policy-
gradient loss for RL), backward of loss / n_micro; then clip (sparse gradients of Engram tables
included: clip_grad_norm_with_sparse), optimizer step, zero the grads, and
the aux-loss-free expert-bias update from the routing counts of the whole step (DeepSeek-V3 updates
the bias "at the end of each step"; summed over micro-batches, accumulation sees one update, as a
bigger batch would). A distributed driver passes four hooks: `reduce_counts` (an all-reduce of
the (layers, E) counts) so that every rank applies the same update, `reduce_metrics` (the mean of
the logged scalars over ranks), `reduce_grads` (after the last backward, for gradients the sharding
does not reduce: the replicated Engram tables') and `clip_grad_norm` (for gradients sharded over
several meshes); without them the step has no distributed code at all.

Compilation is applied by wrapping: `StepConfig(compile=True)` compiles the loss function (the
model's forward inlined into it), and the model's modules are never replaced or patched. The
engine, evaluation and checkpoints use the very same parameters through the plain modules, so a
model being trained can be sampled from at any time without recompiling anything.
Left out: the learning-rate schedule (the driver passes lr; schedules live in optim.py) and data
loading (drivers hand over micro-batches; tensors are moved to the model's device here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seekling.device import keep_freed_memory
from seekling.model.moe import RouterTrace
from seekling.train.balance import moe_gates, sequence_balance_loss, update_expert_bias
from seekling.train.optim import set_lr
from seekling.validate import checker


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch: the tensor to differentiate, and the
    detached scalars to log (averaged over micro-batches by the step)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# loss_fn(model, batch, trace) -> LossOutput; `batch` is whatever the driver's loader yields.
LossFn = Callable[[nn.Module, object, RouterTrace | None], LossOutput]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # log_softmax casts bf16 logits to fp32 inside its kernel: the same numbers as cross_entropy on
    # logits.float(), without writing and re-reading an fp32 copy of the (tokens, V) logits.
    return F.nll_loss(F.log_softmax(logits.flatten(0, 1), dim=-1, dtype=torch.float32), targets.flatten())


def next_token_loss(mtp_lambda: float = 0.0, seq_aux_alpha: float = 0.0) -> LossFn:
    """Next-token cross-entropy (+ mtp_lambda * mean MTP CE, + the sequence-wise balance loss).

    The batch is (x, y) token ids (B, T). Targets equal to -100 are ignored (cross_entropy's
    ignore_index), which is all a masked SFT loss needs: only assistant tokens carry targets.
    """

    def loss_fn(model, batch, trace):
        x, y = batch
        h = model.hidden(x, trace=trace)
        main = _cross_entropy(model.head(h), y)
        loss, metrics = main, {"loss": main.detach()}
        if mtp_lambda > 0 and model.cfg.n_mtp_layers > 0:
            # depth k's hidden at position i predicts token i+k+1, which is y[:, i+k]
            depths = model.mtp_hidden(h, x, trace)
            mtp = sum(_cross_entropy(model.head(hk), y[:, k:]) for k, hk in enumerate(depths, start=1)) / len(depths)
            loss = loss + mtp_lambda * mtp
            metrics["mtp_loss"] = mtp.detach()
        if seq_aux_alpha > 0 and trace is not None and trace.layers:
            loss = loss + sequence_balance_loss(trace, seq_aux_alpha)
        return LossOutput(loss, metrics)

    return loss_fn


def autocast(dtype: torch.dtype, device: torch.device):
    """bf16 autocast with fp32 master weights, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch, device: torch.device):
    """Move every tensor of a (nested tuple/list/dict) batch to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def clip_grad_norm_with_sparse(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (2-norm, foreach), where sparse gradients (Engram tables) count too.

    clip_grad_norm_ has no sparse kernel for the norm. A sparse gradient's norm is that of its
    coalesced values (a row looked up twice holds one summed gradient), so it is coalesced in place,
    its values' norm joins the others', and it is scaled by the same coefficient as clip_grad_norm_'s.
    """
    params = [p for p in params if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    for p in sparse:
        p.grad = p.grad.coalesce()
    dense = [p for p in params if not p.grad.is_sparse]
    norms = [torch.linalg.vector_norm(p.grad.values()) for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense], foreach=True))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total, foreach=True)
    clip_sparse_grads_with_norm_(sparse, max_norm, total)
    return total


def clip_sparse_grads_with_norm_(sparse: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale sparse gradients by clip_grads_with_norm_'s coefficient for the global norm `total`
    (max_norm / (total + 1e-6), never above 1), which torch's has no sparse kernel for."""
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in sparse:
        p.grad = p.grad * coef


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """How one optimizer step runs; what it optimizes is the model, optimizer and loss passed beside it."""

    dtype: torch.dtype = torch.float32  # compute dtype: bf16 autocast over fp32 master weights, or fp32
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    bias_update_gamma: float = 0.0  # aux-loss-free balancing speed; 0 turns it off
    compile: bool = False  # torch.compile the loss function (the model's forward inside it), by wrapping

    def __post_init__(self):
        need = checker("StepConfig")
        need(self.dtype in (torch.float32, torch.bfloat16), "dtype", f"must be torch.float32 or torch.bfloat16, got {self.dtype}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.bias_update_gamma >= 0, "bias_update_gamma", f"must be >= 0 (0 disables it), got {self.bias_update_gamma}")
        need(isinstance(self.compile, bool), "compile", f"must be True or False, got {self.compile!r}")


class TrainStep:
    """One optimizer step over a list of micro-batches; returns the step's metrics.

    Metrics: every key a loss reported, averaged over micro-batches (as Python floats), plus
    `grad_norm` (before clipping) and `expert_load` ((MoE layers, E) token counts, summed over the
    step and, with `reduce_counts`, over ranks) for a model with experts.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 config: StepConfig | None = None, *,
                 reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reduce_metrics: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reduce_grads: Callable[[Iterable[torch.Tensor]], None] | None = None,
                 clip_grad_norm: Callable[[Iterable[torch.Tensor], float], torch.Tensor] | None = None):
        self.model, self.optimizer, self.config = model, optimizer, config or StepConfig()
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()  # activations reuse freed memory instead of fresh pages each step
        self.n_gates = len(moe_gates(model))
        self.n_experts = getattr(model.cfg, "n_routed_experts", 0)
        self.reduce_counts, self.reduce_metrics, self.reduce_grads = reduce_counts, reduce_metrics, reduce_grads
        self.clip_grad_norm = clip_grad_norm or clip_grad_norm_with_sparse
        if self.config.compile and any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules()):
            raise ValueError("StepConfig.compile: this model has sparse-gradient embeddings (Engram tables), which "
                             "Inductor cannot compile (torch 2.13); train it with compile=False")
        # A wrapper, not model.compile(): the caller's modules stay as they were, so the engine and
        # evaluation run the plain forward over the same parameters.
        self.loss_fn = torch.compile(loss_fn) if self.config.compile else loss_fn

    def __call__(self, micro_batches: Sequence, lr: float | None = None) -> dict:
        if not micro_batches:
            raise ValueError("TrainStep needs at least one micro-batch")
        cfg, model = self.config, self.model
        if lr is not None:
            set_lr(self.optimizer, lr)
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(self.n_gates, self.n_experts, dtype=torch.long, device=self.device) if self.n_gates else None
        for batch in micro_batches:
            trace = RouterTrace() if self.n_gates else None
            with autocast(cfg.dtype, self.device):
                out = self.loss_fn(model, to_device(batch, self.device), trace)
            (out.loss / len(micro_batches)).backward()
            for k, v in out.metrics.items():
                # summed in fp32 on the CPU, in micro-batch order: the logged values are bit-stable
                sums[k] = sums.get(k, torch.zeros(())) + v.detach().float().cpu()
            if trace is not None and trace.layers:
                c = trace.expert_counts()
                counts[: c.shape[0]] += c  # MTP routers see no tokens when the MTP loss is off
        if self.reduce_grads is not None:
            self.reduce_grads(model.parameters())
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = self.clip_grad_norm(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if counts is not None and self.reduce_counts is not None:
            counts = self.reduce_counts(counts)
        if counts is not None and cfg.bias_update_gamma > 0:
            update_expert_bias(model, counts, cfg.bias_update_gamma)
        if sums and self.reduce_metrics is not None:  # one collective for every logged scalar, in key order
            keys = sorted(sums)
            sums = dict(zip(keys, self.reduce_metrics(torch.stack([sums[k] for k in keys]).to(self.device)).cpu()))
        metrics = {k: v.item() / len(micro_batches) for k, v in sums.items()}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.item()
        if counts is not None:
            metrics["expert_load"] = counts.tolist()
        return metrics


@torch.no_grad()
def evaluate(model: nn.Module, batches, dtype: torch.dtype) -> tuple[float, int]:
    """Summed next-token loss (nats, fp64) over (x, y) batches, and the number of scored targets."""
    device = next(model.parameters()).device
    total, n = torch.zeros((), dtype=torch.float64), 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(dtype, device):
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double().cpu()
        n += int((y != -100).sum())
    return total.item(), n
