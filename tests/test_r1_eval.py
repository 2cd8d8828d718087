"""Held-out evaluation (r1/evaluate.py): the pass@k estimator against enumeration, the report, the CLI."""

import itertools
import json
from math import comb

import pytest
from test_train_support import TINY_MODEL

import seekling
from seekling.cli import main
from seekling.inference.engine import RequestOutput
from seekling.model.transformer import Transformer
from seekling.r1.evaluate import EvalConfig, completion_text, evaluate, parse_knobs, pass_at_k
from seekling.r1.tasks import Reason, Score, get_task
from seekling.tokenizer import load_default_tokenizer


@pytest.mark.parametrize("n,k", [(1, 1), (4, 2), (6, 3), (8, 8), (7, 1)])
def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample(n, k):
    for c in range(n + 1):
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100))
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(4, 5, 2)


def test_completion_text_keeps_think_tags_and_drops_the_stop_token():
    tok = load_default_tokenizer()
    ids = [tok.think_id, *tok.encode("2+2"), tok.end_think_id, *tok.encode("4"), tok.eot_id]
    out = RequestOutput(request_id="r", prompt_ids=[0], output_ids=ids, logprobs=[], sampled_logprobs=[],
                        top_logprobs=[], finish_reason="stop", stop_reason=tok.eot_id, text=None, n_drafted=0,
                        n_accepted=0)
    assert completion_text(tok, out) == "<think>2+2</think>4"


def _model():
    model = Transformer(TINY_MODEL)
    model.init_weights(0)
    return model


def test_report_counts_what_check_says(monkeypatch, one_thread):
    """pass@1 and pass@k follow the scores: problems with an even index are 'solved' by every completion."""
    task = get_task("addition", digits=2)
    problems = task.problems("test", 6, seed=3)
    solved = {p.id for p in problems[::2]}
    seen = []

    def check(self, problem, text):
        seen.append(text)
        return Score(reason=Reason.CORRECT if problem.id in solved else Reason.MISSING_THINK)

    monkeypatch.setattr(type(task), "check", check)
    cfg = EvalConfig(problems=6, k=2, samples=3, max_tokens=4, seed=3, batch=4)
    report = evaluate(_model(), load_default_tokenizer(), task, cfg, progress=False)
    assert len(seen) == 6 * (1 + 3)  # a greedy and 3 samples per problem
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(0.5)
    assert report["sample_accuracy"] == pytest.approx(0.5)
    assert report["reasons"] == {"correct": 12, "missing_think": 12}
    assert [r["id"] for r in report["records"]] == [p.id for p in problems]
    assert report["records"][0]["samples_correct"] == 3 and report["records"][1]["samples_correct"] == 0
    again = evaluate(_model(), load_default_tokenizer(), task, cfg, progress=False)
    assert seen[:24] == seen[24:]  # seeded: the same completions again
    assert again["pass@1"] == report["pass@1"]


def test_sampled_pass_at_1_does_not_overwrite_the_greedy_one(monkeypatch, one_thread):
    task = get_task("addition", digits=2)
    calls = []

    def check(self, problem, text):  # the greedy completions are generated (and scored) first
        calls.append(problem.id)
        return Score(reason=Reason.CORRECT if len(calls) <= 4 else Reason.WRONG)

    monkeypatch.setattr(type(task), "check", check)
    report = evaluate(_model(), load_default_tokenizer(), task,
                      EvalConfig(problems=4, k=1, samples=2, max_tokens=2, batch=4), progress=False)
    assert report["pass@1"] == 1.0 and report["pass@1_sampled"] == 0.0 and report["sample_accuracy"] == 0.0


def test_eval_command_writes_json(tmp_path, capsys, one_thread):
    model_dir = tmp_path / "model"
    seekling.save(_model(), model_dir)
    load_default_tokenizer().save(model_dir)
    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "addition", "--knob", "digits=2", "--model", str(model_dir), "--problems", "3",
                 "--k", "2", "--max-tokens", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["problems"] == 3 and report["knobs"]["digits"] == 2 and 0.0 <= report["pass@2"] <= 1.0
    assert "pass@1" in capsys.readouterr().out
    assert main(["eval", "--task", "nope", "--model", str(model_dir)]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_config_and_knobs_are_validated():
    with pytest.raises(ValueError, match="EvalConfig.samples"):
        EvalConfig(k=4, samples=2)
    with pytest.raises(ValueError, match="EvalConfig.temperature"):
        EvalConfig(temperature=0)
    assert parse_knobs(["digits=4", "allow_negative=true"]) == {"digits": 4, "allow_negative": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_knobs(["digits"])
