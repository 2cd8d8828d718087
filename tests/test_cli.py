"""The command line: help, info on presets and checkpoints, clear errors."""

import subprocess
import sys

import pytest

from seekling.checkpoint import save
from seekling.cli import main
from seekling.model.transformer import Transformer
from seekling.presets import PRESETS, get_preset
from seekling.stats import model_stats


def test_help(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "seekling.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "tokenizer" in out.stdout


@pytest.mark.parametrize("preset", list(PRESETS))
def test_info_preset(preset, capsys):
    assert main(["info", preset]) == 0
    out = capsys.readouterr().out
    assert "parameters, active per token" in out and "KV cache per token" in out
    assert ("mHC: 4 streams" in out) == (preset == "tiny_mhc") and ("plain (one stream)" in out) != (preset == "tiny_mhc")


def test_info_checkpoint(tmp_path, capsys):
    cfg = get_preset("tiny").replace(n_layers=2, vocab_size=256)
    save(Transformer(cfg), tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert f"{model_stats(cfg).total_params:,}" in capsys.readouterr().out


def test_info_bad_path(capsys):
    assert main(["info", "/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "neither a preset" in err and "Traceback" not in err


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stats_match_the_real_model(preset):
    import torch

    cfg = get_preset(preset)
    with torch.device("meta"):
        m = Transformer(cfg)
    s = model_stats(cfg)
    assert s.total_params == m.num_params()
    assert s.active_params == m.num_params(active=True)
    assert s.kv_latent_bytes_per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


@pytest.mark.parametrize("flags, options", [([], ()), (["--compile"], (("compile", True),))])
def test_serve_passes_compile_to_the_engine(monkeypatch, flags, options):
    import seekling.serve

    seen = {}
    monkeypatch.setattr(seekling.serve, "run_server", lambda model, **kw: seen.update(kw))
    assert main(["serve", "--model", "some/dir", *flags]) == 0
    assert seen["engine_options"] == options
