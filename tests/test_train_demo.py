"""`seekling demo` end to end, shrunk: the tiny test model and a small data file stand in for the
tiny preset and the corpus, the same code path runs (budget, samples, checkpoint, plots, next steps)."""

import pytest
from test_train_support import TINY_MODEL, _private_cache, data_dir  # noqa: F401 (fixtures)

from seekling.train import demo
from seekling.train.config import train_preset
from seekling.train.state import find_checkpoint, read_state, read_train_config


@pytest.fixture
def small_demo(data_dir, monkeypatch):
    def preset(name, **overrides):
        assert name == "tiny"
        return train_preset(name, **overrides).replace(
            model=TINY_MODEL, data=str(data_dir / "data.txt"), token_cache_dir=str(data_dir / "cache"),
            batch_size=4, seq_len=32, eval_batches=2)

    monkeypatch.setattr(demo, "train_preset", preset)
    monkeypatch.setattr(demo, "_OVERHEAD_S", 56.0)  # leaves ~2-4 s of a 60 s budget for training


def test_demo_runs_end_to_end(small_demo, tmp_path, capsys):
    result = demo.run_demo(str(tmp_path / "demo"), time_budget_s=60, max_new_tokens=8)
    out = capsys.readouterr().out
    assert "\x1b" not in out  # not a TTY: plain text
    assert out.count("--- sample ") == 3  # before, half-way, after
    assert "measured" in out and "s per step" in out
    assert f"seekling generate --model {tmp_path / 'demo' / 'model'}" in out
    assert result["step"] >= 60 and "val_bpb" in result
    assert read_state(find_checkpoint(tmp_path / "demo"))["finished"] or result["stopped"]
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "demo" / "loss.png").is_file()


def test_demo_resumes_an_interrupted_run_and_replaces_a_finished_one(small_demo, tmp_path, capsys, monkeypatch):
    run = tmp_path / "demo"
    monkeypatch.setattr("seekling.train.plots.plot_run", lambda run_dir: [])  # drawn in the test above
    real_train = demo.train
    # interrupt the first demo after 20 steps, as Ctrl-C would
    monkeypatch.setattr(demo, "train", lambda cfg, on_step, live: real_train(cfg, on_step=lambda s, *a: s == 20, live=live))
    first = demo.run_demo(str(run), time_budget_s=60, max_new_tokens=4)
    assert first["stopped"] and first["step"] == 20
    planned = read_train_config(run).max_steps
    monkeypatch.setattr(demo, "train", real_train)
    second = demo.run_demo(str(run), time_budget_s=60, max_new_tokens=4)
    out = capsys.readouterr().out
    assert "resuming it" in out and "from ckpt-000020" in out
    assert read_train_config(run).max_steps == planned  # the schedule chosen up front is kept
    assert second["step"] > 20 and (second["step"] == planned or second["stopped"])
    demo.run_demo(str(run), time_budget_s=60, max_new_tokens=4)
    assert "replacing the earlier demo" in capsys.readouterr().out
