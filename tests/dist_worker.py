"""One process of a test run of `seekling train`, launched by tests/test_distributed.py as

    python tests/dist_worker.py SPEC.json                              (one process)
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py SPEC.json

SPEC: {"cfg": TrainConfig fields (model as a dict), "resume": bool, "ep": int, "stop_at": step or
null, "kill_rank": rank, "kill_in_save_at": step}. After every step each rank writes its expert
biases to out_dir/bias-r{rank}-s{step}.json and, for an Engram model, a SHA-256 of its (replicated)
Engram tables' bytes to out_dir/tables-r{rank}-s{step}.txt (the test compares ranks). `kill_in_save_at` makes
`kill_rank` die by SIGKILL inside that step's checkpoint, after its DCP shards are written and before
the checkpoint is complete: the crash the atomic save must survive.
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from seekling.config import ModelConfig
from seekling.model.engram import table_parameters
from seekling.train import state as run_state
from seekling.train import trainer
from seekling.train.balance import moe_gates
from seekling.train.config import TrainConfig

torch.set_num_threads(1)
spec = json.loads(Path(sys.argv[1]).read_text())
rank = int(os.environ.get("RANK", "0"))
out = Path(spec["cfg"]["out_dir"])


def on_step(step, model, display):
    biases = [g.e_score_correction_bias.tolist() for g in moe_gates(model)]
    (out / f"bias-r{rank}-s{step}.json").write_text(json.dumps(biases))
    tables = table_parameters(model)
    if tables:
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for _, p in tables)).hexdigest()
        (out / f"tables-r{rank}-s{step}.txt").write_text(digest)
    return spec.get("stop_at") is not None and step >= spec["stop_at"]


if spec.get("kill_in_save_at") is not None and rank == spec.get("kill_rank"):
    save_sharded = run_state.save_sharded

    def dying_save(path, model, optimizer):
        save_sharded(path, model, optimizer)
        if f"ckpt-{spec['kill_in_save_at']:06d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    run_state.save_sharded = dying_save

if spec.get("resume"):
    trainer.resume(str(out), on_step=on_step, live=False, plots=False, ep=spec.get("ep", 1))
else:
    d = dict(spec["cfg"], model=ModelConfig(**spec["cfg"]["model"]))
    trainer.train(TrainConfig(**d), on_step=on_step, live=False, plots=False, ep=spec.get("ep", 1))
