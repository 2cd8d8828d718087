"""`seekling r1`: the whole R1 recipe in one command: a base model, cold-start SFT, then GRPO.

    seekling r1                         # 45 minutes on a 2-core laptop CPU; runs/r1/r1.png
    seekling r1 --pretrain              # pretrain a base on the embedded corpus first (5 more minutes)
    seekling r1 --base runs/demo/model  # reuse a pretrained model (or --base PRESET for fresh weights)

Stages, each an ordinary run directory under --out that its own command can resume or inspect:
  base/  with --pretrain only: `seekling demo`'s pretraining of the tiny preset on the embedded corpus;
  sft/   `seekling sft` on the task's worked solutions: the model learns the <think> format and the
         column method, imperfectly (the point of the next stage);
  rl/    `seekling rl`: GRPO on the same task's training problems, held-out pass@1 every few steps.
Then the held-out pass@1 of the SFT model and of the GRPO model, on the same problems with the same
greedy decoding, and `r1.png`: held-out pass@1 over the SFT steps, then training reward, accuracy
and held-out pass@1 over the GRPO steps.

The default task is 2-digit addition and subtraction: the tiny model reaches 52-62% of the
held-out problems after SFT and samples right a little less often, so most GRPO groups mix right
and wrong answers and carry signal. By default SFT starts from the tiny preset's fresh weights, not
from a corpus-pretrained base: measured on this task, 600 SFT steps from fresh weights reach 52-54%
held-out pass@1 and the same steps from `seekling demo`'s 5-minute base 17-23% (its prose prior
and its unbalanced expert load work against the arithmetic format), and the 5 minutes go to GRPO.
Re-running continues where it stopped: a finished stage is kept, an interrupted one resumes from its
checkpoint. A total time limit keeps the promise on a slower machine: GRPO stops cleanly (and
resumably) when the budget is spent.
Left out: choosing hyperparameters per machine; the stage settings are fixed so that the result is
the same on every machine, only the time differs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from seekling.presets import PRESETS
from seekling.r1.evaluate import EvalConfig, evaluate
from seekling.r1.plots import plot_rl
from seekling.r1.rl import BASELINE, RL_CONFIG, RLConfig, resume_rl, rl
from seekling.r1.sft import SFT_CONFIG, SFTConfig, resume_sft, sft
from seekling.r1.tasks import get_task
from seekling.terminal import load_model_dir
from seekling.train import state as run_state
from seekling.train.progress import fmt_duration

TASK, KNOBS = "addition", {"digits": 2}
BASE_PRESET = "tiny"
# Both stages in fp32 on every machine: the result should not depend on which dtype a CPU prefers
# (measured: the same 600 SFT steps reached 62.0% held-out pass@1 in fp32 and 52.5% under bf16
# autocast), and fp32 is the faster one on an Intel Xeon that lists avx512_bf16 without AMX.
# SFT: 600 steps of 16 worked solutions (~4.5 minutes on 2 cores).
SFT_SETTINGS = dict(max_steps=600, batch_size=16, lr=1e-3, eval_every=200, eval_problems=100, ckpt_every=200,
                    dtype="float32")
# GRPO: 32 prompts x 8 completions per step, dapo loss with clip-higher, lr 3e-5. 1e-4 made held-out
# pass@1 fall from 53% to 40-47% within 20 steps with 16 prompts (the policy gradient of 16 groups is
# mostly noise, and AdamW turns noise into steps of size lr on every weight); 5e-5 and 6e-5 gained
# 1.5-3.5 points in 100-150 steps; 32 prompts per step rose steadily where 16 wandered (from one SFT model:
# 57.0 / 59.5 / 61.0 / 63.0 / 67.0 / 67.0% at 50..300 steps against 54.5 / 59.0 / 57.5 / 57.5 /
# 61.5 / 59.0%). Two updates per batch gained less per step at 1.5x the step time. This recipe,
# measured (README, "Where it stands"): 62.0% -> 70.5 / 72.5 / 72.5 / 75.5 / 78.0 / 79.5% at 50..300.
# Rollouts use the compiled decode step: ~20% faster sampling for a ~1 minute compile.
# 400 steps since the engine computes each prompt once for its 8 completions (rollouts ~2x faster):
# measured on a 2-core Zen 5 EPYC, 27 minutes for the whole recipe (GRPO 3.4 s per step) where 300
# steps took 36-41 before; on that seed 400 steps ended where 300 had (68.5% from 55.0%).
RL_SETTINGS = dict(max_steps=400, prompts_per_step=32, group_size=8, max_tokens=128, lr=3e-5, warmup_steps=5,
                   eval_every=50, eval_problems=200, ckpt_every=25, compile_rollouts=True, dtype="float32")
_FINAL_RESERVE_S = 180.0
DEFAULT_BUDGET_S = 45 * 60


def _stage_done(run_dir: Path) -> bool:
    ckpt = run_state.find_checkpoint(run_dir)
    return ckpt is not None and bool((run_state.read_state(ckpt) or {}).get("finished"))


def _run_stage(name: str, run_dir: Path, config_name: str, start, resume) -> None:
    if _stage_done(run_dir):
        print(f"[{name}] {run_dir} is finished; keeping it")
    elif (run_dir / config_name).is_file():
        print(f"[{name}] resuming {run_dir}")
        resume(str(run_dir))
    else:
        start()


def run_recipe(out_dir: str = "runs/r1", base: str | None = None, time_budget_s: float = DEFAULT_BUDGET_S,
               seed: int = 0, live: bool | None = None, *, pretrain: bool = False, sft_changes: dict | None = None,
               rl_changes: dict | None = None) -> dict:
    """Base (fresh, pretrained or reused) -> SFT -> GRPO -> held-out comparison and plot; returns the figures.

    base: a checkpoint directory or a preset name (fresh weights); None: BASE_PRESET, or with
    `pretrain` a base pretrained here first. `sft_changes` / `rl_changes` override the stage
    settings (the tests run the recipe small)."""
    if pretrain and base is not None:
        raise ValueError(f"--pretrain and --base {base} both name the base model; pass one of them")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft_dir, rl_dir = out / "sft", out / "rl"
    base = BASE_PRESET if base is None and not pretrain else base
    if base in PRESETS:
        base_model = base
        print(f"[base] fresh {base} weights")
    elif base is None:
        base_dir = out / "base"
        # A base cut short by its time budget is still the one SFT started from: once SFT has begun,
        # finishing the base on a re-run would cost minutes and change nothing downstream.
        if not _stage_done(base_dir) and not (sft_dir / SFT_CONFIG).is_file():
            from seekling.train.demo import run_demo  # pretraining pulls in the corpus: only when needed

            print("[base] pretraining the tiny preset on the embedded corpus (about 5 minutes)")
            result = run_demo(out_dir=str(base_dir), time_budget_s=300.0, live=live)
            if result.get("stopped") and "time limit" not in result["stopped"]:
                return result
        base_model = base_dir / run_state.MODEL_DIR
    else:
        base_model = Path(base)
        if not (base_model / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: no config.json there; pass a checkpoint directory such as "
                                    f"runs/demo/model (written by `seekling demo`) or a preset ({', '.join(PRESETS)})")
        print(f"[base] reusing {base_model}")

    sft_cfg = SFTConfig(task=TASK, knobs=KNOBS, init=str(base_model), out_dir=str(sft_dir), seed=seed,
                        **(SFT_SETTINGS | (sft_changes or {})))
    _run_stage("sft", sft_dir, SFT_CONFIG, lambda: sft(sft_cfg, live=live), lambda d: resume_sft(d, live=live))
    if not _stage_done(sft_dir):
        return {"stopped": "sft did not finish", "run_dir": str(out)}

    # Kept back from GRPO's time limit: one held-out evaluation (when GRPO stops between its own) and
    # the plot. Measured ~20 s on an idle 2-core CPU and ~100 s with other jobs on it.
    left = time_budget_s - (time.perf_counter() - t0) - _FINAL_RESERVE_S
    rl_cfg = RLConfig(task=TASK, knobs=KNOBS, init=str(sft_dir / run_state.MODEL_DIR), out_dir=str(rl_dir),
                      seed=seed, time_limit_s=max(60.0, left), **(RL_SETTINGS | (rl_changes or {})))
    _run_stage("rl", rl_dir, RL_CONFIG, lambda: rl(rl_cfg, live=live), lambda d: resume_rl(d, live=live))

    # Before and after on the same held-out problems, greedy: the GRPO run evaluated its starting
    # (SFT) model and evaluates at every eval_every steps and at its last; only a run stopped between
    # two evaluations needs one more here.
    baseline = json.loads((rl_dir / BASELINE).read_text(encoding="utf-8"))
    rows = run_state.read_metrics(rl_dir)
    last = rows[-1] if rows else {}
    if "pass@1" in last:
        after = last["pass@1"]
    else:
        model, tok = load_model_dir(str(rl_dir / run_state.MODEL_DIR))
        after = evaluate(model, tok, get_task(TASK, **KNOBS), EvalConfig(problems=baseline["problems"], k=0,
                         max_tokens=rl_cfg.max_tokens, seed=seed), progress=False)["pass@1"]
    figures = {"pass@1_sft": baseline["pass@1"], "pass@1_rl": after, "rl_steps": last.get("step", 0)}
    png = plot_rl(rl_dir, sft_dir=sft_dir, out=out / "r1.png")
    gain = figures["pass@1_rl"] - figures["pass@1_sft"]
    figures |= {"problems": baseline["problems"], "gain_points": round(100 * gain, 1), "rl_finished": _stage_done(rl_dir),
                "wall_s": time.perf_counter() - t0, "plot": str(png)}
    run_state.write_json_atomic(out / "r1.json", figures)
    print(f"\nr1 recipe {'finished' if figures['rl_finished'] else 'stopped (run `seekling r1` again to continue)'} "
          f"in {fmt_duration(figures['wall_s'])} this session.\n"
          f"held-out pass@1 on {figures['problems']} problems of {TASK} {json.dumps(KNOBS)}: "
          f"after SFT {figures['pass@1_sft']:.1%}, after {figures['rl_steps']} GRPO steps {figures['pass@1_rl']:.1%} "
          f"({gain * 100:+.1f} points)\n"
          f"plot: {png}; figures: {out / 'r1.json'}\n"
          f"next:\n  seekling chat --model {rl_dir / run_state.MODEL_DIR}\n"
          f"  seekling serve --model {rl_dir / run_state.MODEL_DIR}\n"
          f"  seekling eval --task {TASK} --knob digits={KNOBS['digits']} --model {rl_dir / run_state.MODEL_DIR}")
    return figures
