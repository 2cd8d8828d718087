"""The GRPO objective: group-relative advantages and the clipped policy-gradient loss, as a TrainStep loss.

Shapes: B completions (sequences), T tokens (prompt + completion, right-padded), G completions per
prompt, V vocabulary.

    adv, zero_var = group_advantages(rewards.view(n_prompts, G))          # (n_prompts, G) each
    step = TrainStep(model, optimizer, grpo_loss_fn(cfg), StepConfig())
    step(share_step_tokens([batch0, batch1]))                             # one optimizer step

Per completion token t of sequence i, with ratio r = exp(logp - old_logp) and advantage A_i:
    objective = min(r * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i)      (PPO / DeepSeekMath eq. 3)
    loss      = -objective + beta * (exp(ref - logp) - (ref - logp) - 1)        (k3 KL estimator, Schulman 2020)
aggregated by `loss_type`:
    grpo     mean over each sequence's tokens, then over sequences (DeepSeekMath; long answers weigh less per token)
    dapo     sum over every token / the step's completion tokens (DAPO section 3.3: token-level)
    dr_grpo  sum over every token / (sequences * max_completion_len) (Dr. GRPO, Liu et al. 2025: a constant)

`old_logp` is the log-probability under the weights that sampled the batch, computed by the trainer
(`token_logprobs`, or the current forward detached on a batch's first update; see grpo_loss_fn).
The engine reports the same quantity while sampling (`RequestOutput.logprobs`: fp32 log-softmax of
the raw logits); the tests pin the two within 1e-5 in fp32, and the driver logs their gap.

Left out, on purpose: rollouts, rewards and the driver loop (the caller owns them: this file is the
loss only); a value model (GRPO's point is that the group mean replaces it); entropy bonuses and
sequence-level importance ratios (GSPO), which no peer we follow uses by default; a reference
model (the driver computes `ref_logp` with `token_logprobs` on a frozen copy when beta > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seekling.model.moe import RouterTrace
from seekling.train.core import LossFn, LossOutput

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4):
    """Advantages (n_groups, G) fp32 and a (n_groups,) zero-variance mask, on the CPU, from rewards (n_groups, G).

    scale=True (GRPO): (r - group mean) / (group std + eps); scale=False (Dr. GRPO, nanochat): r - mean.
    The std is the population std (divide by G, not G-1; TRL's torch.std divides by G-1): each
    group's advantages then have unit root-mean-square whatever G is, where G-1 would shrink them by
    sqrt((G-1)/G) (0.71 at G=2, 0.87 at G=4), so changing G would not silently rescale the step.
    eps = 1e-4 as TRL: it bounds |A| when rewards differ by less than eps.
    A group whose rewards are all equal carries no signal: its advantages are set to exactly 0 (the
    float mean of equal values need not equal them, e.g. three 0.1s), and it is reported in the
    mask so the driver can log the fraction and, with `skip_zero_variance_groups`, not train on it.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (n_groups, G) with G >= 2 completions per prompt, "
                         f"got {tuple(rewards.shape)}")
    # fp64 on the host: rewards come from the task checkers as Python floats (and MPS has no fp64);
    # the advantages go to the model's device with the rest of the batch.
    r = rewards.detach().to("cpu", torch.float64)
    zero_var = (r == r[:, :1]).all(dim=1)
    centred = r - r.mean(dim=1, keepdim=True)
    adv = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps) if scale else centred
    adv = torch.where(zero_var[:, None], torch.zeros_like(adv), adv)
    return adv.float(), zero_var


@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """The GRPO objective's dials; defaults are TRL's GRPOTrainer (beta 0, symmetric clip 0.2)."""

    epsilon: float = 0.2  # lower clip: ratio below 1 - epsilon stops pushing a negative-advantage token down
    epsilon_high: float | None = None  # upper clip; None = epsilon. DAPO's clip-higher uses 0.28
    loss_type: str = "grpo"  # "grpo", "dr_grpo" or "dapo" (see the module docstring)
    beta: float = 0.0  # KL-to-reference coefficient; 0 (TRL, DAPO, Dr. GRPO) needs no reference model
    scale_rewards: bool | None = None  # divide by the group std; None = True for grpo and dapo, False for dr_grpo
    # Zero-variance groups have advantage 0 and give no policy gradient either way, but they still
    # count in the normaliser (dilute the mean) and cost a forward and backward; skipping them is
    # DAPO's dynamic sampling. Off by default: every peer default keeps them.
    skip_zero_variance_groups: bool = False
    max_completion_len: int | None = None  # dr_grpo's constant normaliser; required for dr_grpo
    # The sampling temperature: the policy whose ratio is taken is softmax(logits / temperature),
    # the distribution the completions were drawn from (as TRL does).
    temperature: float = 1.0
    # Weight of negative advantages (1 = plain GRPO). Pushing a wrong completion's tokens down frees
    # probability for every other token, not only for the right one; in a small model that mass
    # raises the entropy everywhere (measured on 2-digit addition: after three lr-1e-4 steps on one
    # batch the correct completions' log-probability fell too). Below 1 the update leans on the
    # correct completions (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement
    # in LLM Reasoning", weigh the two sides the same way, to the other end). Measured from a 52.5%
    # SFT model, lr 1e-4 after 30 warmup steps: held-out pass@1 36.5% after 60 steps at weight 1,
    # 52.0% at 0.3.
    negative_weight: float = 1.0

    def __post_init__(self):
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon)
        if self.scale_rewards is None:
            # Dr. GRPO: dividing by the std weights near-unanimous groups more (a difficulty bias); it drops it.
            object.__setattr__(self, "scale_rewards", self.loss_type != "dr_grpo")
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1):
            raise ValueError(f"GRPOConfig.epsilon: must be in (0, 1) (e.g. 0.2), got {self.epsilon!r}")
        if not (isinstance(self.epsilon_high, (int, float)) and self.epsilon_high > 0):
            raise ValueError(f"GRPOConfig.epsilon_high: must be > 0 (e.g. 0.28, or None for epsilon), "
                             f"got {self.epsilon_high!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type: must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ValueError(f"GRPOConfig.beta: must be >= 0 (0 disables the KL term), got {self.beta!r}")
        for f in ("scale_rewards", "skip_zero_variance_groups"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"GRPOConfig.{f}: must be True or False, got {getattr(self, f)!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
            raise ValueError(f"GRPOConfig.temperature: must be > 0 (the rollouts' sampling temperature), got {t!r}")
        w = self.negative_weight
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1):
            raise ValueError(f"GRPOConfig.negative_weight: must be in [0, 1] (1 = plain GRPO), got {w!r}")
        m = self.max_completion_len
        if m is not None and not (isinstance(m, int) and m > 0):
            raise ValueError(f"GRPOConfig.max_completion_len: must be a positive integer, got {m!r}")
        if self.loss_type == "dr_grpo" and m is None:
            raise ValueError("GRPOConfig.max_completion_len: dr_grpo divides by sequences * max_completion_len; "
                             "set it to the sampling max_tokens")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOConfig, ref_logp: torch.Tensor | None = None, num_tokens: float | torch.Tensor | None = None,
                num_sequences: float | None = None):
    """The clipped GRPO loss over (B, T) per-token log-probabilities; returns (loss, detached stats).

    `num_tokens` replaces the local completion-token count as dapo's denominator, `num_sequences`
    the local sequence count B as grpo's and dr_grpo's (share_step_tokens says how gradient
    accumulation uses them). Stats: clip_frac (tokens whose clipped term was selected:
    r > 1 + epsilon_high with A > 0, or r < 1 - epsilon with A < 0; such a token has no policy
    gradient), clip_low_frac and clip_high_frac (the two sides), ratio_mean, kl (mean k3 to the
    reference, only when ref_logp is given) and tokens (the local completion-token count).
    """
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError("GRPOConfig.beta > 0 needs ref_logp: the reference model's token_logprobs for the same batch")
    mask = mask.bool()
    adv = advantages.float()[:, None]  # (B, 1)
    if cfg.negative_weight != 1.0:
        adv = torch.where(adv < 0, adv * cfg.negative_weight, adv)
    # Zero the log-ratio off the mask: padding and prompt positions may hold anything, and exp() of
    # garbage would put inf * 0 = nan into the sums.
    log_ratio = torch.where(mask, logp.float() - old_logp.float(), 0.0)
    ratio = log_ratio.exp()  # (B, T)
    clipped = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref_logp is not None:
        d = torch.where(mask, ref_logp.float() - logp.float(), 0.0)
        kl = d.exp() - d - 1  # k3: unbiased for KL(pi || ref), always >= 0
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
    per_token = per_token * mask
    n_tok = mask.sum()
    n_seq = num_sequences if num_sequences is not None else mask.shape[0]
    if cfg.loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seq
    elif cfg.loss_type == "dapo":
        loss = per_token.sum() / (num_tokens if num_tokens is not None else n_tok.clamp(min=1))
    else:
        loss = per_token.sum() / (n_seq * cfg.max_completion_len)

    with torch.no_grad():
        denom = n_tok.clamp(min=1).float()
        low = mask & (ratio < 1 - cfg.epsilon) & (adv < 0)
        high = mask & (ratio > 1 + cfg.epsilon_high) & (adv > 0)
        stats = {"clip_frac": (low | high).sum() / denom, "clip_low_frac": low.sum() / denom,
                 "clip_high_frac": high.sum() / denom, "ratio_mean": (ratio * mask).sum() / denom,
                 "tokens": n_tok.float()}
        if kl is not None:
            stats["kl"] = (kl * mask).sum() / denom
    return loss, stats


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                   trace: RouterTrace | None = None, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) fp32 log-probability of each masked token given its prefix; 0 off the mask.

    As the engine computes it: log_softmax(logits at t-1)[token t] in fp32 over the raw logits
    (divided by `temperature` when it is not 1). Only the masked rows go through the output head
    (prompts cost no (tokens, V) logits).
    """
    mask = completion_mask.bool()
    if mask[:, 0].any():
        raise ValueError("completion_mask marks position 0, which has no prefix to predict it from; "
                         "a completion follows at least one prompt token")
    h = model.hidden(input_ids, trace=trace)  # (B, T, D)
    # nonzero has a data-dependent size: under StepConfig(compile=True) the graph breaks here, which
    # costs a little speed and nothing in correctness; the (B, T, V) logits of every prompt token cost more.
    b, t = mask[:, 1:].nonzero(as_tuple=True)  # the (row, position - 1) of each completion token
    logits = model.head(h[b, t])  # (N, V): position t-1 predicts token t
    if temperature != 1.0:
        logits = logits.float() / temperature
    picked = torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, input_ids[b, t + 1][:, None])[:, 0]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=input_ids.device)
    return out.index_put((b, t + 1), picked)


def share_step_tokens(micro_batches: list[dict]) -> list[dict]:
    """Copies of one optimizer step's micro-batches that carry the step's completion-token and sequence counts.

    TrainStep backpropagates loss / n_micro for each micro-batch, so dapo's loss is
    sum / (num_tokens_in_step / micro_batches_in_step): the accumulated gradient is then exactly the
    gradient of sum over the step / num_tokens_in_step, as one big batch would give. grpo and
    dr_grpo divide by sequences_in_step / micro_batches_in_step the same way, so micro-batches of
    unequal sizes (the last one of a rollout, or after zero-variance groups were skipped) weigh each
    sequence equally. With data parallelism (gradients averaged over ranks) a driver all-reduces
    the two counts and multiplies micro_batches_in_step by the number of ranks.
    """
    total = sum(int(mb["completion_mask"].bool().sum()) for mb in micro_batches)
    seqs = sum(int(mb["completion_mask"].shape[0]) for mb in micro_batches)
    return [{**mb, "num_tokens_in_step": total, "sequences_in_step": seqs, "micro_batches_in_step": len(micro_batches)}
            for mb in micro_batches]


def grpo_loss_fn(cfg: GRPOConfig) -> LossFn:
    """A TrainStep loss over GRPO micro-batches.

    A batch is a dict: input_ids (B, T), completion_mask (B, T), advantages (B,), and optionally
    old_logp (B, T), ref_logp (B, T), sampler_logp (B, T) and the step's counts from `share_step_tokens`.
    - Without old_logp the batch is taken as sampled by the weights being updated (the first of its
      updates): old_logp is then the trainer's own log-probability, detached, which makes the ratio
      exactly 1 with no extra forward pass, in any compute dtype.
    - sampler_logp (what the engine reported) is compared, not used: the stat sampler_gap is the
      mean |trainer - sampler| log-probability, the train/inference mismatch that bf16 autocast or
      a different kernel brings (the engine reports raw-logit log-probabilities, so at a temperature
      other than 1 the gap also holds the temperature's effect).
    - Without the step's counts each micro-batch normalises by its own tokens (dapo) or sequences
      (grpo, dr_grpo): exact for a single micro-batch, and for grpo and dr_grpo whenever the
      micro-batches hold equal numbers of sequences.
    """

    def loss_fn(model, batch, trace):
        mask = batch["completion_mask"]
        logp = token_logprobs(model, batch["input_ids"], mask, trace, cfg.temperature)
        old_logp = batch.get("old_logp")
        if old_logp is None:
            old_logp = logp.detach()
        num_tokens = num_sequences = None
        if "num_tokens_in_step" in batch:
            num_tokens = max(batch["num_tokens_in_step"], 1) / batch["micro_batches_in_step"]
        if "sequences_in_step" in batch:
            num_sequences = batch["sequences_in_step"] / batch["micro_batches_in_step"]
        loss, stats = policy_loss(logp, old_logp, batch["advantages"], mask, cfg,
                                  ref_logp=batch.get("ref_logp"), num_tokens=num_tokens, num_sequences=num_sequences)
        if "sampler_logp" in batch:
            with torch.no_grad():
                gap = (logp.detach() - batch["sampler_logp"]).abs() * mask
                stats["sampler_gap"] = gap.sum() / mask.sum().clamp(min=1)
        return LossOutput(loss, {"loss": loss.detach(), **stats})

    return loss_fn
