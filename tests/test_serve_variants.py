"""The server on the model variants (mHC streams, Engram memory, both): the official client's greedy
completion equals the argmax of repeated full forwards of the same checkpoint, so whatever decode
state a variant needs (Engram's per-sequence n-gram history) reaches it through the one engine."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from test_train_support import TINY_MODEL

import seekling
from seekling.engram_vocab import install_engram_vocab
from seekling.model.transformer import Transformer
from seekling.presets import with_engram
from seekling.serve import create_app
from seekling.serve.testing import ServerThread
from seekling.tokenizer import load_default_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py says why

VARIANTS = {
    "mhc": TINY_MODEL.replace(hc_mult=2),
    "engram": with_engram(TINY_MODEL, layers=(0, 1), n_heads=2, head_rows=997, embed_dim=32),
    "engram+mhc": with_engram(TINY_MODEL.replace(hc_mult=2), layers=(1,), n_heads=2, head_rows=997, embed_dim=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_served_greedy_completion_is_the_models(tmp_path, variant):
    tok = load_default_tokenizer()
    model = Transformer(VARIANTS[variant])  # saved in fp32; the server keeps a checkpoint's dtype
    model.init_weights(1)
    if model.cfg.has_engram:
        install_engram_vocab(model, tok)
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # peaked logits: greedy ties cannot hide a wrong state
    seekling.save(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    model = seekling.load(tmp_path / "m", dtype=torch.float32).eval()

    prompt = tok.encode("To be, or not to be, that is")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # the reference: a full forward over everything so far, no cache, no state
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    want = tok.decode(ids[len(prompt):])

    with ServerThread(create_app(str(tmp_path / "m"), model_name="v")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(2) as pool:  # two in flight: a batched decode keeps each sequence's own state
            outs = list(pool.map(lambda p: client.completions.create(model="v", prompt=p, max_tokens=12,
                                                                     temperature=0.0),
                                 [prompt, tok.encode("Hello, hello")]))
    assert outs[0].choices[0].text == want
