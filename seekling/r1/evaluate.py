"""Held-out evaluation of a checkable task: pass@1 (greedy) and pass@k (sampled), through the engine.

    seekling eval --task addition --model runs/rl/model --problems 200 --k 8 --out eval.json

pass@1 is the fraction of held-out problems whose greedy completion is correct. pass@k is the
unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1)
over n >= k temperature samples per problem: 1 - C(n-c, k) / C(n, k), averaged over problems, c the
correct samples. Every completion is also scored for format, so the report says why answers failed
(the reasons of tasks/answer.py), not only how often.

Generation goes through the one engine (continuous batching, per-request seeds), exactly as the
CLI, the server and GRPO rollouts do; a seed makes the whole evaluation repeatable.
Left out: majority voting (cons@k), which R1 reports beside pass@1 but a tiny model does not need.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from seekling.inference.engine import Engine, EngineConfig, RequestOutput
from seekling.inference.sampling import SamplingParams
from seekling.r1.tasks import Task, get_task
from seekling.terminal import load_model_dir
from seekling.train.state import write_json_atomic
from seekling.validate import checker


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    As a running product (Chen et al.'s numerically stable form): the binomials themselves
    overflow floats for large n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate: how many held-out problems, how many samples for pass@k, how to sample."""

    problems: int = 200  # held-out problems (distinct; the first `problems` of the test split for `seed`)
    k: int = 8  # pass@k; 0 evaluates greedy pass@1 only
    samples: int | None = None  # samples per problem for pass@k (n >= k); None: k
    temperature: float = 1.0  # for the pass@k samples
    max_tokens: int = 256  # per completion; a completion cut there is scored as written (usually malformed)
    seed: int = 0  # problems and sample seeds
    batch: int = 32  # sequences in flight in the engine

    def __post_init__(self):
        need = checker("EvalConfig")

        for f in ("problems", "max_tokens", "batch"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(isinstance(self.k, int) and self.k >= 0, "k", f"must be an integer >= 0 (0: greedy only), got {self.k!r}")
        need(self.samples is None or (isinstance(self.samples, int) and self.samples >= max(1, self.k)), "samples",
             f"must be at least k ({self.k}) for the pass@k estimator, got {self.samples!r}")
        need(self.temperature > 0, "temperature", f"must be > 0 for sampling (greedy is pass@1), got {self.temperature}")

    @property
    def n_samples(self) -> int:
        return self.samples if self.samples is not None else self.k


def completion_text(tokenizer, out: RequestOutput) -> str:
    """The completion as a task checks it: think tags kept, the stop token that ended it dropped."""
    ids = out.output_ids
    if out.finish_reason == "stop" and isinstance(out.stop_reason, int):
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], batch: int, bar) -> list:
    outs = []
    for i in range(0, len(prompts), batch):
        outs += engine.generate(prompts[i:i + batch], params[i:i + batch])
        bar.update(len(prompts[i:i + batch]))
    return outs


def evaluate(model, tokenizer, task: Task, config: EvalConfig | None = None, *, progress: bool = True) -> dict:
    """Score the model on the task's held-out split; returns the report (see `eval_command` for its JSON)."""
    cfg = config or EvalConfig()
    problems = task.problems("test", cfg.problems, cfg.seed)
    prompts = [tokenizer.apply_chat_template(task.prompt_messages(p)) for p in problems]
    stop = (tokenizer.eot_id, tokenizer.eos_id)
    longest = max(map(len, prompts)) + cfg.max_tokens
    engine = Engine(model, EngineConfig(max_seqs=cfg.batch, kv_cache_tokens=cfg.batch * (longest + 64),
                                        max_batch_tokens=max(512, cfg.batch)))
    n = cfg.n_samples
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, stop_token_ids=stop)
    jobs = [(i, -1, greedy) for i in range(len(problems))]
    # Sample seeds are a function of (seed, problem, sample): any subset re-runs identically.
    jobs += [(i, j, SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, stop_token_ids=stop,
                                   seed=(cfg.seed * 1_000_003 + i) * 1009 + j))
             for i in range(len(problems)) for j in range(n)]
    with tqdm(total=len(jobs), desc=f"eval {task.name}", unit="completion", disable=not progress) as bar:
        outs = _generate(engine, [prompts[i] for i, _, _ in jobs], [p for _, _, p in jobs], cfg.batch, bar)

    records = [{"id": p.id, "answer": p.answer, "greedy": None, "samples_correct": 0} for p in problems]
    reasons, lengths, correct_sampled = Counter(), [], [0] * len(problems)
    for (i, j, _), out in zip(jobs, outs):
        score = task.check(problems[i], completion_text(tokenizer, out))
        reasons[str(score.reason)] += 1
        lengths.append(len(out.output_ids))
        if j < 0:
            records[i]["greedy"] = {"reason": str(score.reason), "answer": score.answer, "reward": score.reward}
        else:
            correct_sampled[i] += score.correct
    for rec, c in zip(records, correct_sampled):
        rec["samples_correct"] = c
    report = {
        "task": task.name, "knobs": asdict(task), "split": "test", "problems": len(problems),
        "pass@1": sum(r["greedy"]["reason"] == "correct" for r in records) / len(problems),
        "mean_greedy_reward": sum(r["greedy"]["reward"] for r in records) / len(problems),
        "greedy_well_formed": sum(r["greedy"]["reward"] > 0 for r in records) / len(problems),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "reasons": dict(reasons.most_common()),
        "config": asdict(cfg),
    }
    if cfg.k:
        report[sampled_key(cfg.k)] = sum(pass_at_k(n, c, cfg.k) for c in correct_sampled) / len(problems)
        # The fraction of samples that are correct: pass@1 as DeepSeek-R1 reports it (estimated from
        # n samples at a non-zero temperature, not greedy), beside the greedy pass@1 above.
        report["sample_accuracy"] = sum(correct_sampled) / (n * len(problems))
        report["samples_per_problem"] = n
    report["records"] = records
    return report


def sampled_key(k: int) -> str:
    """The report key of the sampled pass@k; for k = 1 it must not overwrite the greedy "pass@1"."""
    return "pass@1_sampled" if k == 1 else f"pass@{k}"


def parse_knobs(pairs: list[str] | None) -> dict:
    """["digits=4", "allow_negative=true"] -> {"digits": 4, "allow_negative": True}."""
    knobs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--knob {pair!r}: write KEY=VALUE, e.g. --knob digits=4")
        v = value.strip().lower()
        knobs[key.strip()] = True if v == "true" else False if v == "false" else int(v) if v.lstrip("-").isdigit() else value
    return knobs


def eval_command(task: str, model_dir: str, *, knobs: list[str] | None = None, out: str | None = None,
                 **config) -> dict:
    """`seekling eval`: load the model and its tokenizer, evaluate, print the summary, write the JSON."""
    cfg = EvalConfig(**{k: v for k, v in config.items() if v is not None})
    the_task = get_task(task, **parse_knobs(knobs))
    model, tokenizer = load_model_dir(model_dir)
    report = evaluate(model, tokenizer, the_task, cfg)
    path = Path(out or Path(model_dir) / f"eval-{task}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)  # never a half-written report
    summary = f"{task} ({report['problems']} held-out problems): pass@1 {report['pass@1']:.1%}"
    if cfg.k:
        summary += (f", pass@{cfg.k} {report[sampled_key(cfg.k)]:.1%} and sample accuracy {report['sample_accuracy']:.1%} "
                    f"({report['samples_per_problem']} samples each at temperature {cfg.temperature:g})")
    top = ", ".join(f"{r} {n}" for r, n in list(report["reasons"].items())[:4])
    print(f"{summary}; completions: {top}; report in {path}")
    return report
