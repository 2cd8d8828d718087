"""Shared pieces for the training tests (no tests here): a tiny model, a small data file, a config."""

from __future__ import annotations

import pytest
import torch

from seekling.config import ModelConfig
from seekling.data.corpus import corpus_split
from seekling.train.config import TrainConfig

# Small enough that a step takes milliseconds, big enough to have every part: a dense layer, an MoE
# layer with grouped routing, an MTP depth. vocab 4096 = the default tokenizer's.
TINY_MODEL = ModelConfig(
    vocab_size=4096, dim=32, n_layers=2, n_dense_layers=1, inter_dim=64, n_heads=2, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_inter_dim=16, n_routed_experts=8,
    n_activated_experts=2, n_expert_groups=2, n_limited_groups=2, max_seq_len=64, n_mtp_layers=1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A 120k-character slice of the embedded corpus and a token cache beside it (tokenized once)."""
    d = tmp_path_factory.mktemp("train-data")
    train_text, _ = corpus_split()
    (d / "data.txt").write_text(train_text[:120_000])
    return d


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # keep the measured-peak cache out of the user's ~/.cache
    monkeypatch.setenv("SEEKLING_CACHE", str(tmp_path_factory.getbasetemp() / "seekling-cache"))
    # One thread: these models are too small to split, and on a busy 2-core machine two threads
    # made the test runs ~7x slower (threads waiting on each other). Losses are the same either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(data_dir, out_dir, **changes) -> TrainConfig:
    fields = dict(model=TINY_MODEL, data=str(data_dir / "data.txt"), token_cache_dir=str(data_dir / "cache"),
                  out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=12, warmup_steps=2, lr=3e-3,
                  log_every=1, eval_every=6, eval_batches=2, ckpt_every=4, seed=0, seq_aux_alpha=1e-4,
                  # pinned: "auto" picks bf16 on CPUs with native bf16 and fp32 elsewhere, and the
                  # numbers these tests compare must not depend on which CPU runs them
                  dtype="float32")
    fields.update(changes)
    return TrainConfig(**fields)


def spread_out(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Spread-out weights for numeric tests of a model's options: norms and mHC scales near 1, mHC
    bases O(1), Engram weights large (0.5) so that the lookup moves the logits visibly, the rest 0.08."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith(("scale", "hc_scale")):
                p.copy_(1 + 0.3 * r)
            elif name.endswith(("base", "hc_base")):
                p.copy_(r)
            else:
                p.copy_((0.5 if "engram" in name else 0.08) * r)
    return model
