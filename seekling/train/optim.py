"""AdamW with decay on matrices only, and the learning-rate schedules (warmup + cosine, or WSD).

Weight decay pulls weights toward zero; on gains (RMSNorm weights), biases and the token embedding
that only fights the scale they exist to learn, so those go in a no-decay group (as nanoGPT and
DeepSeek's released recipes do). The output head is a matrix like any other and is decayed.
mHC's mixing parameters (model/mhc.py) are not decayed either, matrices included: decay would pull
`fn` toward zero, i.e. toward stream weights that ignore the input and are set by `base` alone.
The expert-bias buffers are not parameters at all: balance.update_expert_bias moves them.

Engram tables (model/engram.py) have sparse gradients: only the rows a batch looked up. They train
with `RowSparseAdam` (lazy Adam, torch.optim.SparseAdam's update: moments and weights of the touched
rows only), so a step costs time in the rows touched, not in the table's size; fused AdamW rejects
sparse gradients anyway. `MixedOptimizer` steps both as one optimizer, with one state mapping, so the
trainer, the schedule and checkpoints see a single optimizer. Tables are not decayed (embeddings).

The schedule is a pure function of the step, so a resumed run needs only the step to continue.
Left out: Muon and other matrix optimizers; AdamW is what DeepSeek-V3 trained with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seekling.model.engram import table_parameters
from seekling.model.mhc import HyperConnection, HyperHead
from seekling.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (and stacked expert matrices) decay; norms, biases, embeddings and mHC do not."""
    decay, no_decay = [], []
    tables = {id(p) for _, p in table_parameters(model)}  # RowSparseAdam's (build_optimizer)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mhc = {id(p) for m in model.modules() if isinstance(m, (HyperConnection, HyperHead)) for p in m.parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in tables:
            continue
        if p.dim() < 2 or name.endswith(".bias") or id(p) in embeddings or id(p) in mhc:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW | MixedOptimizer:
    """AdamW over param_groups; with Engram tables, a MixedOptimizer that adds RowSparseAdam for them."""
    # fused: one kernel over all parameters. Measured on the tiny preset (13.7M parameters, 2-core
    # AVX2): ~15-20 ms per step against ~100-300 ms for foreach=True, whose multi-tensor ops each
    # sweep all parameters separately. Same update rule, deterministic on CPU.
    dense = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              fused=True)
    tables = [p for _, p in table_parameters(model) if p.requires_grad]
    if not tables:
        return dense
    return MixedOptimizer(dense, RowSparseAdam([{"params": tables, "name": "engram_tables"}], lr=cfg.lr,
                                               betas=cfg.betas, eps=cfg.eps))


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam for row-sparse gradients: torch.optim.SparseAdam's update, in index ops over the
    touched rows (tests/test_engram_model.py holds it to SparseAdam). Unlike SparseAdam, `step` is a
    tensor, so a checkpoint carries it with the moments and a resumed run repeats the same update."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    def init_state(self, p: torch.Tensor) -> dict:
        """p's state, created as zeros (step 0) if it has none: the first step's, or a checkpoint's to read into."""
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("RowSparseAdam takes sparse gradients (nn.Embedding(sparse=True)); train a "
                                     "dense parameter with AdamW")
                g = p.grad.coalesce()  # repeated rows summed: the update is not linear in them
                rows, vals = g.indices()[0], g.values()
                if rows.numel() == 0:
                    continue
                st = self.init_state(p)
                st["step"] += 1
                n = float(st["step"])
                m_old, v_old = st["exp_avg"][rows], st["exp_avg_sq"][rows]
                # SparseAdam's arithmetic, term for term: old + (new - old) * (1 - beta).
                m = (vals - m_old).mul_(1 - b1).add_(m_old)
                v = (vals * vals).sub_(v_old).mul_(1 - b2).add_(v_old)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = lr * math.sqrt(1 - b2 ** n) / (1 - b1 ** n)
                p.index_add_(0, rows, -step_size * m.div_(v.sqrt_().add_(eps)))


class MixedOptimizer:
    """A dense optimizer and a RowSparseAdam stepped as one: the parameter groups of both (so set_lr
    reaches the tables), and one `state` mapping keyed by parameter (their keys are disjoint), which
    is all the trainer and train/state.py's checkpoints use of an optimizer."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: RowSparseAdam):
        self.dense, self.sparse = dense, sparse
        sparse.state = dense.state

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups

    @property
    def state(self):
        return self.dense.state

    def step(self, closure=None):
        self.dense.step()
        self.sparse.step()

    def zero_grad(self, set_to_none: bool = True):
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    total, warmup = cfg.steps, cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
        return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # WSD (MiniCPM, DeepSeek-V3's pre-training used a constant phase then decay): hold the peak lr,
    # then decay linearly over the last `decay_fraction` of steps; a run can be extended before the decay.
    decay_steps = max(1, round(total * cfg.decay_fraction))
    start = total - decay_steps
    if step < start:
        return cfg.lr
    progress = min(1.0, (step - start + 1) / decay_steps)
    return cfg.lr + (lo - cfg.lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
