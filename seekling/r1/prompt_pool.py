"""Which training problems a GRPO step samples: seeded passes over the pool, optionally resting the unanimous.

    pool = PromptPool(n_problems=2000, per_step=32, seed=0, rest_zero_variance=True)
    idx = pool.draw()                  # this step's problem indices
    pool.observe(idx, zero_var)        # after scoring: which groups were unanimous
    state["prompt_pool"] = pool.state_dict()   # in the checkpoint; load_state_dict on resume

Problems come in the seeded order of sft_data.batch_order (a shuffle per pass over the pool), so
without resting, step i draws exactly batch_order(n, i, per_step, seed), as before this file existed.

With `rest_zero_variance`, a problem whose last group was unanimous (every completion right, or
every one wrong) sits out the next time the stream reaches it and comes back the pass after. Such a
group carries no advantage, so its G rollouts were wasted, and a group's outcome is persistent:
GRESO (Zheng et al. 2025, "Act Only When It Pays") measured that a prompt with zero reward variance
in one epoch very likely has it in the next, and skips such prompts before sampling them. On the
recipe's task the unanimous share climbs from ~0.5 to ~0.8 of the groups as GRPO improves the model;
resting them puts the step's rollouts on the problems it still gets wrong sometimes. The cost is
state that a resume must restore (where the stream is, and which problems rest), so it is
checkpointed; a resume of a run written before this state existed starts from step * per_step with
nothing resting, which is exact for runs that did not rest problems.
"""

from __future__ import annotations

from seekling.r1.sft_data import example_at


class PromptPool:
    def __init__(self, n_problems: int, per_step: int, seed: int, rest_zero_variance: bool = False):
        if n_problems < 1 or per_step < 1:
            raise ValueError(f"PromptPool: need at least one problem and one prompt per step, got "
                             f"n_problems={n_problems}, per_step={per_step}")
        self.n, self.per_step, self.seed, self.rest = n_problems, per_step, seed, rest_zero_variance
        self.position = 0  # the next place in the seeded stream
        self.resting: set[int] = set()

    def start_at(self, step: int) -> None:
        """Where a run that kept no pool state is after `step` steps (exact without resting)."""
        self.position, self.resting = step * self.per_step, set()

    def draw(self) -> list[int]:
        """The next step's problem indices (per_step of them), in stream order."""
        out = []
        while len(out) < self.per_step:
            j = example_at(self.n, self.position, self.seed)
            self.position += 1
            if j in self.resting:  # sits out this pass; leaving the set brings it back on the next one.
                self.resting.discard(j)  # (so every skip shrinks the set: the loop ends)
                continue
            out.append(j)
        return out

    def observe(self, indices: list[int], zero_variance) -> None:
        """Record which of the drawn problems' groups were unanimous (a bool per index)."""
        if not self.rest:
            return
        if len(indices) != len(zero_variance):
            raise ValueError(f"PromptPool.observe: {len(indices)} problems but {len(zero_variance)} flags")
        for j, z in zip(indices, zero_variance):
            (self.resting.add if bool(z) else self.resting.discard)(j)

    def state_dict(self) -> dict:
        return {"position": self.position, "resting": sorted(self.resting)}

    def load_state_dict(self, state: dict) -> None:
        position, resting = state.get("position"), state.get("resting")
        if not (isinstance(position, int) and position >= 0 and isinstance(resting, list)
                and all(isinstance(j, int) and 0 <= j < self.n for j in resting)):
            raise ValueError(f"the checkpoint's prompt_pool state is not one this pool of {self.n} problems "
                             f"wrote: {state!r}; resume with the run's own rl_config.json")
        self.position, self.resting = position, set(resting)
