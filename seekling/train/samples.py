"""Short text samples during training, to see a model learn.

Generated through the inference engine, like every other caller (CLI, server, RL), with a cache
sized for this one request so that sampling mid-training costs little memory.
"""

from __future__ import annotations

from seekling.inference.engine import Engine, EngineConfig
from seekling.inference.sampling import SamplingParams


def sample(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, seed: int = 0) -> str:
    """The prompt's continuation (text only, prompt excluded); stops early at end-of-text or end-of-turn."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    # The engine leaves the model's mode and weights alone: a model in training can be sampled as is.
    engine = Engine(model, EngineConfig(max_seqs=1, kv_cache_tokens=len(ids) + max_new_tokens + 64))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=(tokenizer.eos_id, tokenizer.eot_id))
    out = engine.generate([ids], params)[0].output_ids
    return tokenizer.decode([t for t in out if t not in (tokenizer.eos_id, tokenizer.eot_id)], skip_special=True)
