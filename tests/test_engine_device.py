"""The engine on the model's device, and on a model that a trainer keeps updating.

Every tensor the engine makes must live on the model's device. `only_model_device()` proves it on
any machine: with `torch.set_default_device("meta")` active, a tensor made without an explicit
device becomes a meta tensor, and `_NoMeta` fails at the op that made it. (Indexing a CPU tensor
with a meta index does not raise, it reads garbage, hence the check on every op's output rather
than waiting for a device mismatch.) The model's own tensors are built before, on its device.
The models sit on the `device` fixture's device: SEEKLING_TEST_DEVICE=cuda runs all of this on a GPU.
"""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from seekling.inference import Engine, EngineConfig, SamplingParams, route_table
from tests import test_spec
from tests.test_engine import GREEDY, prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why


class _NoMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves(out)):
            raise AssertionError(f"{getattr(func, '__name__', func)} made a meta tensor: "
                                 "a tensor was created without the model's device")
        return out


@contextmanager
def only_model_device():
    """Any tensor created without an explicit device inside this block is a meta tensor, and a failure.

    `with torch.device("meta")` installs the mode `torch.set_default_device("meta")` does, and
    removes it on exit (set_default_device("cpu") afterwards would leave a mode on the stack).
    """
    with torch.device("meta"), _NoMeta():
        yield


def _same(a, b):
    """Two lists of RequestOutput: same tokens, same logprobs (same code on the same device: exact)."""
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.sampled_logprobs for o in a] == [o.sampled_logprobs for o in b]
    assert [o.top_logprobs for o in a] == [o.top_logprobs for o in b]


def _mixed_run(model, config: EngineConfig, params: list[SamplingParams], ps: list[list[int]]):
    """Requests joining while others decode, so steps pack prefill chunks beside decodes."""
    eng = Engine(model, config)
    rids = [eng.add_request(ps[0], params[0])]
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps in (2, 3, 6):
            rids.append(eng.add_request(ps[len(rids)], params[len(rids)]))
    assert len(rids) == len(ps), "the first request finished before the others joined"
    return eng, [eng.output(r) for r in rids]


MIXED = [
    GREEDY,
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=3, max_tokens=20, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
                   seed=5, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=12, ignore_eos=True),
]


@pytest.mark.parametrize("attention", ["absorbed", "naive"])
def test_engine_makes_every_tensor_on_the_model_device(device, attention):
    model = tiny_model().to(device)
    ps = prompts(4, lo=20, hi=40, seed=4)
    # max_batch_tokens 16: prompts of 20-40 tokens prefill in chunks, beside the others' decodes.
    config = EngineConfig(block_size=8, max_batch_tokens=16, max_seqs=4, kv_cache_tokens=1024, attention=attention)
    _, want = _mixed_run(model, config, MIXED, ps)
    with only_model_device():
        eng, got = _mixed_run(model, config, MIXED, ps)
    _same(got, want)
    assert eng.cache.pool.device == eng.cache.block_table.device == next(model.parameters()).device
    assert got[0].output_ids == reference_greedy(model, ps[0], GREEDY.max_tokens)


def test_speculative_decoding_makes_every_tensor_on_the_model_device(device):
    model = test_spec.tiny_model(context=0.3).to(device)  # drafts mostly accepted, sometimes rejected
    ps = prompts(4, lo=5, hi=30, seed=6)
    config = EngineConfig(block_size=4, max_batch_tokens=32, max_seqs=4, kv_cache_tokens=1024, speculative_tokens=2)
    _, want = _mixed_run(model, config, MIXED, ps)
    with only_model_device():
        eng, got = _mixed_run(model, config, MIXED, ps)
    _same(got, want)
    assert 0 < eng.n_accepted < eng.n_drafted  # both verification outcomes ran


def test_compiled_decode_makes_every_tensor_on_the_model_device(device, compiled_spy):
    model = tiny_model().to(device)
    ps = prompts(2, seed=8)
    want = [reference_greedy(model, p, GREEDY.max_tokens) for p in ps]
    # Compile included: a caller's default-device mode (here meta) must not reach the graph, where
    # Dynamo would break it inside each block (see CompiledDecode.__call__).
    with only_model_device():
        eng = Engine(model, EngineConfig(block_size=16, kv_cache_tokens=1024, compile=True))
        outs = eng.generate(ps, GREEDY) + eng.generate(ps[:1], GREEDY)
    assert 1 in compiled_spy and 2 in compiled_spy, f"the compiled step ran for batches of {sorted(set(compiled_spy))}"
    assert [o.output_ids for o in outs] == want + want[:1]


def test_route_table_on_the_model_device(device):
    model = tiny_model().to(device)
    ids = prompts(1, seed=9)[0]
    want = route_table(model, ids)
    with only_model_device():
        got = route_table(model, ids)
        load = got.expert_load()
        dense = got.dense_weights()
    assert torch.equal(got.experts, want.experts) and torch.equal(load, want.expert_load())
    assert torch.equal(dense, want.dense_weights())


# ---------------------------------------------------------------- a model a trainer is updating

def _train(model, steps: int = 3):
    """A few real AdamW steps: next-token cross-entropy on a fixed random batch."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=g).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("compile", [False, True])
def test_engine_uses_weights_a_trainer_updated_in_place(device, compile, compiled_spy):
    model = tiny_model().to(device).train()  # a trainer's model: training mode, parameters that need grads
    config = EngineConfig(block_size=16, kv_cache_tokens=1024, compile=compile)
    eng = Engine(model, config)
    p = prompts(1, seed=7)[0]
    graphs = counters["stats"]["unique_graphs"]
    before = eng.generate([p], GREEDY)[0].output_ids
    assert model.training, "the engine flipped the caller's model out of training mode"
    if compile:
        assert counters["stats"]["unique_graphs"] > graphs, "the counter did not see the first compile"
    graphs = counters["stats"]["unique_graphs"]
    _train(model)
    compiled_spy.clear()
    after = eng.generate([p], GREEDY)[0].output_ids
    assert model.training
    fresh = Engine(copy.deepcopy(model), EngineConfig(block_size=16, kv_cache_tokens=1024)).generate([p], GREEDY)[0]
    assert after == fresh.output_ids == reference_greedy(model, p, GREEDY.max_tokens)
    assert after != before, "the updates did not change the greedy output: the test could not tell stale weights"
    assert all(q.requires_grad for q in model.parameters())
    if compile:
        assert compiled_spy, "the compiled step never ran after the update"
        assert counters["stats"]["unique_graphs"] == graphs, "the weight update made Dynamo compile again"
