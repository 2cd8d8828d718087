"""Engram (seekling/model/engram.py, seekling/engram_vocab.py): hashing pinned against a plain-Python
reference, the decode step path against the full-sequence path token by token, gating and the short
convolution against a slow reference, the compressed-id map on the shipped tokenizer, and the
table's sparse gradient."""

import ast
import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import seekling.model.engram as engram_module
from seekling.engram_vocab import build_compressed_vocab, normalize_token_text
from seekling.model.engram import (Engram, EngramConfig, EngramState, EngramVocab, engram_primes, is_prime,
                                   layer_multipliers, ngram_hashes, ngram_windows, table_parameters)

pytestmark = pytest.mark.usefixtures("one_thread")

MASK64 = (1 << 64) - 1


def wrap64(x: int) -> int:
    """Python int -> the int64 two's-complement value it wraps to."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def reference_hashes(seq, pad, mults, primes, N, H):
    """The paper's formula over one sequence, in plain Python ints: (T, (N-1)*H) head indices."""
    out = []
    for t in range(len(seq)):
        row = []
        for n in range(2, N + 1):
            mix = 0
            for k in range(n):
                tok = seq[t - k] if t - k >= 0 else pad
                mix = wrap64(mix ^ wrap64(tok * mults[k]))
            row += [mix % primes[(n - 2) * H + j] for j in range(H)]
        out.append(row)
    return out


# --------------------------------------------------------------------------------- config


def test_config_validation_names_field_and_fix():
    with pytest.raises(ValueError, match=r"EngramConfig.embed_dim.*multiple of n_heads"):
        EngramConfig(layers=(1,), embed_dim=10, n_heads=4)
    with pytest.raises(ValueError, match=r"EngramConfig.layers.*strictly increasing"):
        EngramConfig(layers=(3, 1))
    with pytest.raises(ValueError, match=r"EngramConfig.head_rows.*needs 2 entries"):
        EngramConfig(layers=(1,), max_ngram=3, head_rows=(100,))
    with pytest.raises(ValueError, match=r"EngramConfig.max_ngram"):
        EngramConfig(max_ngram=1)
    cfg = EngramConfig(layers=[0, 2], head_rows=[11, 13])  # as JSON gives them
    assert cfg.layers == (0, 2) and cfg.head_rows == (11, 13) and hash(cfg)
    assert cfg.window == 3 * 3 and cfg.key_dim == 2 * 128 and not EngramConfig().enabled


# -------------------------------------------------------------------------------- hashing


def test_is_prime_matches_a_sieve():
    n = 5000
    sieve = [True] * n
    sieve[0] = sieve[1] = False
    for i in range(2, n):
        if sieve[i]:
            for j in range(i * i, n, i):
                sieve[j] = False
    assert [i for i in range(n) if is_prime(i)] == [i for i in range(n) if sieve[i]]


def test_primes_follow_the_demo_search_and_are_distinct():
    cfg = EngramConfig(layers=(0, 5), max_ngram=3, n_heads=2, head_rows=11, embed_dim=4)
    # Layer 0: order 2 searches from 11 - 1, so a prime head_rows is itself the first head -> 11, 13;
    # order 3 restarts there and skips the taken -> 17, 19.
    # Layer 5 continues past every taken prime.
    assert engram_primes(cfg) == {0: (11, 13, 17, 19), 5: (23, 29, 31, 37)}
    big = EngramConfig(layers=(1, 4, 9), max_ngram=4, n_heads=3, head_rows=(1000, 5000, 1000), embed_dim=6)
    ps = [p for layer in big.layers for p in engram_primes(big)[layer]]
    assert len(ps) == len(set(ps)) == 3 * 3 * 3 and all(is_prime(p) for p in ps)
    for layer in big.layers:
        for j, p in enumerate(engram_primes(big)[layer]):
            assert p >= big.order_rows[j // 3]


# The multipliers of (seed 0, layer 1, vocab 4096, N 3), as numpy 2.x's default_rng draws them today.
# Pinned: if numpy's Generator stream ever changes, fresh models would hash differently (saved ones
# keep theirs, the multipliers are a checkpoint buffer), and this test says so.
PINNED_MULTIPLIERS = [1853913003275055, 117088135214507, 869950158561757]


def test_multipliers_pinned_odd_and_overflow_free():
    cfg = EngramConfig(layers=(1,), max_ngram=3)
    m = layer_multipliers(cfg, 1, 4096)
    assert m == PINNED_MULTIPLIERS
    assert all(x % 2 == 1 for x in m)
    assert all(4095 * x < 1 << 63 for x in m)  # no product of an id and a multiplier wraps
    assert layer_multipliers(cfg, 2, 4096) != m and layer_multipliers(EngramConfig(seed=1), 1, 4096) != m


def _hash_case():
    cfg = EngramConfig(layers=(1, 3), max_ngram=4, n_heads=3, head_rows=(101, 211, 307), embed_dim=6)
    seqs = [[5, 17, 4095, 0, 5, 17, 4095], [4095] * 3 + [2, 2, 1, 4094]]
    return cfg, seqs


def _torch_hashes(cfg, seqs, V=4096, pad=2):
    out = {}
    for layer in cfg.layers:
        grams = ngram_windows(torch.tensor(seqs), torch.tensor(pad), cfg.max_ngram)
        h = ngram_hashes(grams, torch.tensor(layer_multipliers(cfg, layer, V)),
                         torch.tensor(engram_primes(cfg)[layer]), cfg.n_heads)
        out[layer] = h.tolist()
    return out


def test_hashes_equal_plain_python_reference():
    cfg, seqs = _hash_case()
    got = _torch_hashes(cfg, seqs)
    for layer in cfg.layers:
        mults, primes = layer_multipliers(cfg, layer, 4096), engram_primes(cfg)[layer]
        for b, seq in enumerate(seqs):
            assert got[layer][b] == reference_hashes(seq, 2, mults, primes, cfg.max_ngram, cfg.n_heads)
    # The pinned multipliers feed the reference too, so the whole chain is fixed for layer 1.
    assert layer_multipliers(EngramConfig(layers=(1,), max_ngram=3), 1, 4096) == PINNED_MULTIPLIERS
    cfg3 = EngramConfig(layers=(1,), max_ngram=3, n_heads=2, head_rows=97, embed_dim=4)
    assert _torch_hashes(cfg3, [seqs[0]])[1][0] == reference_hashes(seqs[0], 2, PINNED_MULTIPLIERS,
                                                                   engram_primes(cfg3)[1], 3, 2)


def test_hashes_identical_across_processes():
    cfg, seqs = _hash_case()
    code = ("import json; from tests.test_engram import _hash_case, _torch_hashes; "
            "c, s = _hash_case(); print(json.dumps(_torch_hashes(c, s)))")
    # Another process with a fixed str-hash seed (this one's is random): set or dict order must not
    # leak into the primes or the hashes.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PATH": ""}, cwd=".")
    assert {int(k): v for k, v in json.loads(r.stdout).items()} == _torch_hashes(cfg, seqs)


# ------------------------------------------------------------------- gating and convolution


def _make(cfg, layer, *, V=40, dim=16, hc=1, seed=0):
    torch.manual_seed(seed)
    m = Engram(cfg, layer, dim=dim, vocab_size=V, hc_mult=hc)
    # Large weights and non-trivial norms, biases and conv taps, so that every term matters.
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.5) + (1.0 if "norm" in name else 0.0))
    return m


def slow_engram(m: Engram, cfg: EngramConfig, h, grams):
    """The layer written out from the paper's formulas for one sequence: h (T,n,D), grams (T,N)."""
    T, n, D = h.shape
    N, H = cfg.max_ngram, cfg.n_heads
    primes, offsets = engram_primes(cfg)[cfg.layers[m.state_index]], m.offsets.tolist()

    def rms(x, w, eps):
        return w * x / torch.sqrt((x * x).mean() + eps)

    vs = torch.zeros(T, n, D)
    for t in range(T):
        seq = grams[t].tolist()
        rows = []
        for o in range(2, N + 1):
            mix = 0
            for k in range(o):
                mix ^= seq[k] * int(m.multipliers[k])
            for j in range(H):
                g = (o - 2) * H + j
                rows.append(m.table.weight[offsets[g] + mix % primes[g]])
        e = torch.cat(rows)
        value = m.value_proj.weight @ e + m.value_proj.bias
        for s in range(n):
            key = m.key_proj.weight[s] @ e + m.key_proj.bias[s]
            gate = rms(key, m.key_norm.weight[s], m.key_norm.eps) @ rms(h[t, s], m.query_norm.weight[s],
                                                                         m.query_norm.eps) / D ** 0.5
            gate = torch.sign(gate) * torch.sqrt(torch.clamp(gate.abs(), min=1e-6))
            vs[t, s] = torch.sigmoid(gate) * value
    out = torch.zeros(T, n, D)
    K, dil = cfg.kernel_size, cfg.conv_dilation
    w = m.conv.weight[:, 0, :].reshape(n, D, K)
    for t in range(T):
        for s in range(n):
            acc = torch.zeros(D)
            for i in range(K):
                src = t - (K - 1 - i) * dil
                if src >= 0:
                    acc += w[s, :, i] * rms(vs[src, s], m.conv_norm.weight[s], m.conv_norm.eps)
            out[t, s] = vs[t, s] + torch.nn.functional.silu(acc)
    return out


@pytest.mark.parametrize("hc", [1, 3])
def test_layer_matches_slow_reference(hc):
    cfg = EngramConfig(layers=(0, 2), max_ngram=3, n_heads=2, head_rows=(31, 37), embed_dim=8)
    m, voc = _make(cfg, 2, hc=hc), EngramVocab(cfg, 40)
    ids = torch.randint(0, 40, (2, 11))
    h = torch.randn(2, 11, hc, 16)
    eng = voc(ids)
    with torch.no_grad():
        got = m(h if hc > 1 else h[:, :, 0], eng)
        got = got if hc > 1 else got.unsqueeze(2)
        for b in range(2):
            torch.testing.assert_close(got[b], slow_engram(m, cfg, h[b], eng.grams[b]), atol=1e-5, rtol=1e-5)


def test_wrong_stream_count_is_a_clear_error():
    cfg = EngramConfig(layers=(0,), n_heads=2, head_rows=11, embed_dim=4)
    m, voc = Engram(cfg, 0, dim=8, vocab_size=20, hc_mult=2), EngramVocab(cfg, 20)
    with pytest.raises(ValueError, match="stream"):
        m(torch.randn(1, 3, 8), voc(torch.zeros(1, 3, dtype=torch.long)))


# ------------------------------------------------------------------------ incremental decoding


def _schedule(lengths, rng):
    """Steps of (sequence, n fed, n kept): prefill chunks and decodes of different sequences in one
    batch, some sequences idle in a step, and speculative feeds that keep only the first token."""
    pos, steps = [0] * len(lengths), []
    while any(p < L for p, L in zip(pos, lengths)):
        step = []
        for i, L in enumerate(lengths):
            if pos[i] >= L or rng.random() < 0.25:
                continue
            n = min(L - pos[i], rng.choice([1, 1, 2, 3, 6]))
            spec = n == 1 and pos[i] > 0 and L - pos[i] > 1 and rng.random() < 0.5
            step.append((i, 3 if spec else n, 1 if spec else n))
            pos[i] += 1 if spec else n
        if step:
            steps.append(step)
    return steps


@pytest.mark.parametrize("hc,N,dil", [(1, 3, None), (2, 4, 2)])
def test_step_path_equals_full_sequence_token_by_token(hc, N, dil):
    V, D = 40, 16
    cfg = EngramConfig(layers=(0, 2), max_ngram=N, n_heads=2, head_rows=29, embed_dim=8, dilation=dil)
    voc = EngramVocab(cfg, V)
    rng = random.Random(0)
    voc.load_map([rng.randrange(25) for _ in range(V)])  # a compressing map, with merges
    layers = [_make(cfg, layer, V=V, dim=D, hc=hc, seed=layer) for layer in cfg.layers]
    lengths = [13, 5, 20, 1]
    seqs = [torch.randint(0, V, (L,)) for L in lengths]
    hs = [torch.randn(L, hc, D) for L in lengths]  # each layer's input at each position, fixed

    def shaped(h):
        return h if hc > 1 else h[..., 0, :]

    with torch.no_grad():
        # Full path, right-padded batch; check it against each sequence alone on the way.
        Tm = max(lengths)
        ids_b = torch.stack([torch.cat((s, torch.zeros(Tm - len(s), dtype=torch.long))) for s in seqs])
        h_b = torch.stack([torch.cat((h, torch.randn(Tm - len(h), hc, D))) for h in hs])
        full = [m(shaped(h_b), voc(ids_b)) for m in layers]
        for b, (s, h) in enumerate(zip(seqs, hs)):
            for m, f in zip(layers, full):
                torch.testing.assert_close(f[b, :len(s)], m(shaped(h[None]), voc(s[None]))[0], atol=1e-6, rtol=1e-6)

        state = EngramState(cfg, n_slots=6, dim=D, hc_mult=hc)
        state.ids.random_(0, 25)
        state.conv.normal_()  # stale garbage: fresh segments must ignore it
        slots = [4, 0, 5, 2]
        pos = [0] * len(lengths)
        n_checked = 0
        steps = _schedule(lengths, rng)
        # The schedule must mix prefill chunks with decodes in one batch and include rejected drafts.
        assert any({n > 1 for _, n, _ in step} == {True, False} for step in steps)
        assert any(k < n for step in steps for _, n, k in step)
        for step in steps:
            ids, h, want = [], [], []
            for i, n_fed, n_keep in step:
                real = seqs[i][pos[i]:pos[i] + n_fed]
                junk = torch.randint(0, V, (n_fed - len(real),))  # rejected drafts past the end
                if n_keep < n_fed:  # a speculative feed: the first token is right, the drafts are junk
                    real, junk = seqs[i][pos[i]:pos[i] + 1], torch.randint(0, V, (n_fed - 1,))
                ids.append(torch.cat((real, junk)))
                h.append(torch.cat((hs[i][pos[i]:pos[i] + len(real)], torch.randn(len(junk), hc, D))))
                want.append((i, pos[i], n_keep))
            batch = state.batch([slots[i] for i, _, _ in step], [pos[i] for i, _, _ in step],
                                [n for _, n, _ in step])
            eng = voc(torch.cat(ids)[None], batch)
            outs = [m(shaped(torch.cat(h)[None]), eng)[0] for m in layers]
            off = 0
            for (i, p, k), fed in zip(want, ids):
                for m_out, f in zip(outs, full):
                    torch.testing.assert_close(m_out[off:off + k], f[i, p:p + k], atol=1e-5, rtol=1e-5)
                    n_checked += k
                off += len(fed)
            batch.commit([k for _, _, k in step])
            for i, _, k in step:
                pos[i] += k
        assert pos == lengths and n_checked == 2 * sum(lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hashes_and_layer_match_cpu():
    cfg, seqs = _hash_case()
    V = 4096
    for layer in cfg.layers:
        grams = ngram_windows(torch.tensor(seqs, device="cuda"), torch.tensor(2, device="cuda"), cfg.max_ngram)
        h = ngram_hashes(grams, torch.tensor(layer_multipliers(cfg, layer, V), device="cuda"),
                         torch.tensor(engram_primes(cfg)[layer], device="cuda"), cfg.n_heads)
        assert h.tolist() == _torch_hashes(cfg, seqs)[layer]
    small = EngramConfig(layers=(0,), n_heads=2, head_rows=29, embed_dim=8)
    m, voc = _make(small, 0, hc=2), EngramVocab(small, 40)
    ids, h = torch.randint(0, 40, (2, 9)), torch.randn(2, 9, 2, 16)
    with torch.no_grad():
        want = m(h, voc(ids))
        got = m.cuda()(h.cuda(), voc.cuda()(ids.cuda()))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_commit_rejects_bad_keep_and_early_commit():
    cfg = EngramConfig(layers=(0,), n_heads=2, head_rows=11, embed_dim=4)
    state = EngramState(cfg, n_slots=2, dim=8)
    batch = state.batch([0, 1], [0, 0], [3, 2])
    with pytest.raises(RuntimeError, match="before a forward"):
        batch.commit()
    Engram(cfg, 0, dim=8, vocab_size=20)(torch.randn(1, 5, 8),
                                         EngramVocab(cfg, 20)(torch.zeros(1, 5, dtype=torch.long), batch))
    with pytest.raises(ValueError, match="keep"):
        batch.commit([4, 1])


# ----------------------------------------------------------------------------- sparse table


def test_table_gradient_is_sparse_and_touches_only_looked_up_rows():
    cfg = EngramConfig(layers=(0,), max_ngram=3, n_heads=2, head_rows=1009, embed_dim=8)
    m, voc = Engram(cfg, 0, dim=16, vocab_size=50), EngramVocab(cfg, 50)
    ids = torch.randint(0, 50, (2, 9))
    eng = voc(ids)
    m(torch.randn(2, 9, 16), eng).square().sum().backward()
    g = m.table.weight.grad
    assert g.is_sparse
    rows = sorted(set((ngram_hashes(eng.grams, m.multipliers, m.primes, 2) + m.offsets).flatten().tolist()))
    assert g.coalesce().indices()[0].tolist() == rows
    assert len(rows) < m.table.weight.shape[0] // 50
    assert table_parameters(m) == [("table.weight", m.table.weight)]
    # Everything else trains densely, and every piece is on the gradient path.
    for name, p in m.named_parameters():
        if name != "table.weight":
            assert not p.grad.is_sparse and p.grad.abs().sum() > 0, name

    before = m.table.weight.detach().clone()
    torch.optim.SparseAdam([m.table.weight], lr=1e-2).step()
    changed = (m.table.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == rows


# ----------------------------------------------------------------------- compressed-id map


def reference_key(text: str) -> str:
    """The demo's normaliser with Python's unicodedata, independently of the `tokenizers` library."""
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = "".join(c for c in s if unicodedata.category(c) != "Mn").lower()
    s = re.sub(r"[ \t\r\n]+", " ", s)
    return " " if s == " " else s.strip()


@pytest.fixture(scope="module")
def default_vocab():
    from seekling.tokenizer import load_default_tokenizer
    tok = load_default_tokenizer()
    return tok, build_compressed_vocab(tok)


def test_compressed_map_on_default_tokenizer(default_vocab):
    tok, cv = default_vocab
    c = cv.compress
    assert len(c) == tok.vocab_size and cv.n_compressed == max(c) + 1
    # Numbered by first appearance: each new id is the next unused one.
    seen = -1
    for x in c:
        assert x <= seen + 1
        seen = max(seen, x)
    # Merges are exactly equal normalised texts (independent reference), specials and partial
    # UTF-8 byte tokens never merge.
    specials = set(tok.special_ids.values())
    by_key: dict = {}
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if i in specials or "\ufffd" in text:
            key = ("own", i)
        else:
            key = reference_key(text) or text
        by_key.setdefault(key, set()).add(c[i])
    assert all(len(v) == 1 for v in by_key.values())  # equal keys -> one id
    assert len(by_key) == cv.n_compressed  # distinct keys -> distinct ids
    a, space_a = tok.encode("A"), tok.encode(" a")
    assert len(a) == len(space_a) == 1 and c[a[0]] == c[space_a[0]]
    assert 0.1 < cv.reduction < 0.5 and f"{tok.vocab_size} -> {cv.n_compressed}" in cv.summary()
    assert normalize_token_text("  Éte\n\t") == "ete" and normalize_token_text("\n\n") == " "


def test_compressed_map_is_deterministic(default_vocab):
    tok, cv = default_vocab
    assert build_compressed_vocab(tok) == cv


class _ToyTokenizer:
    """Texts chosen to collide: a special spelled like ordinary text, case and accent variants,
    whitespace runs, and two different partial UTF-8 byte tokens."""

    texts = ["<|pad|>", "<|PAD|>", "Été", " ete", "\n\n", " \t", "\ufffd", "\ufffd", "x"]
    raw = {6: b"\xc3", 7: b"\xa9"}
    special_ids = {"<|pad|>": 0}
    vocab_size = len(texts)

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)

    def token_bytes(self, i):
        return self.raw.get(i, self.texts[i].encode())


def test_compressed_map_merges_only_what_it_should():
    cv = build_compressed_vocab(_ToyTokenizer())
    # special alone; "<|PAD|>" its own; accents/case/space merged; whitespace runs -> " "; byte tokens apart.
    assert cv.compress == (0, 1, 2, 2, 3, 3, 4, 5, 6)
    assert cv.keys[1:4] == ("<|pad|>", "ete", " ")


def test_engram_vocab_installs_map_and_rejects_wrong_ones(default_vocab):
    tok, cv = default_vocab
    cfg = EngramConfig(layers=(0,))
    voc = EngramVocab(cfg, tok.vocab_size)
    voc.load_map(cv.compress)
    assert voc.compress.tolist() == list(cv.compress) and int(voc.pad) == cv.compress[tok.pad_id]
    with pytest.raises(ValueError, match="shape"):
        voc.load_map(cv.compress[:-1])
    with pytest.raises(ValueError, match="lie in"):
        voc.load_map([tok.vocab_size] * tok.vocab_size)
    with pytest.raises(ValueError, match="pad_id"):
        EngramVocab(EngramConfig(pad_id=10), 10)


def test_model_module_imports_nothing_outside_the_model():
    # The model layer knows nothing of tokenizers, checkpoints, training or serving (STYLE.md).
    tree = ast.parse(Path(engram_module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    ours = sorted(n for n in names if n.startswith("seekling"))
    assert ours == ["seekling.validate"]
