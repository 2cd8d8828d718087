"""mHC's fused CPU kernels (seekling/model/mhc_kernels.c) against the plain forms, values and gradients."""

import subprocess
import sys
import textwrap

import pytest
import torch

from seekling.config import ModelConfig
from seekling.model import mhc, mhc_kernels
from seekling.model.transformer import Transformer
from tests.test_mhc import TINY

pytestmark = pytest.mark.skipif(not mhc_kernels.available(), reason=f"mHC kernels unavailable: {mhc_kernels.status()}")

EPS = 1e-6


def _inputs(n, D, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = (2 + n) * n
    return dict(x=torch.randn(N, n, D, generator=g, dtype=torch.float64),
                fn=torch.randn(M, n * D, generator=g, dtype=torch.float64) * 0.05,
                base=torch.randn(M, generator=g, dtype=torch.float64) * 0.3,
                scale=torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
                f=torch.randn(N, D, generator=g, dtype=torch.float64))


def _block_by_reference(x, fn, base, scale, f, iters):
    """V4's expressions (fp64 here): coefficients, read, write; and the mixed streams the kernels hand over."""
    pre, post, comb = mhc.hc_coefficients(x, fn, base, scale, sinkhorn_iters=iters, hc_eps=EPS, norm_eps=EPS)
    return mhc.read_reference(x, pre), mhc.write_reference(x, f, post, comb), post, mhc.mix_reference(x, comb)


def _block_by_kernels(x, fn, base, scale, f, iters):
    y, post, mixed = mhc_kernels.read(x, fn, base, scale, sinkhorn_iters=iters, hc_eps=EPS, norm_eps=EPS)
    return y, mhc_kernels.write(mixed, f, post), post, mixed


def _values_and_grads(block, inputs, dtype, iters, upstream):
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    outs = block(**leaves, iters=iters)
    loss = sum((o * u.to(dtype)).sum() for o, u in zip(outs, upstream))
    loss.backward()
    return list(outs) + [leaves[k].grad for k in inputs]


def _assert_close_relative(got, want, rel=2e-5):
    # fp32 kernels against fp64 references: the error relative to the tensor's own scale.
    for a, b in zip(got, want):
        err = (a.double() - b).abs().max().item()
        assert err <= rel * b.abs().max().item() + 1e-12, (err, b.abs().max().item())


@pytest.mark.parametrize("n,D,N,iters", [(4, 256, 130, 20), (4, 44, 17, 20), (4, 24, 64, 0), (2, 40, 7, 1),
                                         (3, 24, 65, 5), (5, 16, 33, 20), (3, 64, 50, 20)])
def test_hyper_connection_kernels_match_the_plain_forms_with_gradients(n, D, N, iters, one_thread):
    # Every n (4 has its own vectorised path, others the generic loops), D not a multiple of 8 (the
    # tails), D = 64 with n = 3 (the tiled products, in panels, with M = 15 rows: tiles and leftover
    # rows), token counts around the 16-token coefficient blocks and the 64-token parallel threshold,
    # Sinkhorn off, one round and many; gradients for every input through the whole read + write, with
    # upstream gradients on post and on the mixed streams too (each reaches the read's backward twice).
    inputs = _inputs(n, D, N)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, n, D, generator=g, dtype=torch.float64),
                torch.randn(N, n, generator=g, dtype=torch.float64), torch.randn(N, n, D, generator=g, dtype=torch.float64)]
    want = _values_and_grads(_block_by_reference, inputs, torch.float64, iters, upstream)
    got = _values_and_grads(_block_by_kernels, inputs, torch.float32, iters, upstream)
    assert all(t.dtype == torch.float32 for t in got)
    _assert_close_relative(got, want)


def test_head_kernel_matches_the_plain_form_with_gradients(one_thread):
    n, D, N = 4, 40, 37
    g = torch.Generator().manual_seed(2)
    x, hfn = torch.randn(N, n, D, generator=g, dtype=torch.float64), torch.randn(n, n * D, generator=g, dtype=torch.float64) * 0.05
    hb, hs = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(1, generator=g, dtype=torch.float64) + 0.5
    up = torch.randn(N, D, generator=g, dtype=torch.float64)

    def reference(x, hfn, hb, hs):
        return mhc.read_reference(x, torch.sigmoid(mhc.mixes_reference(x, hfn, EPS) * hs + hb) + EPS)

    def kernels(x, hfn, hb, hs):
        return mhc_kernels.read(x, hfn, hb, hs, sinkhorn_iters=0, hc_eps=EPS, norm_eps=EPS, head=True)[0]

    results = []
    for fn, dt in ((reference, torch.float64), (kernels, torch.float32)):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, hfn, hb, hs)]
        y = fn(*leaves)
        (y * up.to(dt)).sum().backward()
        results.append([y] + [t.grad for t in leaves])
    _assert_close_relative(results[1], results[0])


def test_kernels_give_the_same_bits_at_any_thread_count():
    # Tokens are independent in every kernel, so the OpenMP split cannot change a sum's order.
    n, D, N = 4, 64, 300
    g = torch.Generator().manual_seed(3)
    mixed, grad = torch.randn(N, n, D, generator=g), torch.randn(N, n, D, generator=g)
    f = torch.randn(N, D, generator=g)
    post = torch.rand(N, n, generator=g)
    runs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append((mhc_kernels._write(mixed, f, post), *mhc_kernels._write_backward(grad, f, post)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("D", [40, 64])  # the chunked loops and the vector path (D a multiple of 16)
def test_write_takes_a_bf16_output_as_it_is(D, one_thread):
    # Under bf16 autocast the sublayer's output is bf16: the write reads it without an fp32 copy and
    # returns its gradient in bf16, rounded as PyTorch's cast rounds the fp32 gradient.
    n, N = 4, 70
    g = torch.Generator().manual_seed(5)
    mixed, post = torch.randn(N, n, D, generator=g), torch.rand(N, n, generator=g)
    f = (torch.randn(N, D, generator=g) * 3).bfloat16()
    up = torch.randn(N, n, D, generator=g)
    up[0, 0, :3] = torch.tensor([float("nan"), 1e38, -1e38])  # a NaN, and gradients near bf16's largest values
    grads = []
    for ff in (f, f.float()):
        leaf = ff.detach().requires_grad_()
        out = mhc_kernels.write(mixed, leaf, post.detach().requires_grad_())
        out.backward(up)
        grads.append((out, leaf.grad))
    (out_bf, gf_bf), (out_32, gf_32) = grads
    assert gf_bf.dtype == torch.bfloat16 and torch.equal(out_bf, out_32)
    want = gf_32.bfloat16()
    nan = want.isnan()  # only NaN-ness: PyTorch's cast gave 0xffff here, ours keeps the input NaN's top bits
    assert nan.any() and torch.equal(gf_bf.isnan(), nan)
    assert torch.equal(gf_bf[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_read_kernels_split_over_threads_give_the_same_bits():
    # Each thread carves its own scratch from one allocation; 300 tokens are 19 blocks of 16 lanes and
    # two 256-token partial sums of fn's gradient, added in order whichever thread made them.
    n, D, N = 4, 64, 300
    g = torch.Generator().manual_seed(4)
    x, fn = torch.randn(N, n, D, generator=g), torch.randn(24, n * D, generator=g) * 0.05
    base, scale = torch.randn(24, generator=g), torch.rand(3, generator=g) + 0.5
    grads = [torch.randn(N, D, generator=g), torch.randn(N, n, generator=g), torch.randn(N, n, D, generator=g)]
    runs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y, post, mixed, pre, raw, r = mhc_kernels._read(x, fn, base, scale, 20, EPS, EPS, False)
            runs.append((y, post, mixed, pre, raw, r,
                         *mhc_kernels._read_backward(*grads, x, fn, base, scale, pre, raw, r, 20, EPS, False)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def _tiny_mhc(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**(TINY | dict(hc_mult=4))))
    for name, p in model.named_parameters():  # spread the mixing out of its zero-init regime
        if "hc" in name:
            torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else p.data.add_(torch.randn_like(p) * 0.3)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_model_trains_the_same_with_and_without_the_kernels(one_thread):
    model = _tiny_mhc()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    loss_k, grads_k = _loss_and_grads(model, ids)
    with mhc_kernels.switched_off():
        loss_p, grads_p = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_k, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_k.keys() == grads_p.keys()
    assert any("hc" in k for k in grads_k)
    for k in grads_k:
        torch.testing.assert_close(grads_k[k], grads_p[k], rtol=2e-4, atol=2e-6, msg=k)


def test_compiled_training_step_calls_the_kernels_without_graph_breaks(one_thread):
    # TrainConfig.compile: the custom ops go into the graph (fullgraph), forward and backward, and the
    # block equals the eager one. (The whole model is not one graph: its MoE experts run outside it.)
    torch._dynamo.reset()
    cfg = ModelConfig(**(TINY | dict(hc_mult=4)))
    hc, sublayer = mhc.HyperConnection(cfg), torch.nn.Linear(cfg.dim, cfg.dim)
    torch.nn.init.normal_(hc.fn, std=0.05)
    x = torch.randn(2, 17, 4, cfg.dim)

    def block(x):
        y, post, mixed = hc(x)
        return mhc.hc_write(mixed, sublayer(y), post)

    def loss_and_grads(fn):
        xx = x.clone().requires_grad_()
        hc.zero_grad()
        loss = fn(xx).square().sum()
        loss.backward()
        return [loss.detach(), xx.grad] + [p.grad.clone() for p in hc.parameters()]

    want = loss_and_grads(block)
    seen = []
    got = loss_and_grads(torch.compile(block, fullgraph=True, backend=_spy_backend(seen)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    ops = {str(node.target) for gm in seen for node in gm.graph.nodes if node.op == "call_function"}
    assert {"seekling.mhc_read.default", "seekling.mhc_write.default", "seekling.mhc_read_backward.default",
            "seekling.mhc_write_backward.default"} <= ops, sorted(ops)


def _spy_backend(seen):
    """AOT autograd with the forward and backward graphs kept in `seen` and run as they are."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, _):
        seen.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def test_decode_without_gradients_under_compile_uses_the_plain_forms():
    # The engine's compiled decode step: Inductor fuses the plain forms into the step instead.
    x, fn = torch.randn(1, 1, 4, 8), torch.randn(24, 32)
    assert mhc._fused(x, fn)
    with torch.no_grad():
        assert mhc._fused(x, fn)
    seen = []

    @torch.compile(backend=lambda gm, _: seen.append(gm) or gm.forward, fullgraph=True)
    def probe(x):
        return x + int(mhc._fused(x, fn))

    with torch.no_grad():
        assert torch.equal(probe(x), x)  # _fused was False while tracing without gradients
    assert torch.equal(probe(x), x + 1)  # and True with them


def test_without_a_compiler_mhc_runs_on_pytorch_ops_after_one_warning(tmp_path):
    # A fresh process with no usable C compiler: a warning that names the cause and the fix, then the
    # same numbers from the PyTorch path.
    code = textwrap.dedent("""
        import warnings, torch
        from seekling.model import mhc_kernels
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert not mhc_kernels.available()
            assert not mhc_kernels.available()
        assert len(w) == 1, [str(m.message) for m in w]
        print(w[0].message)
    """)
    env = dict(__import__("os").environ, CC="/nonexistent/cc", SEEKLING_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no C compiler ('/nonexistent/cc'" in proc.stdout and "install a C compiler" in proc.stdout
    assert not any((tmp_path / "kernels").glob("*.so"))


def test_a_failed_build_says_why_and_leaves_no_partial_library(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKLING_CACHE", str(tmp_path))
    monkeypatch.setattr(mhc_kernels, "_SOURCE", tmp_path / "broken.c")
    (tmp_path / "broken.c").write_text("this is not C\n")
    with pytest.raises(RuntimeError, match="failed"):
        mhc_kernels._build("cc")
    assert list((tmp_path / "kernels").iterdir()) == []


def test_a_built_library_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKLING_CACHE", str(tmp_path))
    first = mhc_kernels._build("cc")
    stamp = first.stat().st_mtime_ns
    assert mhc_kernels._build("cc") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_other_dtypes_and_devices_take_the_pytorch_path():
    x, fn = torch.randn(1, 2, 4, 8), torch.randn(24, 32)
    assert mhc._fused(x, fn)
    with pytest.raises(TypeError, match="fp32 CPU tensors, got torch.float64"):  # called directly: refused, not misread
        mhc_kernels.read(x.double(), fn, torch.zeros(24), torch.ones(3), sinkhorn_iters=1, hc_eps=EPS, norm_eps=EPS)
    assert not mhc._fused(x.double(), fn.double())
    assert not mhc._fused(x.bfloat16(), fn)
    assert not mhc._fused(x, fn.bfloat16())
    assert not mhc._fused(x.to("meta"), fn.to("meta"))


def test_an_mhc_model_runs_its_blocks_through_the_kernels(one_thread):
    # The switch is real: with the kernels off the op counts change (no seekling::mhc_* ops run).
    model = _tiny_mhc()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 9))
    from torch.profiler import profile

    def ops():
        with profile() as prof:
            model(ids).sum().backward()
        return {e.key for e in prof.key_averages()}

    assert {"seekling::mhc_read", "seekling::mhc_write", "seekling::mhc_read_backward",
            "seekling::mhc_write_backward"} <= ops()
    with mhc_kernels.switched_off():
        assert not any(k.startswith("seekling::mhc") for k in ops())


def test_under_bf16_autocast_every_hyper_connection_takes_the_kernels(one_thread):
    # The MTP block's streams start from eh_proj, whose output autocast makes bf16: they are widened to
    # fp32 like the main model's, so its HyperConnections and head run the kernels too (on bf16 streams
    # they took the PyTorch path, fp32 GEMMs and all, every training step).
    from torch.profiler import profile

    from seekling.train.core import next_token_loss

    model = _tiny_mhc()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    loss_fn = next_token_loss(mtp_lambda=0.3)
    with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, (ids[:, :-1], ids[:, 1:]), None).loss
    loss.backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    layers = model.cfg.n_layers + model.cfg.n_mtp_layers
    assert counts.get("seekling::mhc_read") == 2 * layers + 1 + model.cfg.n_mtp_layers  # + the heads
    assert counts.get("seekling::mhc_write") == 2 * layers
