"""`seekling generate`, `chat` and `inspect` end to end on a small random checkpoint."""

import subprocess
import sys

import pytest
import torch

from seekling.checkpoint import save
from seekling.cli import main
from seekling.inference.engine import Engine
from seekling.inference.sampling import SamplingParams
from seekling.model.transformer import Transformer
from seekling.presets import tiny
from seekling.tokenizer import load_default_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save(Transformer(tiny().replace(n_layers=2, dim=64, inter_dim=96, moe_inter_dim=32, max_seq_len=256)), d)
    load_default_tokenizer().save(d)
    return d


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_generate_streams_the_engines_greedy_tokens(model_dir, capsys, flags):
    assert main(["generate", "--model", str(model_dir), "ROMEO:", "--temperature", "0", "--max-tokens", "12", *flags]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert ("compiling the decode step" in captured.err) == bool(flags)
    import seekling

    tok = load_default_tokenizer()
    model = seekling.load(model_dir)
    ref = Engine(model).generate([[tok.bos_id] + tok.encode("ROMEO:")], SamplingParams(temperature=0, max_tokens=12))[0]
    want = "ROMEO:" + tok.decode([t for t in ref.output_ids if t != tok.eos_id])
    assert out.rstrip("\n") == want


def test_generate_seed_is_reproducible(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "To be", "--seed", "7", "--max-tokens", "10", "--top-k", "50"]
    main(args)
    a = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == a


def test_generate_errors(model_dir, capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "word " * 400]) == 2
    captured = capsys.readouterr()
    assert "max_seq_len" in captured.err and captured.out == ""
    save(Transformer(tiny().replace(n_layers=1, dim=32, inter_dim=32, moe_inter_dim=8)), tmp_path)
    assert main(["generate", "--model", str(tmp_path), "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_chat_repl(model_dir):
    script = "Hello there\n/reset\nWho are you?\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "seekling.cli", "chat", "--model", str(model_dir), "--max-tokens", "8",
                          "--seed", "1"], input=script, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("seekling>") == 2
    assert "history cleared" in out.stdout
    assert "Traceback" not in out.stderr


def test_inspect(model_dir, tmp_path, capsys):
    png = tmp_path / "r.png"
    assert main(["inspect", "--model", str(model_dir), "To be, or not to be", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "layer 1" in out and "expert usage" in out and "' be'" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_text_stream_reassembles_characters_split_across_tokens():
    """Pieces pushed one token at a time join into the full decode, with no half characters shown."""
    from seekling.terminal import TextStream

    tok = load_default_tokenizer()
    text = "Ünïcödé — 東京 🙂 and <think> plain"
    ids = tok.encode(text)
    assert any(not tok.token_bytes(i).decode("utf-8", errors="ignore") == tok.token_bytes(i).decode("utf-8", "replace")
               for i in ids), "the sample should split a character across tokens"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
