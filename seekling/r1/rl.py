"""`seekling rl`: GRPO on a checkable task (R1's reinforcement-learning stage), through the engine.

    seekling rl --task addition --from runs/sft/model --steps 100 --out runs/rl
    seekling rl --resume runs/rl

Each step: draw `prompts_per_step` training problems, sample `group_size` completions for each
through one Engine on the model being trained (rollout.py), score them with the task's checker,
turn the rewards into group-relative advantages, then take `updates_per_batch` optimizer steps of
the shared `TrainStep` with the GRPO loss (grpo.py) over those completions. The bookkeeping is the
shared `train.loop.run_loop`, as for pretraining and SFT: metrics.jsonl, progress, held-out
evaluation, atomic checkpoints, SIGINT/SIGTERM and the time limit, and a resume continues exactly
(each completion's sampling seed is a function of (seed, step); the weights, the AdamW moments and
the prompt pool's place come from the checkpoint). `rest_zero_variance` lets a problem whose group
was unanimous sit out the pool's next pass over it (prompt_pool.py).

The ratio's old log-probabilities are the trainer's own, not the engine's: the first update of a
batch uses its own detached log-probabilities (ratio exactly 1, no extra forward), and with
updates_per_batch > 1 one no-grad forward before the first update fixes them for the rest. This
holds in any compute dtype: under bf16 autocast the trainer's numbers differ from the fp32 engine's,
and mixing the two would put that difference into every ratio. The gap is logged (`sampler_gap`).

Groups whose completions all got the same reward carry no advantage. They are counted
(`zero_var_frac`) and, by default here, not trained on (`skip_zero_variance_groups`): on a CPU the
forward and backward of a group that contributes no policy gradient is the largest waste, and
DAPO's dynamic sampling drops them the same way. With dapo's token-level loss this also means the
normaliser counts only tokens that carry signal. `--keep-zero-variance` keeps them (TRL's default).

Logged per step: reward, accuracy, well_formed, response_len, truncated_frac, zero_var_frac,
clip_frac (and its low / high sides), ratio_mean, kl (with beta > 0), sampler_gap, the loss and
grad norm, rollout_s and update_s, and rollout tokens/s. Every `eval_every` steps: held-out greedy
pass@1 (r1/evaluate.py). `reward.png` draws reward, accuracy and held-out pass@1 over steps.
Left out: a value model (GRPO's point), asynchronous rollouts (sampling and training alternate on
one set of weights, so every completion is on-policy for its first update), and reward models:
the tasks' checkers are exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekling.checkpoint import load
from seekling.device import default_device, resolve_dtype
from seekling.inference.engine import Engine, EngineConfig
from seekling.presets import PRESETS
from seekling.r1.evaluate import EvalConfig, evaluate
from seekling.r1.grpo import GRPOConfig, group_advantages, grpo_loss_fn, share_step_tokens, token_logprobs
from seekling.r1.plots import plot_rl
from seekling.r1.prompt_pool import PromptPool
from seekling.r1.rollout import SamplingSpec, micro_batches, sample_groups
from seekling.r1.sft import model_and_tokenizer
from seekling.r1.tasks import TASKS, get_task
from seekling.train import state as run_state
from seekling.train.core import StepConfig, TrainStep, autocast
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.loop import Cadence, Progress, restore, run_loop, summarize
from seekling.train.optim import build_optimizer, lr_at
from seekling.train.progress import fmt_duration
from seekling.validate import checker, config_from_dict

RL_CONFIG = "rl_config.json"
BASELINE = "baseline_eval.json"  # held-out pass@1 of the starting model, for the plot's step 0


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """One GRPO run. Field names shared with TrainConfig mean the same (optim.lr_at and build_optimizer take either)."""

    task: str = "addition"
    knobs: dict = field(default_factory=dict)
    init: str = "runs/sft/model"  # a checkpoint directory: a model that already writes the format (after SFT)
    out_dir: str = "runs/rl"
    max_steps: int = 100  # rollout steps (each with updates_per_batch optimizer steps)
    prompts_per_step: int = 16
    group_size: int = 8  # completions per prompt (G)
    max_tokens: int = 128  # per completion; one cut there is scored as written (usually malformed)
    temperature: float = 1.0
    top_p: float = 1.0
    updates_per_batch: int = 1  # optimizer steps per rollout batch (TRL's num_iterations, GRPO's mu)
    micro_batch: int = 32  # sequences per forward/backward
    problems: int = 4000  # distinct train-split problems; prompts cycle through them in seeded epochs
    # A problem whose group was unanimous sits out the pool's next pass (prompt_pool.py says why).
    rest_zero_variance: bool = False
    # GRPO's dials (grpo.GRPOConfig). dapo: token-level loss with DAPO's clip-higher.
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    beta: float = 0.0  # KL to the starting model; > 0 keeps a frozen copy of it
    scale_rewards: bool | None = None
    skip_zero_variance_groups: bool = True  # see the module docstring
    negative_weight: float = 1.0  # weight of negative advantages (grpo.GRPOConfig)
    lr: float = 3e-5  # the recipe's: 1e-4 made held-out pass@1 fall from 53% to 40-47% (recipe.py)
    min_lr_ratio: float = 1.0  # constant after warmup, as most GRPO recipes
    warmup_steps: int = 5
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0
    # The model's own samples are a narrow distribution; the expert biases keep what SFT left.
    bias_update_gamma: float = 0.0
    log_every: int = 1
    eval_every: int = 10  # 0: only at the end
    eval_problems: int = 100
    ckpt_every: int = 10  # 0: only at the end
    seed: int = 0
    dtype: str = "auto"
    compile_rollouts: bool = False  # the engine's compiled decode step (EngineConfig.compile)
    time_limit_s: float | None = None

    def __post_init__(self):
        need = checker("RLConfig")
        need(self.task in TASKS, "task", f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        need(isinstance(self.knobs, dict), "knobs", f"must be a dict of the task's knobs, got {self.knobs!r}")
        get_task(self.task, **self.knobs)
        need(isinstance(self.init, str) and self.init.strip() != "", "init",
             f"must be a checkpoint directory (e.g. runs/sft/model), got {self.init!r}")
        for f in ("max_steps", "prompts_per_step", "group_size", "max_tokens", "updates_per_batch", "micro_batch",
                  "problems", "log_every", "eval_problems"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.group_size >= 2, "group_size", f"must be >= 2: advantages compare completions of one prompt, got {self.group_size}")
        for f in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, f"must be an integer >= 0, got {v!r}")
        need(self.warmup_steps < self.max_steps, "warmup_steps",
             f"({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive learning rate, got {self.lr}")
        need(0 < self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in (0, 1], got {self.min_lr_ratio}")
        need(self.schedule in ("cosine", "wsd"), "schedule", f"must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        need(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s", f"must be positive or None, got {self.time_limit_s}")
        for f in ("compile_rollouts", "rest_zero_variance"):
            need(isinstance(getattr(self, f), bool), f, f"must be True or False, got {getattr(self, f)!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self.grpo  # GRPOConfig validates its own dials (loss_type, epsilon, beta, temperature)

    @property
    def steps(self) -> int:
        return self.max_steps

    @property
    def grpo(self) -> GRPOConfig:
        return GRPOConfig(loss_type=self.loss_type, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                          beta=self.beta, scale_rewards=self.scale_rewards,
                          skip_zero_variance_groups=self.skip_zero_variance_groups,
                          max_completion_len=self.max_tokens, temperature=self.temperature,
                          negative_weight=self.negative_weight)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict, source: str = RL_CONFIG) -> RLConfig:
        return config_from_dict(cls, d, source, "RL")


def _check_init(init: str) -> Path:
    path = Path(init)
    if not path.is_dir():
        hint = (" A preset's fresh weights never write the <think> format, so GRPO would see only zero rewards;"
                if init in PRESETS else "")
        raise FileNotFoundError(f"RLConfig.init: {init!r} is not a checkpoint directory.{hint} "
                                "run `seekling sft --task TASK --from MODEL` first and pass its model directory "
                                "(e.g. runs/sft/model)")
    return path


def rl(cfg: RLConfig, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Start a new GRPO run in cfg.out_dir; returns the final metrics."""
    _check_init(cfg.init)
    run_dir = Path(cfg.out_dir)
    run_state.init_run(run_dir, cfg, RL_CONFIG, command="seekling rl")
    return _fit(cfg, run_dir, None, on_step=on_step, live=live, plots=plots)


def resume_rl(run_dir: str, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Continue a GRPO run from its newest complete checkpoint."""
    run_dir = Path(run_dir)
    cfg = RLConfig.from_dict(run_state.read_run_config(run_dir, RL_CONFIG, "seekling rl"), str(run_dir / RL_CONFIG))
    return _fit(cfg, run_dir, run_state.find_checkpoint(run_dir), on_step=on_step, live=live, plots=plots)


def _fit(cfg: RLConfig, run_dir: Path, ckpt: Path | None, *, on_step, live, plots) -> dict:
    session_start = time.perf_counter()
    device = default_device()
    if ckpt is None:
        _check_init(cfg.init)  # never a preset: fresh weights would earn only zero rewards
    model, tok = model_and_tokenizer(cfg.init, ckpt)
    model.to(device).train()
    task = get_task(cfg.task, **cfg.knobs)
    gcfg = cfg.grpo
    pool = task.problems("train", cfg.problems, cfg.seed)
    optimizer = build_optimizer(model, cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    start, dtype = restore(run_dir, ckpt, model, optimizer, cfg.steps, dtype)
    prompts = PromptPool(len(pool), cfg.prompts_per_step, cfg.seed, cfg.rest_zero_variance)
    saved = (run_state.read_state(ckpt) or {}).get("prompt_pool") if ckpt is not None else None
    if saved is not None:
        prompts.load_state_dict(saved)
    else:  # a new run, or one checkpointed before the pool kept state (exact when it rested nothing)
        prompts.start_at(start.step)
    # The KL reference is the starting model, frozen: on resume it is read from init again.
    ref = None
    if cfg.beta > 0:
        ref = load(_check_init(cfg.init)).float().to(device).requires_grad_(False) if ckpt is not None \
            else copy.deepcopy(model).requires_grad_(False)
    train_step = TrainStep(model, optimizer, grpo_loss_fn(gcfg),
                           StepConfig(dtype=dtype, grad_clip=cfg.grad_clip, bias_update_gamma=cfg.bias_update_gamma))
    spec = SamplingSpec(group_size=cfg.group_size, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p)
    n_seqs = cfg.prompts_per_step * cfg.group_size
    longest_prompt = max(len(tok.apply_chat_template(task.prompt_messages(p))) for p in pool[:256])
    if longest_prompt + cfg.max_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt (~{longest_prompt} tokens) + max_tokens ({cfg.max_tokens}) exceed the model's "
                         f"max_seq_len ({model.cfg.max_seq_len}); lower --max-tokens")
    # One engine for the whole run, sampling from the parameters being trained: it caches nothing
    # from the weights, so each step's requests see the latest update. Up to 128 completions run at
    # once, and the G completions of a prompt compute it once (EngineConfig.share_prompts): measured
    # on the recipe's rollouts (256 completions, compiled decode, 2 threads of a Zen 5 EPYC), 2.67 s
    # unshared with 64 rows, 1.68 s shared with 64, 1.34 s shared with 128 (more forks at once), 1.38 s with 256.
    max_seqs = min(n_seqs, 128)
    engine = Engine(model, EngineConfig(max_seqs=max_seqs, kv_cache_tokens=max_seqs * (longest_prompt + cfg.max_tokens + 64),
                                        max_batch_tokens=max(512, max_seqs), compile=cfg.compile_rollouts))
    flops = train_flops_per_token(model.cfg.replace(n_mtp_layers=0), longest_prompt + cfg.max_tokens // 2)
    peak = measure_peak_flops(dtype, device)
    print(f"rl: task {cfg.task} {cfg.knobs or ''}, {cfg.steps} steps of {cfg.prompts_per_step} prompts x "
          f"{cfg.group_size} completions (<= {cfg.max_tokens} tokens), {gcfg.loss_type} loss, "
          f"{cfg.updates_per_batch} update(s) per batch; model {model.num_params() / 1e6:.1f}M parameters; "
          f"{str(dtype).removeprefix('torch.')} on {device.type}")

    def eval_report() -> dict:
        return evaluate(model, tok, task, EvalConfig(problems=cfg.eval_problems, k=0, max_tokens=cfg.max_tokens,
                                                     seed=cfg.seed), progress=False)

    if ckpt is None:  # where the run starts from, for the plot and the final comparison
        report = eval_report()
        baseline = {"pass@1": report["pass@1"], "problems": report["problems"], "well_formed": report["greedy_well_formed"]}
        run_state.write_json_atomic(run_dir / BASELINE, baseline)
        print(f"held-out pass@1 before GRPO: {baseline['pass@1']:.1%} ({baseline['problems']} problems)")

    def step(i: int) -> tuple[dict, int]:
        lr = lr_at(i, cfg)
        t0 = time.perf_counter()
        drawn = prompts.draw()
        problems = [pool[j] for j in drawn]
        rollout = sample_groups(engine, tok, task, problems, spec, seed=cfg.seed, step=i)
        t_rollout = time.perf_counter() - t0
        adv, zero_var = group_advantages(rollout.rewards, scale=gcfg.scale_rewards)
        prompts.observe(drawn, zero_var.tolist())
        keep = [j * cfg.group_size + g for j in range(len(problems)) for g in range(cfg.group_size)
                if not (gcfg.skip_zero_variance_groups and zero_var[j])]
        row = {"lr": lr, **rollout.stats(), "zero_var_frac": zero_var.float().mean().item(),
               "rollout_s": t_rollout,
               "rollout_tok_per_s": sum(len(o.output_ids) for o in rollout.outputs) / t_rollout}
        if cfg.rest_zero_variance:
            row["resting"] = len(prompts.resting)  # problems that will sit out their next draw
        if not keep:  # every group unanimous: nothing to learn from this batch, and no step is taken
            return row | {"loss": 0.0, "update_s": 0.0, "trained_seqs": 0}, 0
        batches = share_step_tokens(micro_batches(rollout, adv.flatten(), keep, cfg.micro_batch, tok.pad_id))
        t1 = time.perf_counter()
        if ref is not None or cfg.updates_per_batch > 1:
            with torch.no_grad(), autocast(dtype, device):
                for b in batches:
                    ids, mask = b["input_ids"].to(device), b["completion_mask"].to(device)
                    if ref is not None:
                        b["ref_logp"] = token_logprobs(ref, ids, mask, temperature=cfg.temperature)
                    if cfg.updates_per_batch > 1:
                        b["old_logp"] = token_logprobs(model, ids, mask, temperature=cfg.temperature)
        updates = [train_step(batches, lr) for _ in range(cfg.updates_per_batch)]
        # the first update's ratio is 1 by construction; the later ones show how far the policy moved
        metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0] if k != "expert_load"}
        metrics.pop("tokens", None)
        row |= metrics | {"update_s": time.perf_counter() - t1, "trained_seqs": len(keep)}
        if "expert_load" in updates[-1]:
            row["expert_load"] = updates[-1]["expert_load"]
        return row, sum(int(b["completion_mask"].sum()) for b in batches)

    def evaluate_now() -> tuple[dict, str]:
        report = eval_report()
        val = {"pass@1": report["pass@1"], "well_formed_greedy": report["greedy_well_formed"]}
        return val, f"held-out pass@1 {val['pass@1']:.1%} ({report['problems']} problems)"

    def save(progress: Progress, finished: bool) -> None:
        run_state.save_checkpoint(run_dir, model, optimizer, tok,
                                  progress.state(dtype, finished) | {"rl_config": cfg.to_dict(),
                                                                     "prompt_pool": prompts.state_dict()})

    result = run_loop(step=step, evaluate=evaluate_now, save=save, run_dir=run_dir, model=model, start=start,
                      cadence=Cadence.of(cfg),
                      flops_per_token=flops, peak=peak, on_step=on_step, live=live, session_start=session_start)
    out, rows, trained = summarize(result, first_step=start.step, steps=cfg.steps, run_dir=run_dir,
                                   command="seekling rl", plots=plots)
    if trained and plots:
        plot_rl(run_dir)
    if rows:
        out |= {k: rows[-1][k] for k in ("reward", "accuracy") if k in rows[-1]}
    evals = [r for r in rows if "pass@1" in r]
    if evals:
        out["pass@1"] = evals[-1]["pass@1"]
    if (run_dir / BASELINE).is_file():
        out["pass@1_before"] = json.loads((run_dir / BASELINE).read_text(encoding="utf-8"))["pass@1"]
    if trained:
        before = f" (from {out['pass@1_before']:.1%})" if "pass@1_before" in out else ""
        print(f"done: {out['step']} steps in {fmt_duration(out['elapsed'])}"
              + (f"; held-out pass@1 {out['pass@1']:.1%}{before}" if evals else "") + f"; model in {out['model_dir']}")
    return out
