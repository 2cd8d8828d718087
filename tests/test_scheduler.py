"""The scheduler alone, on a block pool with no model: who runs, and who is preempted when blocks run out."""

import torch

from seekling.inference.kv_cache import LatentCache
from seekling.inference.sampling import SamplingParams
from seekling.inference.scheduler import Scheduler, Sequence

BLOCK = 4


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(request_id=name, tokens=list(range(prompt_len)), prompt_len=prompt_len,
                    params=SamplingParams(temperature=0), generator=torch.Generator())


def names(seqs):
    return [s.request_id for s in seqs]


def run(work):
    """What the engine does with a step's work: cache the fed tokens, and sample one after the last."""
    for s, n in work:
        s.num_cached += n
        if s.remaining == 0:
            s.tokens.append(0)


def test_full_cache_preempts_the_youngest_running_sequence():
    """The oldest sequence keeps its blocks and decodes; the youngest goes back to the front of the queue."""
    cache = LatentCache(n_layers=1, n_blocks=3, block_size=BLOCK, latent_dim=2, rope_dim=2, max_seqs=3,
                        max_blocks_per_seq=4)
    sched = Scheduler(cache, max_batch_tokens=16)
    old, mid, young = seq("old", 3), seq("mid", 3), seq("young", 3)
    for s in (old, mid, young):
        sched.add(s)
    # Step 1 admits all three (3 prompt tokens + the first sampled one: one block each); step 2
    # decodes them into position 3, the last of the block.
    for _ in range(2):
        work = sched.schedule()
        assert names(s for s, _ in work) == ["old", "mid", "young"]
        run(work)
    assert cache.num_free_blocks == 0 and all(s.remaining == 1 and s.num_cached == BLOCK for s in (old, mid, young))

    # Step 3: every sequence needs a second block and none is free. The oldest is served first and
    # takes the youngest's block; the next one finds nobody younger left to evict, so it yields itself.
    work = sched.schedule()
    assert [(s.request_id, n) for s, n in work] == [("old", 1)]
    assert names(sched.running) == ["old"]
    assert names(sched.waiting) == ["mid", "young"]  # preempted ones go to the front, oldest first
    assert all(s.row is None and s.num_cached == 0 for s in (mid, young))  # to be recomputed
    assert sched.n_preemptions == 2
    cache.check()

    # The oldest always progresses: finishing it frees the blocks the others are readmitted with.
    run(work)
    sched.remove(old)
    work = sched.schedule()
    # mid recomputes its 5 tokens (reserving 5 + 1 positions: both free blocks); young still waits
    assert [(s.request_id, n) for s, n in work] == [("mid", 5)] and names(sched.waiting) == ["young"]
