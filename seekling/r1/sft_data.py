"""Cold-start SFT data: a task's worked solutions as chat turns, with targets on the assistant's tokens only.

    examples = sft_examples(task, tokenizer, n=2000, seed=0)       # train split only
    x, y = collate(examples[:8], tokenizer.pad_id)                  # (B, T) ids, (B, T) targets, -100 = no loss

An example is the chat that `task.sft_messages` gives (system, user, then an assistant turn whose
`reasoning_content` renders as `<think>...</think>` before the answer), tokenized by the chat
template. Its prompt is the same chat up to the `<|assistant|>` marker, exactly what generation
starts from, so SFT teaches the completion a rollout will be scored on: `<think>` reasoning
`</think>` answer `<|end_of_turn|>` (the end-of-turn is a target too, so the model learns to stop).
Prompt and padding positions carry -100, which `train.core.next_token_loss` ignores: the masked SFT
loss is the pretraining loss with those targets.
Left out: packing several examples into one row (examples are short and of similar length).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from seekling.r1.tasks import Task

IGNORE = -100  # cross_entropy's ignore_index


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # the whole chat, assistant turn included
    n_prompt: int  # tokens up to and including <|assistant|>: no loss on them


def sft_example(task: Task, problem, tokenizer) -> Example:
    """One problem's worked solution as token ids, with the prompt length."""
    prompt = tokenizer.apply_chat_template(task.prompt_messages(problem), add_generation_prompt=True)
    full = tokenizer.apply_chat_template(task.sft_messages(problem), add_generation_prompt=False)
    if full[:len(prompt)] != prompt:  # the chat template changed so that a prompt is no longer a prefix
        raise ValueError(f"{problem.id}: the SFT chat does not start with the generation prompt; "
                         "the chat template and Task.sft_messages disagree")
    return Example(ids=tuple(full), n_prompt=len(prompt))


def sft_examples(task: Task, tokenizer, n: int, seed: int = 0) -> list[Example]:
    """n examples from the task's train split (never the held-out one), a pure function of (task, n, seed)."""
    return [sft_example(task, p, tokenizer) for p in task.problems("train", n, seed)]


def collate(examples: list[Example], pad_id: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs x (B, T) and targets y (B, T): y[t] = ids[t+1] on assistant tokens, else -100."""
    if not examples:
        raise ValueError("collate needs at least one example")
    longest = max(len(e.ids) for e in examples) - 1
    if max_len is not None and longest > max_len:
        raise ValueError(f"an example has {longest + 1} tokens, more than max_len + 1 = {max_len + 1}; "
                         "raise the model's max_seq_len or pick easier task knobs")
    x = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    y = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, e.n_prompt - 1:len(ids) - 1] = ids[e.n_prompt:]  # position t predicts token t+1
    return x, y


def batch_order(n_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: epochs of seeded shuffles, a pure function of the step
    (so a resumed run sees the same batches, as pretraining's TrainLoader does)."""
    first = step * batch_size
    return [example_at(n_examples, pos, seed) for pos in range(first, first + batch_size)]


def example_at(n_examples: int, position: int, seed: int) -> int:
    """The example at `position` of the seeded stream that batch_order slices (epoch after epoch)."""
    return _permutation(n_examples, seed, position // n_examples)[position % n_examples]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(f"sft/{seed}/{epoch}").shuffle(perm)  # a string seed: stable across processes
    return tuple(perm)
