"""Expert load balancing for DeepSeekMoE training (DeepSeek-V3 section 2.1.2).

Two mechanisms, both fed by a `RouterTrace` the trainer passes into the forward:
- auxiliary-loss-free balancing: after each optimizer step, nudge each expert's selection bias
  b_i += gamma * sign(mean_load - load_i), so over-loaded experts are picked less. It changes
  which experts are chosen, never the gating weights, and adds no gradient interference.
- the complementary sequence-wise balance loss, alpha * sum_i f_i * P_i per sequence, with a tiny
  alpha (DeepSeek-V3 used 1e-4), to stop extreme imbalance inside one sequence.
"""

import torch
from torch import nn

from seekling.model.moe import Gate, RouterTrace

DEFAULT_GAMMA = 1e-3  # bias update speed (DeepSeek-V3 used 0.001 for most of pre-training)


def moe_gates(model: nn.Module) -> list[Gate]:
    """The routers of the model's MoE layers, in layer order (MTP layers last)."""
    return [m for m in model.modules() if isinstance(m, Gate)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, counts: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> None:
    """Aux-loss-free update from per-layer expert token counts (n_moe_layers, E), e.g. summed over
    the micro-batches of one optimizer step. A layer that saw no tokens is left alone."""
    gates = moe_gates(model)
    if counts.shape[0] != len(gates):
        raise ValueError(f"counts has {counts.shape[0]} layers but the model has {len(gates)} MoE routers; "
                         "pass the counts of one full forward (RouterTrace.expert_counts())")
    for gate, load in zip(gates, counts.float()):
        if load.sum() > 0:
            gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))


def sequence_balance_loss(trace: RouterTrace, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eqs. 17-20), averaged over sequences and MoE layers.

    For each sequence of T tokens and each expert i: f_i = E/(K*T) * #tokens routed to i, and
    P_i = mean over tokens of the expert's affinity normalised over all experts. Loss = alpha * sum_i f_i P_i.
    A perfectly balanced router gives alpha (f_i = 1, sum P_i = 1).
    """
    total, n = None, 0
    for _, scores, idx, _, (B, T) in trace.layers:
        E, K = scores.shape[-1], idx.shape[-1]
        s = scores.view(B, T, E)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # (B,E)
        hits = torch.zeros(B, E, device=s.device).scatter_add_(
            1, idx.view(B, T * K), torch.ones(B, T * K, device=s.device))
        f = hits * (E / (K * T))  # (B,E), no gradient: a count
        loss = (f * p).sum(-1).mean()
        total = loss if total is None else total + loss
        n += 1
    if total is None:
        return torch.zeros(())
    return alpha * total / n
