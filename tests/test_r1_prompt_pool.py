"""r1/prompt_pool.py: the seeded stream of training problems, and resting unanimous ones for one pass."""

import pytest

from seekling.r1.prompt_pool import PromptPool
from seekling.r1.sft_data import batch_order


def test_without_resting_the_pool_draws_batch_order():
    pool = PromptPool(10, 4, seed=3)
    drawn = [pool.draw() for _ in range(7)]
    assert drawn == [batch_order(10, s, 4, seed=3) for s in range(7)]
    pool.observe(drawn[-1], [True] * 4)  # ignored: resting is off
    assert pool.resting == set() and pool.draw() == batch_order(10, 7, 4, seed=3)
    late = PromptPool(10, 4, seed=3)
    late.start_at(5)
    assert late.draw() == batch_order(10, 5, 4, seed=3)


def test_a_unanimous_problem_sits_out_one_pass_then_returns():
    n, k = 8, 4
    pool = PromptPool(n, k, seed=1, rest_zero_variance=True)
    first = pool.draw() + pool.draw()  # one whole pass
    assert sorted(first) == list(range(n))
    rest = first[:3]
    pool.observe(first[:4], [True, True, True, False])
    pool.observe(first[4:], [False] * 4)
    assert pool.resting == set(rest)
    second = pool.draw()  # the second pass without the three resting problems, then the third pass begins
    second += pool.draw()
    stream = [batch_order(n, s, 1, seed=1)[0] for s in range(n, 3 * n)]
    expected = [j for j in stream[:n] if j not in rest] + stream[n:n + 3]
    assert second == expected
    assert pool.resting == set()  # each rested once; they are drawn again in the third pass
    assert set(rest) <= set(pool.draw() + pool.draw() + pool.draw() + pool.draw())


def test_a_problem_with_a_mixed_group_stops_resting():
    pool = PromptPool(4, 2, seed=0, rest_zero_variance=True)
    a = pool.draw()
    pool.observe(a, [True, True])
    pool.observe(a, [False, True])
    assert pool.resting == {a[1]}


def test_every_problem_resting_still_draws_a_full_step():
    pool = PromptPool(4, 4, seed=0, rest_zero_variance=True)
    a = pool.draw()
    pool.observe(a, [True] * 4)
    b = pool.draw()  # the whole next pass is skipped; the one after is drawn
    assert sorted(b) == [0, 1, 2, 3] and pool.position == 12 and pool.resting == set()


def test_state_round_trip_and_bad_state():
    pool = PromptPool(20, 3, seed=2, rest_zero_variance=True)
    for _ in range(5):
        d = pool.draw()
        pool.observe(d, [j % 2 == 0 for j in d])
    copy = PromptPool(20, 3, seed=2, rest_zero_variance=True)
    copy.load_state_dict(pool.state_dict())
    assert [copy.draw() for _ in range(9)] == [pool.draw() for _ in range(9)]
    with pytest.raises(ValueError, match="prompt_pool state"):
        copy.load_state_dict({"position": 3, "resting": [25]})
    with pytest.raises(ValueError, match="observe"):
        pool.observe([1, 2], [True])
