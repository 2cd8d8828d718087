"""GRPO rollouts: G sampled completions per prompt through the engine, scored, turned into micro-batches.

    rollout = sample_groups(engine, tokenizer, task, problems, SamplingSpec(group_size=8, max_tokens=128), seed=s)
    adv, zero_var = group_advantages(rollout.rewards)
    batches = micro_batches(rollout, adv.flatten(), keep, size=32, pad_id=tokenizer.pad_id)

Sampling goes through the one engine (continuous batching over every completion of the step at
once), on the very parameters being trained. Each completion has its own seed, a function of the
run's seed, the step, the prompt and the completion's place in its group: a resumed run samples
the same completions, and a completion does not depend on what else is in the batch.

A sequence is prompt + completion exactly as the engine produced them, the stop token included:
ending the turn is one of the policy's decisions and is trained like any other token. The engine
reports each sampled token's log-probability under the raw logits in fp32 (`RequestOutput.logprobs`),
which is what `grpo.token_logprobs` computes on the training side; the loss logs the gap between them.
Left out: the advantages and the loss (grpo.py) and when to sample (the driver, rl.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seekling.inference.engine import Engine, RequestOutput
from seekling.inference.sampling import SamplingParams
from seekling.r1.evaluate import completion_text
from seekling.r1.tasks import Problem, Score, Task


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """How a rollout samples: G completions per prompt at this temperature, at most max_tokens each."""

    group_size: int = 8
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Rollout:
    """One step's sampled groups, in group-major order: completion g of prompt j is at j * G + g."""

    problems: list[Problem]  # P
    prompts: list[list[int]]  # P prompt token ids
    outputs: list[RequestOutput]  # P * G
    scores: list[Score]  # P * G
    group_size: int

    @property
    def rewards(self) -> torch.Tensor:
        """(P, G) fp32 rewards."""
        return torch.tensor([s.reward for s in self.scores], dtype=torch.float32).view(-1, self.group_size)

    def stats(self) -> dict:
        """What a driver logs about the samples: reward, accuracy, format rate, lengths, how they ended."""
        n = len(self.scores)
        lengths = [len(o.output_ids) for o in self.outputs]
        return {"reward": sum(s.reward for s in self.scores) / n,
                "accuracy": sum(s.correct for s in self.scores) / n,
                "well_formed": sum(s.well_formed for s in self.scores) / n,
                "response_len": sum(lengths) / n, "response_len_max": max(lengths),
                "truncated_frac": sum(o.finish_reason == "length" for o in self.outputs) / n}


def completion_seed(seed: int, step: int, prompt: int, sample: int, group_size: int) -> int:
    """The sampling seed of one completion: distinct across (step, prompt, sample), the same on resume."""
    return ((seed * 1_000_003 + step) * 100_003 + prompt) * group_size + sample


def sample_groups(engine: Engine, tokenizer, task: Task, problems: list[Problem], spec: SamplingSpec, *,
                  seed: int, step: int) -> Rollout:
    """Sample spec.group_size completions for each problem in one engine call, and score them."""
    prompts = [tokenizer.apply_chat_template(task.prompt_messages(p)) for p in problems]
    stop = (tokenizer.eot_id, tokenizer.eos_id)
    G = spec.group_size
    params = [SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                             stop_token_ids=stop, seed=completion_seed(seed, step, j, g, G))
              for j in range(len(problems)) for g in range(G)]
    outputs = engine.generate([prompts[j] for j in range(len(problems)) for _ in range(G)], params)
    scores = [task.check(problems[i // G], completion_text(tokenizer, out)) for i, out in enumerate(outputs)]
    return Rollout(problems=problems, prompts=prompts, outputs=outputs, scores=scores, group_size=G)


def micro_batches(rollout: Rollout, advantages: torch.Tensor, keep: list[int], size: int, pad_id: int) -> list[dict]:
    """The kept completions (indices into rollout.outputs) as GRPO micro-batches of at most `size` sequences.

    Each micro-batch is right-padded to its own longest sequence, and the completions are grouped
    by length first: one completion that ran to max_tokens would otherwise pad the 31 others of its
    micro-batch to its length (on the recipe's task, ~45 prompt + 128 tokens where most sequences
    are ~80: twice the tokens through the update).
    The order costs nothing in exactness: the loss of a step is normalised by the step's own counts
    (grpo.share_step_tokens), so how its sequences are split into micro-batches leaves the gradient
    unchanged. A batch carries input_ids, completion_mask, advantages and sampler_logp (the engine's
    log-probabilities, which the loss compares with the trainer's own; grpo.grpo_loss_fn says why
    the ratio does not use them).
    """
    G = rollout.group_size
    keep = sorted(keep, key=lambda i: len(rollout.prompts[i // G]) + len(rollout.outputs[i].output_ids))
    out = []
    for start in range(0, len(keep), size):
        rows = keep[start:start + size]
        seqs = [(rollout.prompts[i // G], rollout.outputs[i]) for i in rows]
        T = max(len(p) + len(o.output_ids) for p, o in seqs)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        sampler = torch.zeros(len(rows), T, dtype=torch.float32)
        for r, (prompt, o) in enumerate(seqs):
            n, m = len(prompt), len(o.output_ids)
            ids[r, :n] = torch.tensor(prompt)
            ids[r, n:n + m] = torch.tensor(o.output_ids)
            mask[r, n:n + m] = True
            sampler[r, n:n + m] = torch.tensor(o.logprobs, dtype=torch.float32)
        out.append({"input_ids": ids, "completion_mask": mask, "sampler_logp": sampler,
                    "advantages": advantages[rows].float()})
    return out
