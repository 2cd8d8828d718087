"""Training configuration: one frozen, keyword-only dataclass, and per-preset defaults.

`TrainConfig` says everything a run needs to be repeated exactly: the model (a preset name or a
full ModelConfig), the data, the batch geometry, the optimizer and schedule, the balancing knobs
and where to write. It round-trips through JSON (`to_dict` / `from_dict`) so that a run directory
holds its own recipe and `resume` needs nothing but the directory.

Left out: distributed settings (world size, expert-parallel size). They are launch settings
(`torchrun --nproc_per_node N -m seekling train --ep E`, trainer.train(dp=, ep=)), not part of the
recipe, so that one run directory resumes at any world size; batch_size is the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from seekling.config import ModelConfig
from seekling.presets import PRESETS, get_preset
from seekling.validate import checker, config_from_dict

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Steps count optimizer steps; one step sees batch_size * seq_len * grad_accum tokens."""

    model: str | ModelConfig = "tiny"  # a preset name (seekling.presets) or a ModelConfig
    data: str | None = None  # a .txt/.md/.jsonl file or directory; None: the embedded Shakespeare corpus
    token_cache_dir: str | None = None  # where tokenized shards are cached; None: ~/.cache/seekling/tokens
    out_dir: str = "runs/run"
    # batch geometry
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int | None = 1000
    token_budget: int | None = None  # alternative to max_steps: train on this many tokens (rounded up to whole steps)
    # optimizer: AdamW with decoupled weight decay on matrices only
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd only: the last fraction of steps decays linearly to the min lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    # DeepSeek-V3 specifics (section 2.2 and 2.1.2)
    mtp_lambda: float = 0.3  # MTP loss weight; V3 used 0.3 for the first 10T tokens, then 0.1
    bias_update_gamma: float = 1e-3  # aux-loss-free balancing speed; 0 turns it off
    seq_aux_alpha: float = 0.0  # sequence-wise balance loss weight; V3 used 1e-4
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    ckpt_every: int = 100  # 0: only at the end (and on SIGINT/SIGTERM)
    seed: int = 0
    dtype: str = "auto"  # "auto": bf16 autocast only where the CPU/GPU has native bf16, else fp32
    compile: bool = False
    time_limit_s: float | None = None  # stop cleanly (checkpoint saved, resumable) after this much training time

    def __post_init__(self):
        need = checker("TrainConfig")

        if isinstance(self.model, str):
            need(self.model in PRESETS, "model", f"unknown preset {self.model!r}; choose one of {', '.join(PRESETS)} "
                 "or pass a ModelConfig")
        else:
            need(isinstance(self.model, ModelConfig), "model",
                 f"must be a preset name or a ModelConfig, got {type(self.model).__name__}")
        need(self.data is None or (isinstance(self.data, str) and self.data != ""), "data",
             "must be a path to a .txt/.md/.jsonl file or directory, or None for the embedded corpus")
        need(isinstance(self.out_dir, str) and self.out_dir.strip() != "", "out_dir",
             "must be a directory path, e.g. runs/my-run")
        for f in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, f"must be a positive integer, got {v!r}")
        for f in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f, f"must be a non-negative integer, got {v!r}")
        need((self.max_steps is None) != (self.token_budget is None), "max_steps",
             f"set exactly one of max_steps ({self.max_steps}) and token_budget ({self.token_budget}); set the other to None")
        for f in ("max_steps", "token_budget"):
            v = getattr(self, f)
            need(v is None or (isinstance(v, int) and v > 0), f, f"must be a positive integer or None, got {v!r}")
        need(self.seq_len <= self.model_config.max_seq_len, "seq_len",
             f"({self.seq_len}) exceeds the model's max_seq_len ({self.model_config.max_seq_len}); lower seq_len")
        need(self.warmup_steps < self.steps, "warmup_steps",
             f"({self.warmup_steps}) must be smaller than the run's {self.steps} steps; lower warmup_steps")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive learning rate, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        need(0.0 < self.decay_fraction <= 1.0, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
             f"must be two numbers in [0, 1), e.g. (0.9, 0.95); got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # lists from JSON
        need(self.eps > 0, "eps", f"must be positive, got {self.eps}")
        need(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.mtp_lambda >= 0, "mtp_lambda", f"must be >= 0, got {self.mtp_lambda}")
        need(self.bias_update_gamma >= 0, "bias_update_gamma",
             f"must be >= 0 (0 disables the bias update), got {self.bias_update_gamma}")
        need(self.seq_aux_alpha >= 0, "seq_aux_alpha", f"must be >= 0 (DeepSeek-V3 used 1e-4), got {self.seq_aux_alpha}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        need(isinstance(self.compile, bool), "compile", f"must be True or False, got {self.compile!r}")
        need(not (self.compile and self.model_config.has_engram), "compile",
             "cannot train an Engram model yet: Inductor cannot compile the tables' sparse gradients "
             "(torch 2.13: 'Cannot access storage of SparseTensorImpl'); train it without --compile")
        need(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s",
             f"must be positive or None, got {self.time_limit_s}")

    @property
    def model_config(self) -> ModelConfig:
        return get_preset(self.model) if isinstance(self.model, str) else self.model

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def steps(self) -> int:
        """Optimizer steps in the whole run (max_steps, or the token budget in whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.token_budget // self.tokens_per_step)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready: a ModelConfig becomes a dict of its fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.model, ModelConfig):
            d["model"] = dataclasses.asdict(self.model)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "train_config.json") -> TrainConfig:
        d = dict(d)
        if isinstance(d.get("model"), dict):
            try:
                d["model"] = ModelConfig(**d["model"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: {e}") from None
        return config_from_dict(cls, d, source, "training")


# Per-preset training defaults. The batch geometry and lr were picked on a 2-core AVX2 CPU (tiny,
# small) or scaled by the usual lr ~ 1/width rule for the GPU sizes; max_steps sets the run length.
# Short CPU runs use a 10x faster expert-bias update than DeepSeek-V3's 1e-3: measured on tiny
# (80 steps of 4x128 tokens), gamma 1e-3 left the busiest expert of each router at ~3.5x its fair
# share (4.0 = every token) while 1e-2 brought it to ~1.3x, with a slightly lower loss.
_PRESET_TRAIN = {
    # ~1.7k tokens/s on 2 cores (43 MFLOP per trained token): 400 steps of 8x256 tokens take ~8 minutes.
    # The demo (seekling/train/demo.py) sizes its own step count to its time budget.
    "tiny": dict(batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30, max_steps=400, eval_every=100, ckpt_every=100,
                 bias_update_gamma=1e-2),
    # ~1 hour on the same CPU: 120 MFLOP per trained token (seekling.train.flops.train_flops_per_token)
    # at ~75 GFLOP/s is ~600 tokens/s, so 550 steps of 8x512 tokens.
    "small": dict(batch_size=8, seq_len=512, lr=2e-3, warmup_steps=40, max_steps=550, eval_every=110, ckpt_every=55,
                  bias_update_gamma=1e-2),
    "gpu_100m": dict(batch_size=32, seq_len=1024, lr=1.5e-3, warmup_steps=500, max_steps=20000, schedule="wsd",
                     eval_every=1000, ckpt_every=1000, eval_batches=50),
    "gpu_1b": dict(batch_size=64, seq_len=2048, lr=8e-4, warmup_steps=2000, max_steps=50000, schedule="wsd",
                   eval_every=2000, ckpt_every=1000, eval_batches=50),
}
_PRESET_TRAIN["tiny_mhc"] = _PRESET_TRAIN["tiny"]  # tiny with mHC streams: the same run, for a like-for-like comparison
_PRESET_TRAIN["tiny_engram"] = _PRESET_TRAIN["tiny"]  # tiny with Engram: likewise


def train_preset(name: str, **overrides) -> TrainConfig:
    """Training defaults for a model preset; keyword overrides replace any field (None values are ignored)."""
    if name not in _PRESET_TRAIN:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESET_TRAIN)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown training setting(s) {unknown}; valid ones are {sorted(known)}")
    fields = {"model": name, "out_dir": f"runs/{name}", **_PRESET_TRAIN[name]}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("token_budget") is not None and overrides.get("max_steps") is None:
        fields["max_steps"] = None  # a token budget replaces the preset's step count
    steps = fields.get("max_steps")
    if overrides.get("warmup_steps") is None and steps is not None and steps <= fields["warmup_steps"]:
        fields["warmup_steps"] = steps // 10  # a short run asked for: keep the warmup inside it
    return TrainConfig(**fields)
