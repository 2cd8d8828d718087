"""`seekling rl` (r1/rl.py, r1/rollout.py): GRPO raises reward, several updates per batch move the
ratio, the KL term, zero-variance groups, exact resume, the command and its errors."""

import json
import random
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_train_support import TINY_MODEL, _private_cache  # noqa: F401 (fixture)

import seekling
from seekling.cli import main
from seekling.inference.engine import Engine, EngineConfig
from seekling.model.transformer import Transformer
from seekling.r1.grpo import group_advantages, share_step_tokens
from seekling.r1.rl import RLConfig, resume_rl, rl
from seekling.r1.rollout import SamplingSpec, completion_seed, micro_batches, sample_groups
from seekling.r1.tasks import TASKS, Problem, Reason, Score, Task
from seekling.tokenizer import load_default_tokenizer
from seekling.train.state import find_checkpoint, read_metrics

STEPS = 12


@dataclass(frozen=True, kw_only=True)
class CapitalTask(Task):
    """A trivial task with a real signal: a completion scores 1.0 when it starts with a capital
    letter, 0.1 otherwise. About 20% of the vocabulary's tokens start with one, so a random model
    is right about one time in five and GRPO has something to sharpen from the first step."""

    name: ClassVar[str] = "capital"

    def _draw(self, rng: random.Random) -> Problem:
        k = rng.randrange(10**6)
        return self._problem(statement=str(k), key=str(k), prompt=f"Say something ({k}).", numbers=(k,), op="",
                             target=0, answer="A")

    def parse_answer(self, text):
        return text

    def _judge(self, problem, answer):
        return Reason.CORRECT

    def solution_trace(self, problem):
        return "", "A"

    def check(self, problem, completion):
        return Score(reason=Reason.CORRECT if completion[:1].isupper() else Reason.WRONG, answer=completion)


@dataclass(frozen=True, kw_only=True)
class ConstantTask(CapitalTask):
    """Every completion earns 0.1: every group has zero reward variance."""

    name: ClassVar[str] = "constant"

    def check(self, problem, completion):
        return Score(reason=Reason.WRONG, answer=completion)


@pytest.fixture(autouse=True)
def toy_tasks(monkeypatch):
    monkeypatch.setitem(TASKS, "capital", CapitalTask)
    monkeypatch.setitem(TASKS, "constant", ConstantTask)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A random tiny checkpoint with the default tokenizer (what --from takes).

    Its head is scaled up so that each prompt's next-token distribution is peaked on a few dozen
    tokens, as a trained model's is; at the initial scale it is near-uniform over 4096 tokens, and
    a policy gradient that raises the few sampled capitalised tokens barely moves the class.
    """
    d = tmp_path_factory.mktemp("base") / "model"
    model = Transformer(TINY_MODEL.replace(max_seq_len=96))
    model.init_weights(0)
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    seekling.save(model, d)
    load_default_tokenizer().save(d)
    return d


def _cfg(base_model, out, **changes):
    fields = dict(task="capital", init=str(base_model), out_dir=str(out), max_steps=STEPS, prompts_per_step=4,
                  group_size=8, max_tokens=3, micro_batch=16, problems=64, lr=5e-4, warmup_steps=0, log_every=1,
                  eval_every=6, eval_problems=8, ckpt_every=4, dtype="float32")
    return RLConfig(**(fields | changes))


@pytest.fixture(scope="module")
def straight(base_model, tmp_path_factory, one_thread):
    # one_thread: the thread count of every test (_private_cache); the engine's log-probabilities and so the
    # gradients differ in their last bits between 1 and 2 threads on some CPUs (seen on a Zen 3 EPYC)
    TASKS["capital"] = CapitalTask  # module-scoped: the autouse fixture has not run yet
    try:
        out = tmp_path_factory.mktemp("rl") / "run"
        result = rl(_cfg(base_model, out), live=False, plots=False)
        return result, read_metrics(out)
    finally:
        del TASKS["capital"]


def test_grpo_raises_reward(straight):
    result, rows = straight
    assert result["finished"] and result["step"] == STEPS
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = rows[0]["reward"]  # sampled before any update: the starting policy
    last = sum(r["reward"] for r in rows[-3:]) / 3
    # 0.27 at the start (about a fifth of first tokens are capitalised), 0.75 at step 4, 1.0 by step 9 here
    assert last > first + 0.4, (first, last)
    trained = [r for r in rows if r["trained_seqs"] > 0]
    assert len(trained) >= 4  # once every sample is right, groups are unanimous and nothing is trained
    for r in rows:
        assert 0.0 <= r["zero_var_frac"] <= 1.0 and r["trained_seqs"] == round(32 * (1 - r["zero_var_frac"]))
        assert r["rollout_s"] > 0 and r["response_len"] <= 3
    for r in trained:
        assert r["ratio_mean"] == 1.0 and r["clip_frac"] == 0.0  # one update per batch: on-policy
        assert r["sampler_gap"] < 1e-5  # fp32: the engine's log-probabilities are the trainer's
        assert r["update_s"] > 0 and r["grad_norm"] > 0
    evals = [r for r in rows if "pass@1" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert result["pass@1_before"] is not None and 0 <= result["pass@1"] <= 1


def test_rl_resumes_bit_exactly(base_model, tmp_path, straight):
    out = tmp_path / "run"
    first = rl(_cfg(base_model, out), on_step=lambda step, *_: step == 5, live=False, plots=False)
    assert first["stopped"] == "stopped by the caller" and find_checkpoint(out).name == "ckpt-000005"
    resume_rl(str(out), live=False, plots=False)
    keys = ("step", "tokens", "loss", "reward", "accuracy", "grad_norm", "zero_var_frac", "pass@1")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(out)] == [{k: r.get(k) for k in keys} for r in straight[1]]


def test_resting_unanimous_problems_resumes_bit_exactly(base_model, tmp_path):
    """With rest_zero_variance the problems drawn depend on earlier groups: the checkpoint carries the pool's state."""
    changes = dict(rest_zero_variance=True, problems=12, max_steps=9, eval_every=0, ckpt_every=3)
    straight = tmp_path / "straight"
    rl(_cfg(base_model, straight, **changes), live=False, plots=False)
    rows = read_metrics(straight)
    assert any(r["resting"] > 0 for r in rows)  # 12 problems, 4 per step: passes of 3 steps, groups go unanimous
    out = tmp_path / "run"
    rl(_cfg(base_model, out, **changes), on_step=lambda step, *_: step == 4, live=False, plots=False)
    resume_rl(str(out), live=False, plots=False)
    keys = ("step", "loss", "reward", "zero_var_frac", "resting", "grad_norm")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(out)] == [{k: r.get(k) for k in keys} for r in rows]


def test_several_updates_per_batch_move_the_ratio(base_model, tmp_path):
    rl(_cfg(base_model, tmp_path / "run", max_steps=2, updates_per_batch=3, eval_every=0), live=False, plots=False)
    for r in read_metrics(tmp_path / "run"):
        # the logged ratio is the mean over the 3 updates: 1 exactly for the first, not for the others
        assert abs(r["ratio_mean"] - 1.0) > 1e-4
        assert r["clip_frac"] > 0


def test_kl_to_the_starting_model(base_model, tmp_path):
    rl(_cfg(base_model, tmp_path / "run", max_steps=3, beta=0.1, eval_every=0), live=False, plots=False)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["kl"] == 0.0  # the reference is the starting model: identical at the first step
    assert rows[-1]["kl"] > 1e-4  # and the policy has moved away from it since


def test_zero_variance_groups_are_counted_and_skipped(base_model, tmp_path):
    rl(_cfg(base_model, tmp_path / "skip", task="constant", max_steps=2, eval_every=0), live=False, plots=False)
    rows = read_metrics(tmp_path / "skip")
    assert all(r["zero_var_frac"] == 1.0 and r["trained_seqs"] == 0 and r["loss"] == 0.0 for r in rows)
    assert all("grad_norm" not in r for r in rows)  # no optimizer step was taken
    before = seekling.load(base_model).state_dict()
    after = seekling.load(tmp_path / "skip" / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rl(_cfg(base_model, tmp_path / "keep", task="constant", max_steps=2, eval_every=0,
            skip_zero_variance_groups=False), live=False, plots=False)
    rows = read_metrics(tmp_path / "keep")
    assert all(r["trained_seqs"] == 32 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in rows)


def test_rollout_batches_hold_what_the_engine_sampled(base_model, one_thread):
    model, tok = seekling.load(base_model), load_default_tokenizer()
    task = CapitalTask()
    problems = task.problems("train", 3, seed=0)
    engine = Engine(model, EngineConfig(max_seqs=8))
    spec = SamplingSpec(group_size=4, max_tokens=5)
    ro = sample_groups(engine, tok, task, problems, spec, seed=1, step=7)
    again = sample_groups(engine, tok, task, problems, spec, seed=1, step=7)
    assert [o.output_ids for o in ro.outputs] == [o.output_ids for o in again.outputs]  # seeded per completion
    assert len({tuple(o.output_ids) for o in ro.outputs}) > 6  # and the seeds differ across the group
    assert ro.rewards.shape == (3, 4)
    adv, _ = group_advantages(ro.rewards)
    keep = [8, 9, 10, 11, 0, 1, 2, 3]  # problems 2 and 0 (2's prompt is the longer: the batches reorder them)
    batches = micro_batches(ro, adv.flatten(), keep, size=5, pad_id=tok.pad_id)
    assert [b["input_ids"].shape[0] for b in batches] == [5, 3]
    rows = [(b, r) for b in batches for r in range(b["input_ids"].shape[0])]
    # Grouped by length (shortest first, ties in keep's order), so a micro-batch pads little.
    length = {i: len(ro.prompts[i // 4]) + len(ro.outputs[i].output_ids) for i in keep}
    in_order = sorted(keep, key=length.get)
    assert len(set(length.values())) > 1 and in_order != keep  # the sampled lengths differ: the order is tested
    assert max(length[i] for i in in_order[:5]) == batches[0]["input_ids"].shape[1]
    for (b, r), i in zip(rows, in_order):
        prompt, out = ro.prompts[i // 4], ro.outputs[i]
        n, m = len(prompt), len(out.output_ids)
        assert b["input_ids"][r, :n].tolist() == prompt and b["input_ids"][r, n:n + m].tolist() == out.output_ids
        assert b["input_ids"][r, n + m:].eq(tok.pad_id).all()
        assert b["completion_mask"][r].nonzero().flatten().tolist() == list(range(n, n + m))
        assert b["sampler_logp"][r, n:n + m].tolist() == pytest.approx(out.logprobs, abs=0)
        assert b["advantages"][r] == adv.flatten()[i]
    shared = share_step_tokens(batches)
    assert shared[0]["sequences_in_step"] == 8 and shared[0]["micro_batches_in_step"] == 2
    seeds = {completion_seed(s, st, p, g, 8) for s in range(2) for st in range(3) for p in range(4) for g in range(8)}
    assert len(seeds) == 2 * 3 * 4 * 8


def test_rl_command_and_errors(base_model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["rl", "--task", "capital", "--from", str(base_model), "--out", str(out), "--steps", "2",
                 "--warmup", "0", "--prompts", "2", "--group-size", "4", "--max-tokens", "3", "--eval-problems", "4",
                 "--dtype", "float32", "--loss-type", "grpo", "--updates", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out pass@1 before GRPO" in printed and "grpo loss, 2 update(s)" in printed
    assert (out / "reward.png").is_file() and find_checkpoint(out) is not None
    assert main(["rl", "--resume", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["rl", "--task", "capital", "--from", "tiny", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "seekling sft" in err and "never write" in err  # a preset: says to run SFT first
    assert main(["rl", "--task", "capital"]) == 2
    assert "--from" in capsys.readouterr().err
    for changes, field in [({"group_size": 1}, "group_size"), ({"loss_type": "ppo"}, "loss_type"),
                           ({"temperature": 0.0}, "temperature"), ({"task": "chess"}, "task"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ValueError, match=field):
            RLConfig(**changes)


def test_recipe_runs_its_stages_and_keeps_finished_ones(base_model, tmp_path, capsys):
    from seekling.r1.recipe import run_recipe

    small_sft = dict(max_steps=3, batch_size=4, examples=16, warmup_steps=1, eval_every=3, eval_problems=2,
                     eval_max_tokens=8, ckpt_every=3)
    small_rl = dict(max_steps=2, prompts_per_step=2, group_size=2, max_tokens=8, warmup_steps=0, eval_every=2,
                    eval_problems=2, ckpt_every=2, problems=8,
                    compile_rollouts=False)  # compiled decode on trained weights: test_train_core
    figures = run_recipe(str(tmp_path / "r1"), base=str(base_model), sft_changes=small_sft | {"dtype": "float32"},
                         rl_changes=small_rl | {"dtype": "float32"}, live=False)
    assert figures["rl_finished"] and figures["problems"] == 2 and figures["rl_steps"] == 2
    assert figures["gain_points"] == pytest.approx(100 * (figures["pass@1_rl"] - figures["pass@1_sft"]), abs=0.051)
    rows = read_metrics(tmp_path / "r1" / "rl")
    assert figures["pass@1_rl"] == rows[-1]["pass@1"]  # the GRPO run's own last evaluation
    assert (tmp_path / "r1" / "r1.png").is_file() and (tmp_path / "r1" / "r1.json").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "r1" / "rl")] == [1, 2]
    capsys.readouterr()
    run_recipe(str(tmp_path / "r1"), base=str(base_model), sft_changes=small_sft, rl_changes=small_rl, live=False)
    printed = capsys.readouterr().out
    assert "[sft]" in printed and "[rl]" in printed and printed.count("is finished; keeping it") == 2
    with pytest.raises(FileNotFoundError, match="--base"):
        run_recipe(str(tmp_path / "r2"), base=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="--pretrain and --base"):
        run_recipe(str(tmp_path / "r2"), base=str(base_model), pretrain=True)


def test_recipe_starts_sft_from_fresh_preset_weights_by_default(tmp_path, capsys):
    from seekling.r1.recipe import BASE_PRESET, run_recipe

    small_sft = dict(max_steps=2, batch_size=2, examples=8, warmup_steps=0, eval_every=2, eval_problems=1,
                     eval_max_tokens=4, ckpt_every=2, dtype="float32")
    small_rl = dict(max_steps=1, prompts_per_step=1, group_size=2, max_tokens=4, warmup_steps=0, eval_every=1,
                    eval_problems=1, ckpt_every=1, problems=4, dtype="float32",
                    compile_rollouts=False)
    figures = run_recipe(str(tmp_path / "r1"), sft_changes=small_sft, rl_changes=small_rl, live=False)
    assert figures["rl_finished"] and not (tmp_path / "r1" / "base").exists()  # nothing pretrained
    assert f"[base] fresh {BASE_PRESET} weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "r1" / "sft" / "sft_config.json").read_text())["init"] == BASE_PRESET


def test_grpo_trains_an_engram_model(tmp_path):
    """The one engine samples an Engram model (its per-sequence n-gram state) with the trainer's own
    log-probabilities, and the step trains the sparse tables beside the rest (RowSparseAdam)."""
    from seekling.engram_vocab import install_engram_vocab
    from seekling.presets import with_engram
    from seekling.r1.sft import model_and_tokenizer

    tok = load_default_tokenizer()
    cfg = with_engram(TINY_MODEL.replace(max_seq_len=96), layers=(0,), n_heads=2, head_rows=997, embed_dim=32)
    model = Transformer(cfg)
    model.init_weights(0)
    install_engram_vocab(model, tok)
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    d = tmp_path / "base"
    seekling.save(model, d)
    tok.save(d)
    table = model.layers[0].engram.table.weight.detach().clone()

    result = rl(_cfg(d, tmp_path / "run", max_steps=3, eval_every=0), live=False, plots=False)
    rows = read_metrics(tmp_path / "run")
    assert result["finished"] and any(r["trained_seqs"] > 0 for r in rows)
    for r in rows:
        if r["trained_seqs"]:
            assert r["sampler_gap"] < 1e-5  # fp32: the engine's Engram state gives the trainer's log-probs
    after, _ = model_and_tokenizer(str(tmp_path / "run" / "model"), None)
    moved = (after.layers[0].engram.table.weight != table).any(dim=1)
    assert 0 < int(moved.sum()) < table.shape[0]  # the looked-up rows, not the whole table
    assert torch.equal(after.engram_vocab.compress, model.engram_vocab.compress)


def test_a_fresh_engram_preset_gets_the_tokenizers_compressed_ids():
    from seekling.engram_vocab import build_compressed_vocab
    from seekling.r1.sft import model_and_tokenizer

    model, tok = model_and_tokenizer("tiny_engram", None)
    want = torch.tensor(build_compressed_vocab(tok).padded(model.cfg.vocab_size))
    assert torch.equal(model.engram_vocab.compress, want) and not torch.equal(want, torch.arange(len(want)))
