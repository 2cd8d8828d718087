"""`seekling sft`: cold-start supervised fine-tuning on a task's worked solutions (R1's first stage).

    seekling sft --task addition --from runs/demo/model --steps 300 --out runs/sft
    seekling sft --resume runs/sft

A thin driver, as pretraining is: the step is the shared `train.core.TrainStep` with the masked
next-token loss (targets only on the assistant turn, sft_data.py), and the bookkeeping is the
shared `train.loop.run_loop` (metrics.jsonl, progress, evaluation, atomic checkpoints, SIGINT/SIGTERM,
the time limit). A run resumes bit-exactly like a pretraining run: batches are a pure function of
(seed, step), the schedule of the step, the weights and AdamW moments come from the checkpoint.

Evaluation every `eval_every` steps logs the held-out completion loss and greedy pass@1 on
`eval_problems` held-out problems, through the engine (r1/evaluate.py), so a run shows whether the
model learned the task, not only the format.
`--from` takes a checkpoint directory (a pretrained model; its tokenizer is used when it has one) or
a preset name (fresh weights). Left out: packing and MTP (a short answer gives MTP little to predict).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path


from seekling.checkpoint import load, read_config
from seekling.device import default_device, resolve_dtype
from seekling.engram_vocab import install_engram_vocab
from seekling.model.transformer import Transformer
from seekling.presets import PRESETS, get_preset
from seekling.r1.evaluate import EvalConfig, evaluate
from seekling.r1.sft_data import IGNORE, batch_order, collate, sft_example, sft_examples
from seekling.r1.tasks import TASKS, get_task
from seekling.tokenizer import SeeklingTokenizer, load_default_tokenizer
from seekling.train import state as run_state
from seekling.train.core import StepConfig, TrainStep, next_token_loss
from seekling.train.core import evaluate as eval_loss
from seekling.train.flops import measure_peak_flops, train_flops_per_token
from seekling.train.loop import Cadence, Progress, restore, run_loop, summarize
from seekling.train.optim import build_optimizer, lr_at
from seekling.train.progress import fmt_duration
from seekling.validate import checker, config_from_dict

SFT_CONFIG = "sft_config.json"


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """One SFT run. Field names shared with TrainConfig mean the same (optim.lr_at and build_optimizer take either)."""

    task: str = "addition"
    knobs: dict = field(default_factory=dict)  # the task's difficulty knobs, e.g. {"digits": 2}
    init: str = "tiny"  # a checkpoint directory, or a preset name for fresh weights
    out_dir: str = "runs/sft"
    max_steps: int = 300
    batch_size: int = 16
    examples: int = 4000  # distinct train-split problems; batches cycle through them in seeded epochs
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.0  # fine-tuning: no pull toward zero on the pretrained weights
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    bias_update_gamma: float = 1e-3  # keep the experts balanced on the new data
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_problems: int = 50
    eval_max_tokens: int = 192
    ckpt_every: int = 100  # 0: only at the end
    seed: int = 0
    dtype: str = "auto"
    time_limit_s: float | None = None

    def __post_init__(self):
        need = checker("SFTConfig")
        need(self.task in TASKS, "task", f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        need(isinstance(self.knobs, dict), "knobs", f"must be a dict of the task's knobs, got {self.knobs!r}")
        get_task(self.task, **self.knobs)  # its own clear error for a bad knob
        need(isinstance(self.init, str) and self.init.strip() != "", "init",
             f"must be a preset name ({', '.join(PRESETS)}) or a checkpoint directory, got {self.init!r}")
        for f in ("max_steps", "batch_size", "examples", "log_every", "eval_problems", "eval_max_tokens"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        for f in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, f"must be an integer >= 0, got {v!r}")
        need(self.warmup_steps < self.max_steps, "warmup_steps",
             f"({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive learning rate, got {self.lr}")
        need(self.schedule in ("cosine", "wsd"), "schedule", f"must be 'cosine' or 'wsd', got {self.schedule!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        need(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s", f"must be positive or None, got {self.time_limit_s}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # lists from JSON

    @property
    def steps(self) -> int:
        return self.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict, source: str = SFT_CONFIG) -> SFTConfig:
        return config_from_dict(cls, d, source, "SFT")


def sft(cfg: SFTConfig, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Start a new SFT run in cfg.out_dir; returns the final metrics."""
    if cfg.init not in PRESETS and not Path(cfg.init).is_dir():  # checked here: a resumed run no longer needs it
        raise FileNotFoundError(f"SFTConfig.init: {cfg.init!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                                "checkpoint directory; train one with `seekling demo` or `seekling train`")
    run_dir = Path(cfg.out_dir)
    run_state.init_run(run_dir, cfg, SFT_CONFIG, command="seekling sft")
    return _fit(cfg, run_dir, None, on_step=on_step, live=live, plots=plots)


def resume_sft(run_dir: str, *, on_step=None, live: bool | None = None, plots: bool = True) -> dict:
    """Continue an SFT run from its newest complete checkpoint."""
    run_dir = Path(run_dir)
    cfg = SFTConfig.from_dict(run_state.read_run_config(run_dir, SFT_CONFIG, "seekling sft"), str(run_dir / SFT_CONFIG))
    return _fit(cfg, run_dir, run_state.find_checkpoint(run_dir), on_step=on_step, live=live, plots=plots)


def model_and_tokenizer(init: str, ckpt: Path | None, seed: int = 0):
    """The starting model (fp32 master weights) and its tokenizer: fresh weights of the preset `init`
    (seeded), or the checkpoint directory `init` with its tokenizer (the default one if it has none);
    a resumed run's model is rebuilt from its checkpoint `ckpt` (the weights are loaded later, with
    the optimizer state). Refuses a tokenizer with more ids than the model's vocabulary."""
    if ckpt is not None:
        model, tok = Transformer(read_config(ckpt)), SeeklingTokenizer.load(ckpt)
    elif init in PRESETS:
        model = Transformer(get_preset(init))
        model.init_weights(seed)
        tok = load_default_tokenizer()
        if model.cfg.has_engram:  # fresh Engram weights need the tokenizer's compressed ids, as pretraining's do
            install_engram_vocab(model, tok)
    else:
        path = Path(init)
        tok = SeeklingTokenizer.load(path) if (path / "tokenizer.json").is_file() else load_default_tokenizer()
        model = load(path).float()
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
    return model, tok


def _fit(cfg: SFTConfig, run_dir: Path, ckpt: Path | None, *, on_step, live, plots) -> dict:
    session_start = time.perf_counter()
    device = default_device()
    model, tok = model_and_tokenizer(cfg.init, ckpt, cfg.seed)
    model.to(device).train()
    task = get_task(cfg.task, **cfg.knobs)
    examples = sft_examples(task, tok, cfg.examples, cfg.seed)
    # The held-out problems evaluation scores (pass@1) also give the held-out loss of their worked solutions.
    held = [sft_example(task, p, tok) for p in task.problems("test", cfg.eval_problems, cfg.seed)]
    max_len = model.cfg.max_seq_len
    collate(examples + held, tok.pad_id, max_len)  # fail now, with a clear error, if any example is too long
    optimizer = build_optimizer(model, cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    start, dtype = restore(run_dir, ckpt, model, optimizer, cfg.steps, dtype)
    train_step = TrainStep(model, optimizer, next_token_loss(), StepConfig(dtype=dtype, grad_clip=cfg.grad_clip,
                                                                           bias_update_gamma=cfg.bias_update_gamma))
    mean_len = sum(len(e.ids) for e in examples) / len(examples)
    flops = train_flops_per_token(model.cfg.replace(n_mtp_layers=0), round(mean_len))
    peak = measure_peak_flops(dtype, device)
    print(f"sft: task {cfg.task} {cfg.knobs or ''}, {len(examples):,} worked solutions (~{mean_len:.0f} tokens each), "
          f"{cfg.steps} steps of {cfg.batch_size}; model {model.num_params() / 1e6:.1f}M parameters; "
          f"{str(dtype).removeprefix('torch.')} on {device.type}")

    def step(i: int) -> tuple[dict, int]:
        lr = lr_at(i, cfg)
        x, y = collate([examples[j] for j in batch_order(len(examples), i, cfg.batch_size, cfg.seed)], tok.pad_id)
        metrics = train_step([(x, y)], lr)
        row = {"loss": metrics["loss"], "lr": lr, "grad_norm": metrics.get("grad_norm")}
        if "expert_load" in metrics:
            row["expert_load"] = metrics["expert_load"]
        return row, int((y != IGNORE).sum())  # tokens that carry a loss

    def evaluate_now() -> tuple[dict, str]:
        total, n = eval_loss(model, [collate(held, tok.pad_id)], dtype)
        report = evaluate(model, tok, task, EvalConfig(problems=cfg.eval_problems, k=0, max_tokens=cfg.eval_max_tokens,
                                                       seed=cfg.seed), progress=False)
        val = {"val_loss": total / n, "pass@1": report["pass@1"], "well_formed": report["greedy_well_formed"]}
        return val, f"held-out loss {val['val_loss']:.4f}, pass@1 {val['pass@1']:.1%} ({report['problems']} problems)"

    def save(progress: Progress, finished: bool) -> None:
        run_state.save_checkpoint(run_dir, model, optimizer, tok,
                                  progress.state(dtype, finished) | {"sft_config": cfg.to_dict()})

    result = run_loop(step=step, evaluate=evaluate_now, save=save, run_dir=run_dir, model=model, start=start,
                      cadence=Cadence.of(cfg),
                      flops_per_token=flops, peak=peak, on_step=on_step, live=live, session_start=session_start)
    out, rows, trained = summarize(result, first_step=start.step, steps=cfg.steps, run_dir=run_dir,
                                   command="seekling sft", plots=plots)
    if rows:
        out["loss"] = rows[-1]["loss"]
    evals = [r for r in rows if "pass@1" in r]
    if evals:
        out |= {k: evals[-1][k] for k in ("val_loss", "pass@1")}
    if trained:
        print(f"done: {out['step']} steps in {fmt_duration(out['elapsed'])}"
              + (f"; held-out pass@1 {out['pass@1']:.1%}" if evals else "") + f"; model in {out['model_dir']}")
    return out
