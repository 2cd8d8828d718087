"""`seekling sft` (r1/sft.py): a short run learns, evaluates held-out pass@1, and resumes bit-exactly."""

import pytest
from test_train_support import TINY_MODEL, _private_cache  # noqa: F401 (fixture)

import seekling
from seekling.cli import main
from seekling.model.transformer import Transformer
from seekling.r1.sft import SFTConfig, resume_sft, sft
from seekling.tokenizer import load_default_tokenizer
from seekling.train.state import find_checkpoint, read_metrics

STEPS = 12


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny 'pretrained' checkpoint with its tokenizer: what `--from` takes."""
    d = tmp_path_factory.mktemp("base") / "model"
    model = Transformer(TINY_MODEL.replace(max_seq_len=160))
    model.init_weights(0)
    seekling.save(model, d)
    load_default_tokenizer().save(d)
    return d


def _cfg(base_model, out, **changes):
    fields = dict(task="addition", knobs={"digits": 2}, init=str(base_model), out_dir=str(out), max_steps=STEPS,
                  batch_size=8, examples=64, lr=3e-3, warmup_steps=2, log_every=1, eval_every=6, eval_problems=4,
                  eval_max_tokens=24, ckpt_every=4, dtype="float32")
    return SFTConfig(**(fields | changes))


@pytest.fixture(scope="module")
def straight(base_model, tmp_path_factory, one_thread):  # the single thread of every test: results depend on it
    out = tmp_path_factory.mktemp("sft") / "run"
    result = sft(_cfg(base_model, out), live=False, plots=False)
    return result, read_metrics(out)


def test_sft_learns_and_evaluates(straight):
    result, rows = straight
    assert result["finished"] and result["step"] == STEPS
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # the worked solutions are being learned (8.35 -> 7.33 here)
    evals = [r for r in rows if "pass@1" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 <= r["pass@1"] <= 1.0 and r["val_loss"] > 0 and 0.0 <= r["well_formed"] <= 1.0 for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 1.0
    assert seekling.load(result["model_dir"]).cfg.max_seq_len == 160


def test_sft_resumes_bit_exactly(base_model, tmp_path, straight):
    out = tmp_path / "run"
    first = sft(_cfg(base_model, out), on_step=lambda step, *_: step == 5, live=False, plots=False)
    assert first["stopped"] == "stopped by the caller" and find_checkpoint(out).name == "ckpt-000005"
    resume_sft(str(out), live=False, plots=False)
    keys = ("step", "tokens", "loss", "lr", "grad_norm", "expert_load", "val_loss", "pass@1")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(out)] == [{k: r.get(k) for k in keys} for r in straight[1]]


def test_sft_command_and_errors(base_model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sft", "--task", "addition", "--knob", "digits=2", "--from", str(base_model), "--out", str(out),
                 "--steps", "3", "--warmup", "1", "--examples", "16", "--eval-every", "3", "--eval-problems", "2",
                 "--dtype", "float32"]) == 0
    assert "pass@1" in capsys.readouterr().out and find_checkpoint(out) is not None
    assert main(["sft", "--resume", str(out)]) == 0  # finished: nothing to do, and said so
    assert "already finished" in capsys.readouterr().out
    assert main(["sft", "--task", "addition", "--from", str(tmp_path / "missing")]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["sft", "--task", "addition", "--from", str(base_model), "--out", str(out)]) == 2
    assert "seekling sft --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="SFTConfig.task"):
        SFTConfig(task="chess")
    with pytest.raises(ValueError, match="no knob"):
        SFTConfig(task="addition", knobs={"digitz": 2})
