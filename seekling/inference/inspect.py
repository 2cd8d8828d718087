"""Which experts each token visits: a routing table from one forward, and a PNG heatmap of it.

Shapes: T prompt tokens, L MoE layers, K experts per token (top-k), E routed experts.

`route_table` runs the main model once over a prompt with a `RouterTrace` and returns, per token
and MoE layer, the chosen experts, their gating weights (after normalisation and route_scale,
exactly what multiplies each expert's output) and the full sigmoid affinities. It is what
`seekling inspect` prints; `write_heatmap` draws one panel per layer, tokens down, experts across.
Left out: the MTP layers' routing (they run only while drafting) and batches of prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from seekling.model.moe import RouterTrace


@dataclass(frozen=True)
class RouteTable:
    token_ids: list[int]
    layers: list[int]  # MoE layer ids, in model order
    experts: torch.Tensor  # (T, L, K) routed expert ids, best first
    weights: torch.Tensor  # (T, L, K) fp32 gating weights
    scores: torch.Tensor  # (T, L, E) fp32 sigmoid affinities (before the balance bias)

    @property
    def n_experts(self) -> int:
        return self.scores.shape[-1]

    def expert_load(self) -> torch.Tensor:
        """(L, E) tokens routed to each expert in each layer."""
        return torch.stack([torch.bincount(self.experts[:, i].flatten(), minlength=self.n_experts)
                            for i in range(len(self.layers))])

    def dense_weights(self) -> torch.Tensor:
        """(L, T, E) gating weight of every expert for every token, 0 where not routed."""
        T, L, _ = self.experts.shape
        dense = torch.zeros(T, L, self.n_experts, device=self.weights.device)
        dense.scatter_(2, self.experts, self.weights)
        return dense.transpose(0, 1)

    def to_dict(self) -> dict:
        """JSON-ready: for every token, per MoE layer, the [expert, weight] pairs."""
        return {"layers": self.layers, "n_experts": self.n_experts, "tokens": [
            {"id": tok, "routes": {str(layer): [[int(e), round(float(w), 6)] for e, w in
                                                zip(self.experts[t, i], self.weights[t, i])]
                                   for i, layer in enumerate(self.layers)}}
            for t, tok in enumerate(self.token_ids)]}


@torch.inference_mode()
def route_table(model, ids) -> RouteTable:
    """Run `ids` (a list of token ids, or a (T,) / (1,T) tensor) through the model and record its routing."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=next(model.parameters()).device).reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("route_table needs at least one token")
    if ids.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"{ids.shape[1]} tokens exceed the model's max_seq_len ({model.cfg.max_seq_len})")
    if not model.cfg.has_moe:
        raise ValueError("this model has no MoE layers (n_dense_layers == n_layers): there is no routing to show")
    trace = RouterTrace()
    model(ids, trace=trace)
    layers = [rec[0] for rec in trace.layers]
    experts = torch.stack([rec[2].cpu() for rec in trace.layers], dim=1)
    weights = torch.stack([rec[3].float().cpu() for rec in trace.layers], dim=1)
    scores = torch.stack([rec[1].float().cpu() for rec in trace.layers], dim=1)
    return RouteTable(token_ids=ids[0].tolist(), layers=layers, experts=experts, weights=weights, scores=scores)


def write_heatmap(table: RouteTable, path, decode: Callable[[list[int]], str] | None = None,
                  max_labels: int = 64) -> Path:
    """Draw the routing weights (one panel per MoE layer) to a PNG; returns the path written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    path = Path(path)
    dense = table.dense_weights().numpy()  # (L, T, E)
    L, T, E = dense.shape
    labels = [decode([t]) if decode else str(t) for t in table.token_ids]
    labels = [repr(s)[1:-1] if decode else s for s in labels]  # show whitespace and newlines
    fig, axes = plt.subplots(1, L, figsize=(1.2 + 0.28 * E * L + 1.5, 1.5 + 0.2 * min(T, 200)), squeeze=False,
                             sharey=True)
    vmax = float(dense.max()) or 1.0
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(dense[i], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {table.layers[i]}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(0, E, max(1, E // 8)))
        ax.tick_params(labelsize=7)
    step = max(1, T // max_labels)  # keep tick labels legible on long prompts
    axes[0][0].set_yticks(range(0, T, step), labels[::step])
    fig.colorbar(im, ax=axes[0].tolist(), label="gating weight", shrink=0.8)
    fig.suptitle("routed experts per token", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:  # written aside and renamed, so a crash never leaves a truncated PNG
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
