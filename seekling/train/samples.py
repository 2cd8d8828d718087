"""Short text samples during training, to see a model learn.

Deliberately the simplest correct decoder: no KV cache, the whole window re-run for every new
token (a few milliseconds per token for the tiny model), greedy at temperature 0 and plain
softmax sampling from a seeded generator otherwise. Real generation - cached, batched, with
top-k/top-p and stop strings - is the inference engine's job; this only needs to be obviously right.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, seed: int = 0) -> str:
    """The prompt's continuation (text only, prompt excluded); stops early at end-of-text or end-of-turn."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    stop = {tokenizer.eos_id, tokenizer.eot_id}
    window = model.cfg.max_seq_len
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            x = torch.tensor([(ids + new)[-window:]], device=device)
            logits = model(x)[0, -1].float().cpu()
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            if token in stop:
                break
            new.append(token)
    finally:
        model.train(was_training)
    return tokenizer.decode(new, skip_special=True)
