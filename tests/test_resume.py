"""Checkpoints that never lose work: bit-exact resume, kill -9 at a random moment, SIGTERM, and
the crash debris (half-written checkpoints and log lines) that resume must step over."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_support import _private_cache, data_dir, tiny_config  # noqa: F401 (fixtures)

from seekling.presets import get_preset
from seekling.train.state import find_checkpoint, read_metrics
from seekling.train.trainer import resume, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce, logged at every step."""
    out = tmp_path_factory.mktemp("straight") / "run"
    # the same single thread as every test (set by _private_cache): results depend on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(data_dir, out, max_steps=STEPS, grad_accum=2, batch_size=2), live=False, plots=False)
    finally:
        torch.set_num_threads(threads)
    return read_metrics(out)


def same_run(a: list[dict], b: list[dict]) -> None:
    """Everything a run decides (not its timings) is identical, step by step."""
    keys = ("step", "tokens", "loss", "mtp_loss", "lr", "grad_norm", "expert_load", "val_loss", "val_bpb")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys}, f"step {ra['step']} differs"


def test_resume_is_bit_exact(data_dir, tmp_path, straight):
    cfg = tiny_config(data_dir, tmp_path / "run", max_steps=STEPS, grad_accum=2, batch_size=2, ckpt_every=0)
    # stop after step 5 (between checkpoints and evaluations: the stop itself saves), then resume
    first = train(cfg, on_step=lambda step, *_: step == 5, live=False, plots=False)
    assert first["stopped"] == "stopped by the caller" and first["step"] == 5 and not first["finished"]
    assert find_checkpoint(tmp_path / "run").name == "ckpt-000005"
    second = resume(str(tmp_path / "run"), live=False, plots=False)
    assert second["finished"] and second["step"] == STEPS
    same_run(straight, read_metrics(tmp_path / "run"))
    assert (tmp_path / "run" / "latest").read_text().strip() == f"ckpt-{STEPS:06d}"
    assert [p.name for p in (tmp_path / "run").glob("ckpt-*")] == [f"ckpt-{STEPS:06d}"]  # older ones removed


def test_resume_skips_crash_debris(data_dir, tmp_path, straight):
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, max_steps=STEPS, grad_accum=2, batch_size=2, ckpt_every=4)
    train(cfg, on_step=lambda step, *_: step == 6, live=False, plots=False)  # checkpoints at 4 and 6; 4 removed
    # what a kill -9 can leave: a half-written newer checkpoint, a checkpoint dir whose state.json
    # never got written, a half-deleted older one, a stale `latest`, a torn last log line
    (run / "ckpt-000008.tmp").mkdir()
    (run / "ckpt-000008.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    (run / "ckpt-000010").mkdir()
    (run / "ckpt-000010" / "config.json").write_text("{}")
    (run / "ckpt-000002.del").mkdir()
    (run / "latest").write_text("ckpt-000010\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    assert find_checkpoint(run).name == "ckpt-000006"
    resume(str(run), live=False, plots=False)
    same_run(straight, read_metrics(run))
    assert not (run / "ckpt-000008.tmp").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_subprocess_resumes(data_dir, tmp_path, straight, sig):
    """Train in a child process, kill it at a random moment after its first checkpoint, resume here."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, max_steps=STEPS, grad_accum=2, batch_size=2, ckpt_every=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    child = textwrap.dedent(f"""
        import json, time
        from seekling.train.config import TrainConfig
        from seekling.train.trainer import train
        cfg = TrainConfig.from_dict(json.load(open({str(tmp_path / "cfg.json")!r})))
        # slow each step down so the kill lands mid-run whatever this machine's speed
        train(cfg, on_step=lambda *a: time.sleep(0.15), live=False, plots=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while find_checkpoint(run) is None:
            assert proc.poll() is None, f"child exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.6))
        assert proc.poll() is None, "the child finished before it could be killed; slow its steps down further"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:  # a clean stop: finishes the step, saves, says how to continue, exits 0
        assert proc.returncode == 0, out
        assert "SIGTERM" in out and f"seekling train --resume {run}" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    interrupted_at = find_checkpoint(run).name
    assert interrupted_at != f"ckpt-{STEPS:06d}"
    resume(str(run), live=False, plots=False)
    same_run(straight, read_metrics(run))
    # the stable model dir is whole and current
    from seekling.checkpoint import load

    assert load(run / "model").cfg.dim == 32
    assert json.loads((run / f"ckpt-{STEPS:06d}" / "state.json").read_text())["finished"]


def test_resume_without_checkpoint_starts_over(data_dir, tmp_path, straight):
    """Killed before its first checkpoint: nothing to lose, resume trains from step 0."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, run, max_steps=STEPS, grad_accum=2, batch_size=2)
    from seekling.train.state import init_run

    init_run(run, cfg)
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    resume(str(run), live=False, plots=False)
    same_run(straight, read_metrics(run))


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_two_processes_log_identical_runs(data_dir, tmp_path, dtype):
    """The same run twice, in two fresh processes with two threads each: every logged value equal.

    Two threads because that is where runs diverged: advanced indexing's backward summed the K
    copies of a routed token from several threads in a varying order (a 2-core AVX-512 EPYC
    differed from step ~10). The tiny preset's routing (top-4 of 16), narrowed to two layers, is
    big enough for that kernel to go parallel (TINY_MODEL is not).
    """
    model = get_preset("tiny").replace(n_layers=2, dim=128)
    logs = []
    for name in ("a", "b"):
        cfg = tiny_config(data_dir, tmp_path / name, model=model, max_steps=6, batch_size=2, seq_len=64,
                          eval_every=3, ckpt_every=3, dtype=dtype)
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg.to_dict()))
        child = textwrap.dedent(f"""
            import json, torch
            from seekling.train.config import TrainConfig
            from seekling.train.trainer import train
            torch.set_num_threads(2)
            train(TrainConfig.from_dict(json.load(open({str(tmp_path / f"{name}.json")!r}))), live=False, plots=False)
        """)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
        proc = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        logs.append(read_metrics(tmp_path / name))
    assert len(logs[0]) == 6 and "val_loss" in logs[0][-1]
    same_run(*logs)


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="seekling train"):
        resume(str(tmp_path / "nothing-here"), live=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resume(str(tmp_path / "bad"), live=False)
